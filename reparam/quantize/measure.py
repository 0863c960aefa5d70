"""Measurements of the INT8 graph against the fp32 one, and the accuracy gates on them.

- :func:`measure_accuracy`: max and mean relative error, cosine and top-1 agreement on the
  held-out samples.
- :func:`layer_errors`: every Conv/Gemm/MatMul output of both graphs compared, ranked by the
  error each layer adds.
- :func:`time_interleaved`: one-thread latency, fp32 and INT8 runs alternating, medians.
- :func:`enforce_gates`: ``min_cosine`` / ``min_agreement`` raise
  :class:`~reparam.errors.QualityGateError` before anything is written.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reparam.errors import QualityGateError
from reparam.quantize.graph import fixed_batch_size
from reparam.quantize.report import LayerError, QuantizeReport


def _run_batched(
    session: Any, data: dict[str, np.ndarray], fixed_batch: int | None
) -> list[np.ndarray]:
    count = len(next(iter(data.values())))
    step = fixed_batch or 64
    chunks: list[list[np.ndarray]] = []
    for start in range(0, count, step):
        feed = {name: array[start : start + step] for name, array in data.items()}
        if fixed_batch and len(next(iter(feed.values()))) != fixed_batch:
            break
        chunks.append(list(session.run(feed).values()))
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def measure_accuracy(
    fp32: Any, int8: Any, held: dict[str, np.ndarray], report: QuantizeReport
) -> None:
    fixed = fixed_batch_size(fp32)
    reference = _run_batched(fp32, held, fixed)
    candidate = _run_batched(int8, held, fixed)
    cosines, max_rels, mean_rels = [], [], []
    for ref, cand in zip(reference, candidate, strict=True):
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        diff = np.abs(cand64 - ref64)
        scale = np.abs(ref64).max() if ref64.size else 0.0
        mean_scale = np.abs(ref64).mean() if ref64.size else 0.0
        max_rels.append(diff.max() / scale if scale > 0 else float(diff.max() > 0) * math.inf)
        mean_rels.append(diff.mean() / mean_scale if mean_scale > 0 else 0.0)
        norms = np.linalg.norm(ref64) * np.linalg.norm(cand64)
        cosines.append(float(ref64.ravel() @ cand64.ravel() / norms) if norms > 0 else 0.0)
    report.cosine = min(cosines) if cosines else 1.0
    report.max_rel = float(max(max_rels, default=0.0))
    report.mean_rel = float(max(mean_rels, default=0.0))
    if not all(np.isfinite(c).all() for c in candidate):
        report.cosine = float("nan")
        report.notes.append("the INT8 model outputs NaN or inf")
    scores = next((i for i, r in enumerate(reference) if r.ndim == 2 and r.shape[1] > 1), None)
    if scores is not None:
        same = reference[scores].argmax(1) == candidate[scores].argmax(1)
        report.agreement = float(same.mean()) if same.size else None


def layer_errors(
    prepared: Path, int8_path: Path, held: dict[str, np.ndarray], limit: int
) -> list[LayerError]:
    """Compare every Conv/Gemm/MatMul output of the two graphs on the held-out inputs.

    The INT8 graph keeps the float tensor names of the quantized ops' outputs (the QDQ pairs
    come after them), so exposing those tensors as outputs of both graphs lines them up.
    Accumulated error is measured; ``added`` subtracts the error already in the layer's input.
    """
    import onnx  # heavy: imported on use
    import onnxruntime as ort  # heavy: imported on use

    fp32_model, int8_model = onnx.load(str(prepared)), onnx.load(str(int8_path))
    layers = [n for n in fp32_model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    int8_tensors = {o for n in int8_model.graph.node for o in n.output}
    tensors = {o for n in layers for o in n.output} & int8_tensors
    producers = {o: n for n in fp32_model.graph.node for o in n.output}
    inputs_of = {}
    for node in layers:
        source = node.input[0]
        while source in producers and producers[source].op_type not in ("Conv", "Gemm", "MatMul"):
            source = producers[source].input[0] if producers[source].input else ""
        inputs_of[node.name] = source if source in tensors else None
    names = sorted(tensors)
    if not names:
        return []
    outputs = {}
    for label, model in (("fp32", fp32_model), ("int8", int8_model)):
        existing = {o.name for o in model.graph.output}
        for name in names:
            if name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        fixed = next(iter(held.values()))[: max(1, min(16, len(next(iter(held.values())))))]
        feed = {name: array[: len(fixed)] for name, array in held.items()}
        values = session.run(names, feed)
        outputs[label] = dict(zip(names, values, strict=True))
    errors = {}
    for name in names:
        ref = outputs["fp32"][name].astype(np.float64).ravel()
        cand = outputs["int8"][name].astype(np.float64).ravel()
        norms = np.linalg.norm(ref) * np.linalg.norm(cand)
        cosine = float(ref @ cand / norms) if norms > 0 else 1.0
        scale = np.abs(ref).max()
        errors[name] = (cosine, float(np.abs(cand - ref).max() / scale) if scale > 0 else 0.0)
    result = []
    for node in layers:
        if node.output[0] not in errors:
            continue
        cosine, max_rel = errors[node.output[0]]
        upstream = inputs_of.get(node.name)
        before = 1 - errors[upstream][0] if upstream else 0.0
        result.append(LayerError(node.name, node.op_type, cosine, max_rel, (1 - cosine) - before))
    result.sort(key=lambda layer: layer.added, reverse=True)
    return result[:limit]


def time_interleaved(
    fp32: Any,
    int8: Any,
    batch_sizes: Sequence[int],
    fixed_batch: int | None,
    samples: dict[str, np.ndarray],
) -> dict[int, tuple[float, float]]:
    """Median milliseconds per run, fp32 and INT8 alternating (one thread each).

    The inputs are calibration ``samples`` repeated to each batch size: their shapes are
    the graph's real ones even where its height and width are symbolic.
    """
    sizes = [fixed_batch] if fixed_batch else list(dict.fromkeys(batch_sizes))
    result = {}
    for batch in sizes:
        feed = {
            name: np.ascontiguousarray(array[np.arange(batch) % len(array)])
            for name, array in samples.items()
        }
        times: dict[int, list[float]] = {0: [], 1: []}
        for session in (fp32, int8):  # warm-up: first runs allocate and plan
            session.run(feed)
        budget = time.perf_counter() + 3.0
        while len(times[0]) < 5 or (time.perf_counter() < budget and len(times[0]) < 50):
            for key, session in ((0, fp32), (1, int8)):
                start = time.perf_counter()
                session.run(feed)
                times[key].append(time.perf_counter() - start)
        result[batch] = (statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3)
    return result


def enforce_gates(
    report: QuantizeReport, min_cosine: float | None, min_agreement: float | None
) -> None:
    failures = []
    if min_cosine is not None and not report.cosine >= min_cosine:  # NaN fails
        failures.append(f"cosine to fp32 {report.cosine:.5f} < --min-cosine {min_cosine}")
    if min_agreement is not None:
        if report.agreement is None:
            failures.append("--min-agreement needs class scores (an output of shape (N, classes))")
        elif report.agreement < min_agreement:
            failures.append(
                f"top-1 agreement {report.agreement:.2%} < --min-agreement {min_agreement:.2%}"
            )
    if failures:
        raise QualityGateError(
            f"INT8 model rejected, nothing written: {'; '.join(failures)} (max rel error "
            f"{report.max_rel:.3g}, mean rel {report.mean_rel:.3g}, {report.held_out_samples} "
            "held-out samples); try --method entropy or percentile, more calibration data, or "
            "--report-layers to find the layers to keep in float"
        )
