"""Static INT8 quantization of an exported ONNX model, measured against its fp32 graph.

:func:`quantize_onnx` runs onnxruntime's pre-processing (``quant_pre_process``: shape
inference and graph cleanup) then ``quantize_static`` in QDQ format, uint8 activations and
int8 weights (the pairing x86 CPUs have fast kernels for), per-channel weight scales by
default. Per-tensor scales are the known accuracy trap of reparameterized networks: a fused
kernel sums branches whose output channels differ widely in range, and one scale for all of
them wastes most of the int8 levels on a few channels.

Then it measures what the user needs to decide: file sizes, onnxruntime latency fp32 vs
INT8 (one thread, batch 1 and batch N, runs interleaved so that load drift hits both, medians)
and accuracy against the fp32 graph on held-out calibration samples (max and mean relative
error, cosine, top-1 agreement when an output looks like class scores), optionally per
layer. ``min_cosine`` / ``min_agreement`` turn it into a gate: nothing is written when the
INT8 model falls short.

Dynamic quantization (weights int8, activations quantized at run time) is refused for graphs
with convolutions: onnxruntime then runs ConvInteger plus float rescaling, measured 3.9–4.7x
*slower* than fp32 on a fused ResNet-18 (one thread, batch 1 and 8).

DRConv's correlation multiplies two activations (per-sample kernels generated from the input
times im2col columns): those MatMul nodes, and ``com.reparam::Corr`` nodes, stay in float.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reparam._io import atomic_write, prepare_output
from reparam.errors import ExportError, QualityGateError, UserInputError, summarize

__all__ = [
    "METHODS",
    "CalibrationData",
    "LayerError",
    "QuantizeReport",
    "load_calibration",
    "quantize_onnx",
]

METHODS = ("minmax", "entropy", "percentile")
RANDOM_SAMPLES = 32
MIN_HELD_OUT = 4  # below 2·this samples, accuracy is measured on the calibration samples
CALIBRATION_BATCH = 16
DYNAMIC_SLOWDOWN = "3.9–4.7x slower than fp32 (fused ResNet-18, onnxruntime, one thread)"
RANDOM_WARNING = (
    "no calibration data: calibrating on random normal inputs, which is only good for smoke "
    "tests (activation ranges, hence the INT8 model's accuracy, depend on real data); pass "
    "--calibration with a few hundred real inputs"
)


@dataclass
class LayerError:
    """How far one quantized layer's output is from the fp32 graph's (held-out samples)."""

    name: str
    op_type: str
    cosine: float
    max_rel: float
    added: float  # (1 − cosine) of the output minus that of its worst input: this layer's share


@dataclass
class QuantizeReport:
    """What :func:`quantize_onnx` wrote and measured. ``str()`` gives a readable summary."""

    model_path: Path
    output_path: Path | None
    method: str
    per_channel: bool
    calibration: str
    calibration_samples: int
    held_out_samples: int
    fp32_bytes: int
    int8_bytes: int
    latency_ms: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch → fp32, int8
    max_rel: float = 0.0
    mean_rel: float = 0.0
    cosine: float = 1.0
    agreement: float | None = None
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def speedup(self, batch: int) -> float:
        """fp32 latency / INT8 latency at ``batch`` (above 1: INT8 is faster)."""
        fp32, int8 = self.latency_ms[batch]
        return fp32 / int8 if int8 > 0 else math.inf

    def summary(self) -> list[tuple[str, str]]:
        """(key, value) lines for a table or ``key: value`` output."""
        mib = 1024 * 1024
        rows = [
            ("model", str(self.model_path)),
            ("output", str(self.output_path) if self.output_path else "(not written)"),
            (
                "scheme",
                f"static QDQ, u8 activations, s8 weights "
                f"{'per channel' if self.per_channel else 'per tensor'}, {self.method}",
            ),
            (
                "calibration",
                f"{self.calibration}: {self.calibration_samples} samples, "
                f"{self.held_out_samples} held out",
            ),
            (
                "size",
                f"{self.fp32_bytes / mib:.2f} MiB -> {self.int8_bytes / mib:.2f} MiB "
                f"({self.fp32_bytes / max(self.int8_bytes, 1):.2f}x smaller)",
            ),
        ]
        for batch, (fp32, int8) in self.latency_ms.items():
            rows.append(
                (
                    f"latency batch {batch}",
                    f"fp32 {fp32:.2f} ms, int8 {int8:.2f} ms ({self.speedup(batch):.2f}x, one "
                    "thread, median)",
                )
            )
        rows.append(("cosine vs fp32", f"{self.cosine:.5f}"))
        rows.append(("max / mean rel error", f"{self.max_rel:.3g} / {self.mean_rel:.3g}"))
        if self.agreement is not None:
            rows.append(("top-1 agreement", f"{self.agreement:.2%}"))
        quantized = ", ".join(f"{n} {op}" for op, n in sorted(self.quantized_nodes.items()))
        rows.append(("quantized", quantized or "nothing"))
        if self.excluded_nodes:
            rows.append(("kept in float", f"{len(self.excluded_nodes)} node(s)"))
        for layer in self.layers:
            rows.append(
                (
                    f"layer {layer.name}",
                    f"{layer.op_type}: cosine {layer.cosine:.5f}, max rel {layer.max_rel:.3g}, "
                    f"adds {layer.added:.2e}",
                )
            )
        rows.extend(("note", note) for note in self.notes)
        return rows

    def __str__(self) -> str:
        return "\n".join(f"{key}: {value}" for key, value in self.summary())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings, latency keyed by batch as a string)."""
        data = asdict(self)
        data["model_path"] = str(self.model_path)
        data["output_path"] = str(self.output_path) if self.output_path else None
        data["latency_ms"] = {
            str(batch): {"fp32": fp32, "int8": int8, "speedup": self.speedup(batch)}
            for batch, (fp32, int8) in self.latency_ms.items()
        }
        for key in ("max_rel", "mean_rel", "cosine"):
            if not math.isfinite(data[key]):
                data[key] = str(data[key])
        return data


# -- calibration data ---------------------------------------------------------------------


@dataclass
class CalibrationData:
    """Named float32 input arrays, all with the same number of samples (axis 0)."""

    arrays: dict[str, np.ndarray]
    source: str

    @property
    def count(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, index: slice | np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.arrays.items()}


def _read_array_file(path: Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """One .npy (a single-input model) or .npz (arrays by input name) → arrays by name."""
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle: it runs code
        if isinstance(loaded, np.ndarray):
            contents = {"": loaded}
        else:
            with loaded:
                contents = {key: loaded[key] for key in loaded.files}
    except ValueError as error:  # object arrays need pickle
        raise UserInputError(f"calibration file '{path}' is not a numeric array: {error}") from None
    except Exception as error:  # OSError, EOFError, zipfile.BadZipFile, corrupt members
        raise UserInputError(
            f"calibration file '{path}' is not a readable .npy/.npz: {summarize(error)}"
        ) from None
    if len(contents) == 1 and len(input_names) == 1:
        return {input_names[0]: next(iter(contents.values()))}
    missing = [name for name in input_names if name not in contents]
    if missing:
        found = ", ".join(sorted(k for k in contents if k)) or "one unnamed array"
        raise UserInputError(
            f"calibration file '{path}' has {found}; the model's inputs are "
            f"{', '.join(input_names)}: use an .npz with one array per input name"
        )
    return {name: contents[name] for name in input_names}


def load_calibration(
    source: str | os.PathLike | None,
    inputs: Sequence[Any],
    *,
    random_shapes: Sequence[tuple[int, ...]] | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Read calibration inputs from an .npy/.npz file or a folder of them, checked.

    Args:
        source: the file or folder; ``None`` draws random normal inputs (with a warning).
        inputs: the graph's inputs (:class:`reparam.runtime.TensorSpec`).
        random_shapes: per-input shapes of one sample (batch axis included, size 1) for
            random data.

    Raises:
        UserInputError: missing file, empty folder, non-numeric data, wrong rank or size.
    """
    names = [spec.name for spec in inputs]
    if source is None:
        warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=3)
        rng = np.random.default_rng(seed)
        shapes = random_shapes or [(1, *spec.shape[1:]) for spec in inputs]
        return CalibrationData(
            {
                name: rng.standard_normal((RANDOM_SAMPLES, *shape[1:])).astype(np.float32)
                for name, shape in zip(names, shapes, strict=True)
            },
            "random normal (smoke test only)",
        )
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
        if not files:
            raise UserInputError(f"calibration folder '{path}' has no .npy or .npz files")
    elif path.is_file():
        if path.suffix not in (".npy", ".npz"):
            raise UserInputError(
                f"calibration data '{path}' must be an .npy or .npz file or a folder"
            )
        files = [path]
    else:
        raise UserInputError(f"calibration data '{path}' does not exist")
    parts = [_read_array_file(file, names) for file in files]
    arrays = {}
    for spec in inputs:
        checked = [
            _check_calibration_array(part[spec.name], spec, f)
            for part, f in zip(parts, files, strict=True)
        ]
        arrays[spec.name] = np.concatenate(checked) if len(checked) > 1 else checked[0]
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise UserInputError(f"calibration inputs have different sample counts: {counts}")
    if next(iter(counts.values())) == 0:
        raise UserInputError(f"calibration data '{path}' has no samples")
    return CalibrationData(arrays, f"{path} ({len(files)} file{'s' * (len(files) > 1)})")


def _check_calibration_array(array: np.ndarray, spec: Any, file: Path) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(
            f"calibration input '{spec.name}' in '{file}' has dtype {array.dtype}; the model "
            f"takes {np.dtype(spec.dtype).name} (give floating-point data)"
        )
    if array.ndim != len(spec.shape):
        raise UserInputError(
            f"calibration input '{spec.name}' in '{file}' has shape {array.shape}; the model "
            f"takes rank {len(spec.shape)} ({spec.describe()}), samples along axis 0"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if axis and isinstance(want, int) and want > 0 and want != got:
            raise UserInputError(
                f"calibration input '{spec.name}' in '{file}' has shape {array.shape}; the "
                f"model takes {spec.describe()}"
            )
    if not np.isfinite(array).all():
        raise UserInputError(f"calibration input '{spec.name}' in '{file}' holds NaN or inf")
    return np.ascontiguousarray(array, dtype=spec.dtype)


def _reader(data: dict[str, np.ndarray], batch: int | None) -> Any:
    """An onnxruntime CalibrationDataReader over ``data`` in batches (fixed ``batch`` if set)."""
    from onnxruntime.quantization import CalibrationDataReader  # heavy: imported on use

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = self._iterate()

        def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
            count = len(next(iter(data.values())))
            step = batch or CALIBRATION_BATCH
            for start in range(0, count - (count % step if batch else 0), step):
                yield {name: array[start : start + step] for name, array in data.items()}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

        def rewind(self) -> None:
            self.batches = self._iterate()

    return Reader()


# -- graph inspection ---------------------------------------------------------------------


def _float_only_nodes(model: Any) -> list[str]:
    """Nodes that must stay float: MatMuls of two activations (DRConv) and Corr nodes."""
    from reparam.ops.corr_onnx import DOMAIN

    constants = {init.name for init in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    keep = _argmax_feeders(model)
    for node in model.graph.node:
        two_activations = node.op_type == "MatMul" and not any(i in constants for i in node.input)
        if node.domain == DOMAIN or two_activations:
            keep.append(node.name)
    return keep


def _argmax_feeders(model: Any) -> list[str]:
    """The nearest Conv/Gemm/MatMul upstream of each ArgMax (DRConv's guide).

    A region choice by argmax is discontinuous: int8 noise in the guide's scores flips the
    chosen region at many pixels, each flip an error of order one.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    found: list[str] = []
    stack = [i for n in model.graph.node if n.op_type == "ArgMax" for i in n.input]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            found.append(node.name)
        else:
            stack.extend(node.input)
    return found


def _name_nodes(model: Any) -> None:
    """Give every unnamed node a name: nodes_to_exclude and the layer report need them."""
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _has_conv(model: Any) -> bool:
    return any(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node)


# -- main entry point ---------------------------------------------------------------------


def quantize_onnx(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    calibration: str | os.PathLike | None = None,
    per_channel: bool = True,
    method: str = "minmax",
    report_layers: bool = False,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    dynamic: bool = False,
    seed: int = 0,
    max_layers: int = 10,
) -> QuantizeReport:
    """Quantize ``model_path`` to INT8 (static, QDQ) at ``output_path`` and measure it.

    Args:
        model_path: an fp32 ONNX model (e.g. from ``reparam export``).
        output_path: the INT8 ``.onnx`` to write (atomically; untouched when a gate fails).
        calibration: an .npy (one input), .npz (one array per input name) or a folder of
            them, samples along axis 0. A fifth (at least 4 samples) is held out to measure
            accuracy. ``None``: random inputs, with a loud warning (smoke tests only).
        per_channel: one weight scale per output channel (default) or per tensor.
        method: calibration method, "minmax", "entropy" or "percentile".
        report_layers: also compare every quantized layer's output with fp32 and list the
            ``max_layers`` layers that add the most error.
        min_cosine: fail (nothing written) when the cosine to fp32 is below this.
        min_agreement: fail when the top-1 agreement with fp32 is below this (0..1).
        batch_sizes: batch sizes to time (a fixed-batch graph is timed at its own batch).
        dynamic: ask for dynamic quantization instead: refused for convolutional graphs.
        seed: for random calibration data and timing inputs.
        max_layers: how many layers ``report_layers`` lists.

    Returns:
        A :class:`QuantizeReport`.

    Raises:
        UserInputError: bad file, option or calibration data; dynamic quantization of convs.
        ExportError: onnxruntime cannot quantize the graph, or a ``min_*`` gate fails.
    """
    from reparam.runtime import load as load_session
    from reparam.runtime import load_onnx

    started = time.perf_counter()
    model_path = Path(model_path)
    _check_options(method, min_cosine, min_agreement, batch_sizes, max_layers)
    proto = load_onnx(model_path)  # one line for a missing, corrupt or non-ONNX file
    output_path = Path(output_path)
    if output_path.suffix.lower() != ".onnx":
        raise UserInputError(f"output file '{output_path}' should end in .onnx")
    target = prepare_output(output_path, inputs=[model_path])
    if dynamic:
        _refuse_dynamic(proto)

    fp32 = load_session(model_path, threads=1)
    if any(spec.dtype != np.float32 for spec in fp32.inputs):
        raise UserInputError(
            f"'{model_path}' has inputs "
            f"{', '.join(spec.describe() for spec in fp32.inputs)}: INT8 quantization here "
            "starts from an fp32 graph"
        )
    data = load_calibration(
        calibration, fp32.inputs, random_shapes=_one_sample_shapes(fp32), seed=seed
    )
    fixed_batch = _fixed_batch(fp32)
    calibrate_idx, held_idx, notes = _split(data.count, fixed_batch)

    report = QuantizeReport(
        model_path=model_path,
        output_path=None,
        method=method,
        per_channel=per_channel,
        calibration=data.source,
        calibration_samples=len(calibrate_idx),
        held_out_samples=len(held_idx),
        fp32_bytes=model_path.stat().st_size,
        int8_bytes=0,
        notes=notes,
    )
    if calibration is None:
        report.notes.insert(0, RANDOM_WARNING)
    with tempfile.TemporaryDirectory(prefix="reparam-quantize-") as tmp_dir:
        work = Path(tmp_dir)
        int8_tmp = work / "int8.onnx"
        prepared = _prepare(proto, work, report)
        _quantize(
            prepared, int8_tmp, data.take(calibrate_idx), fixed_batch, per_channel, method, report
        )
        report.int8_bytes = int8_tmp.stat().st_size
        int8 = load_session(int8_tmp, threads=1)
        held = data.take(held_idx)
        _measure_accuracy(fp32, int8, held, report)
        if report_layers:
            report.layers = _layer_errors(prepared, int8_tmp, held, max_layers)
        report.latency_ms = _time_interleaved(fp32, int8, batch_sizes, fixed_batch, seed)
        _enforce_gates(report, min_cosine, min_agreement)
        atomic_write(target, lambda tmp: shutil.copyfile(int8_tmp, tmp))
    report.output_path = output_path
    report.seconds = time.perf_counter() - started
    return report


def _check_options(
    method: str,
    min_cosine: float | None,
    min_agreement: float | None,
    batch_sizes: Sequence[int],
    max_layers: int,
) -> None:
    if method not in METHODS:
        raise UserInputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if min_cosine is not None and not (math.isfinite(min_cosine) and -1 <= min_cosine <= 1):
        raise UserInputError(f"min_cosine must be between -1 and 1, got {min_cosine}")
    if min_agreement is not None and not (math.isfinite(min_agreement) and 0 <= min_agreement <= 1):
        raise UserInputError(f"min_agreement must be between 0 and 1, got {min_agreement}")
    if not batch_sizes or any(not isinstance(b, int) or not 1 <= b <= 4096 for b in batch_sizes):
        raise UserInputError(
            f"batch sizes must be integers from 1 to 4096, got {list(batch_sizes)}"
        )
    if max_layers < 1:
        raise UserInputError(f"max_layers must be at least 1, got {max_layers}")


def _refuse_dynamic(proto: Any) -> None:
    if _has_conv(proto):
        raise UserInputError(
            "dynamic quantization makes convolutional networks slower, not faster: onnxruntime "
            f"runs ConvInteger with float rescaling, measured {DYNAMIC_SLOWDOWN}; use static "
            "quantization (the default) with calibration data"
        )
    raise UserInputError(
        "dynamic quantization is not offered: use static quantization (the default); for "
        "graphs without convolutions call onnxruntime.quantization.quantize_dynamic directly"
    )


def _one_sample_shapes(session: Any) -> list[tuple[int, ...]]:
    return [(1, *shape[1:]) for shape in session.concrete_shapes(1)]


def _fixed_batch(session: Any) -> int | None:
    """The graph's batch size when axis 0 is fixed (the same on every input), else None."""
    batches = {spec.shape[0] for spec in session.inputs if spec.shape}
    if len(batches) == 1:
        (batch,) = batches
        if isinstance(batch, int) and batch > 0:
            return batch
    return None


def _split(count: int, fixed_batch: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Indices to calibrate on and to hold out for the accuracy check (a fifth, ≥ 4)."""
    notes = []
    order = np.arange(count)
    held = max(MIN_HELD_OUT, count // 5)
    if fixed_batch:
        held = max(fixed_batch, held - held % fixed_batch)
    if count - held < max(held, fixed_batch or 1):
        notes.append(
            f"only {count} calibration samples: accuracy is measured on the calibration "
            "samples themselves (optimistic); give more data to hold some out"
        )
        usable = count - count % fixed_batch if fixed_batch else count
        return order[:count], order[:usable], notes
    return order[: count - held], order[count - held :], notes


def _prepare(proto: Any, work: Path, report: QuantizeReport) -> Path:
    """Name nodes, attach Corr's function, run onnxruntime's pre-processing → a file path."""
    import onnx  # heavy: imported on use

    from reparam.ops.corr_onnx import attach_corr_function, corr_nodes

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    _name_nodes(model)
    if corr_nodes(model):
        # Calibration runs the graph in a plain onnxruntime session: it needs Corr's body.
        attach_corr_function(model)
    named = work / "named.onnx"
    onnx.save(model, str(named))
    prepared = work / "prepared.onnx"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(named), str(prepared), skip_symbolic_shape=bool(corr_nodes(model)))
    except Exception as error:  # the pre-processing is an optimisation, not a requirement
        report.notes.append(
            f"onnxruntime's pre-processing failed, quantized as exported ({summarize(error)})"
        )
        return named
    return prepared


def _quantize(
    prepared: Path,
    output: Path,
    calibration: dict[str, np.ndarray],
    fixed_batch: int | None,
    per_channel: bool,
    method: str,
    report: QuantizeReport,
) -> None:
    import onnx  # heavy: imported on use
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(prepared))
    exclude = _float_only_nodes(model)
    if exclude:
        report.excluded_nodes = exclude
        report.notes.append(
            f"{len(exclude)} node(s) kept in float: DRConv's correlation (a MatMul of two "
            "activations, per-sample kernels × im2col columns) and its guide conv (int8 noise "
            "flips its argmax region choice); the other convolutions are quantized"
        )
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    try:
        with _quiet_logging():
            quantize_static(
                str(prepared),
                str(output),
                _reader(calibration, fixed_batch),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=calibrate_method,
                # Symmetric int8 weights let onnxruntime use its u8s8 kernels without zero-point
                # corrections on the weight side.
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
    except UserInputError:
        raise
    except Exception as error:  # onnxruntime's quantizer raises many types
        raise ExportError(
            f"onnxruntime could not quantize '{report.model_path}': {summarize(error)}"
        ) from None
    quantized = onnx.load(str(output))
    # The quantizer imports domains it never uses (training, preview, aten...); a loader that
    # allow-lists domains would refuse the file for them.
    used = {node.domain for node in quantized.graph.node} | {""}
    used |= {f.domain for f in quantized.functions}
    for node_function in quantized.functions:
        used |= {node.domain for node in node_function.node}
    kept = [o for o in quantized.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del quantized.opset_import[:]
    quantized.opset_import.extend(kept)
    onnx.save(quantized, str(output))
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type.startswith(
            "QLinear"
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    report.quantized_nodes = counts
    if not counts:
        raise ExportError(
            f"onnxruntime quantized nothing in '{report.model_path}' (no Conv, MatMul or Gemm)"
        )


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """onnxruntime's quantizer logs warnings on the root logger; keep them off the console."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# -- measurements -------------------------------------------------------------------------


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


def _measure_accuracy(
    fp32: Any, int8: Any, held: dict[str, np.ndarray], report: QuantizeReport
) -> None:
    fixed = _fixed_batch(fp32)
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


def _layer_errors(
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


def _time_interleaved(
    fp32: Any, int8: Any, batch_sizes: Sequence[int], fixed_batch: int | None, seed: int
) -> dict[int, tuple[float, float]]:
    """Median milliseconds per run, fp32 and INT8 alternating (one thread each)."""
    sizes = [fixed_batch] if fixed_batch else list(dict.fromkeys(batch_sizes))
    result = {}
    for batch in sizes:
        feed = fp32.random_inputs(batch, seed)
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


def _enforce_gates(
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
