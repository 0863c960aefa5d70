"""The :func:`quantize_onnx` entry point: options, onnxruntime's pre-processing and quantizer.

It checks the options and the model, loads the calibration data, prepares the graph (named
nodes, Corr's function attached, ``quant_pre_process``), runs ``quantize_static`` with the
float-only nodes excluded, trims unused opset imports, then hands over to
:mod:`reparam.quantize.measure` and writes the INT8 file only once the gates pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reparam._io import check_distinct_paths, prepare_output
from reparam.errors import ExportError, UserInputError, printable, summarize
from reparam.export.staging import Staging
from reparam.quantize.calibration import (
    RANDOM_WARNING,
    CalibrationData,
    calibration_reader,
    load_calibration,
    split_samples,
)
from reparam.quantize.graph import (
    fixed_batch_size,
    float_only_nodes,
    has_conv,
    name_nodes,
    one_sample_shapes,
    refuse_unquantizable,
)
from reparam.quantize.measure import (
    enforce_gates,
    layer_errors,
    measure_accuracy,
    time_interleaved,
)
from reparam.quantize.report import QuantizeReport
from reparam.quantize.workdir import work_directory

METHODS = ("minmax", "entropy", "percentile")
DYNAMIC_SLOWDOWN = "3.9–4.7x slower than fp32 (fused ResNet-18, onnxruntime, one thread)"


def quantize_onnx(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    calibration: str | os.PathLike | CalibrationData | None = None,
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
            them, samples along axis 0, or a :class:`CalibrationData` already read. A fifth
            (at least 4 samples) is held out to measure accuracy. ``None``: random inputs,
            with a loud warning (smoke tests only).
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
    output_path = Path(output_path)
    if output_path.suffix.lower() != ".onnx":
        raise UserInputError(f"output file '{printable(output_path)}' should end in .onnx")
    source = None if isinstance(calibration, CalibrationData) else calibration
    check_distinct_paths({"output": output_path}, {"model": model_path, "calibration": source})
    prepare_output(output_path, inputs=[model_path])
    proto = load_onnx(model_path)  # one line for a missing, corrupt or non-ONNX file
    # Graph-only refusals first: they cost a scan, not a session (a 10^5-node graph with
    # nothing to quantize is refused in a second instead of calibrating for minutes).
    if dynamic:
        _refuse_dynamic(proto)
    refuse_unquantizable(proto, model_path)

    fp32 = load_session(model_path, threads=1)
    if any(spec.dtype != np.float32 for spec in fp32.inputs):
        raise UserInputError(
            f"'{printable(model_path)}' has inputs "
            f"{', '.join(spec.describe() for spec in fp32.inputs)}: INT8 quantization here "
            "starts from an fp32 graph"
        )
    data = load_calibration(
        calibration,
        fp32.inputs,
        # random data needs every axis's size; real data brings its own (symbolic H/W)
        random_shapes=one_sample_shapes(fp32) if calibration is None else None,
        seed=seed,
    )
    if calibration is not None:  # sizes outside the graph's recorded ranges: name the data
        from reparam.runtime import check_input_ranges

        shapes = {name: (1, *array.shape[1:]) for name, array in data.arrays.items()}
        try:
            check_input_ranges(fp32.metadata, shapes)
        except UserInputError as error:
            raise UserInputError(f"calibration data {printable(data.source)}: {error}") from None
    fixed_batch = fixed_batch_size(fp32)
    calibrate_idx, held_idx, notes = split_samples(data.count, fixed_batch)

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
    with work_directory() as work:
        int8_tmp = work / "int8.onnx"
        prepared = _prepare(proto, work, report)
        _quantize(
            prepared, int8_tmp, data.take(calibrate_idx), fixed_batch, per_channel, method, report
        )
        report.int8_bytes = int8_tmp.stat().st_size
        int8 = load_session(int8_tmp, threads=1)
        held = data.take(held_idx)
        measure_accuracy(fp32, int8, held, report)
        if report_layers:
            report.layers = layer_errors(prepared, int8_tmp, held, max_layers)
        report.latency_ms = time_interleaved(fp32, int8, batch_sizes, fixed_batch, held)
        enforce_gates(report, min_cosine, min_agreement)
        with Staging() as staging:
            shutil.copyfile(int8_tmp, staging.stage(output_path))
            staging.commit()
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
    if has_conv(proto):
        raise UserInputError(
            "dynamic quantization makes convolutional networks slower, not faster: onnxruntime "
            f"runs ConvInteger with float rescaling, measured {DYNAMIC_SLOWDOWN}; use static "
            "quantization (the default) with calibration data"
        )
    raise UserInputError(
        "dynamic quantization is not offered: use static quantization (the default); for "
        "graphs without convolutions call onnxruntime.quantization.quantize_dynamic directly"
    )


def _prepare(proto: Any, work: Path, report: QuantizeReport) -> Path:
    """Name nodes, attach Corr's function, run onnxruntime's pre-processing → a file path."""
    import onnx  # heavy: imported on use

    from reparam.ops.corr_onnx import attach_corr_function, corr_nodes

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    name_nodes(model)
    if corr_nodes(model):
        # Calibration runs the graph in a plain onnxruntime session: it needs Corr's body.
        attach_corr_function(model)
    named = work / "named.onnx"
    onnx.save(model, str(named))
    prepared = work / "prepared.onnx"
    try:
        from onnxruntime.quantization.shape_inference import (  # heavy: imported on use
            quant_pre_process,
        )

        # ONNX's own shape inference only: onnxruntime's symbolic shape inference, when it
        # cannot finish (DRConv's region-first graph, Corr), saves a debug copy of the model
        # into the *current directory* (sym_shape_infer_temp.onnx and a UUID-named .data
        # file) before it gives up; a conv network's shapes need nothing more than ONNX's.
        quant_pre_process(str(named), str(prepared), skip_symbolic_shape=True)
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
    # heavy: onnx and onnxruntime are imported on use
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(prepared))
    exclude = float_only_nodes(model)
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
                calibration_reader(calibration, fixed_batch),
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
    except OSError as error:  # the work folder's file system: full, quota, removed
        raise UserInputError(
            f"quantizing needs room in the temporary folder ({printable(error)}); free space "
            "or point TMPDIR at a larger file system"
        ) from None
    except Exception as error:  # onnxruntime's quantizer raises many types
        if isinstance(error, AssertionError) and "scale" in str(error):
            raise UserInputError(
                "onnxruntime could not compute INT8 scales: the calibration data's activations "
                "are out of range (give the model's real inputs, normalised as in training)"
            ) from None
        raise ExportError(
            f"onnxruntime could not quantize '{printable(report.model_path)}': {summarize(error)}"
        ) from None
    counts = _trim_opset_imports(output)
    report.quantized_nodes = counts
    if not counts:
        raise ExportError(
            f"onnxruntime quantized nothing in '{report.model_path}' (no Conv, MatMul or Gemm)"
        )


def _trim_opset_imports(path: Path) -> dict[str, int]:
    """Drop the opset imports nothing uses; count the quantization nodes.

    The quantizer imports domains it never uses (training, preview, aten...); a loader that
    allow-lists domains would refuse the file for them.
    """
    import onnx_ir as ir  # heavy: imported on use

    model = ir.load(str(path))
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes += list(function.all_nodes())
    used = {node.domain for node in nodes} | {f.domain for f in model.functions.values()} | {""}
    for domain in [d for d in model.opset_imports if d not in used and d != "ai.onnx"]:
        del model.opset_imports[domain]
    ir.save(model, str(path))
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type.startswith(
            "QLinear"
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


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
