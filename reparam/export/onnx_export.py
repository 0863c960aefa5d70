"""Export a (fused) model to ONNX, checked, with metadata, written atomically.

:func:`export_onnx` is the orchestration; each step lives in its own module:

- :mod:`~reparam.export.signature`: example arguments (any ``forward`` signature) as flat
  graph inputs;
- :mod:`~reparam.export._torch_exporter`: the call into torch's exporter, quiet, with axes
  named ``batch``, ``height``, ``width``;
- :mod:`~reparam.export.graph`: checker, shape inference, metadata;
- :mod:`~reparam.export.dynamic_check`: symbolic axes run at other sizes under onnxruntime;
- :mod:`~reparam.export.fp16`: the float16 cast and its overflow check;
- :mod:`~reparam.export.report`: :class:`ExportReport`.

The file is written through :func:`reparam._io.atomic_write`: the graph is saved to a
temporary file beside the target, checked there (dynamic axes, then the caller's ``check``,
e.g. :func:`reparam.verify_onnx`), and only then renamed over the target. Any failure or
interrupt leaves the old file as it was and no temporary file.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam._io import atomic_write
from reparam._version import __version__
from reparam.compare import OutputDiff, flatten_outputs
from reparam.convert import fuse_with_report
from reparam.errors import ExportError, UserInputError, summarize
from reparam.export import dynamic_check
from reparam.export._torch_exporter import run_exporter
from reparam.export.fp16 import Float32Boundary, to_float16
from reparam.export.graph import (
    check_and_infer,
    check_symbolic_axes,
    custom_ops,
    op_name,
    rename_outputs,
    set_metadata,
    value_shape,
)
from reparam.export.report import ExportReport
from reparam.export.signature import FlatInputs, InputTree, flatten_inputs, unflatten_inputs
from reparam.export.verify import eval_mode_of

__all__ = [
    "CORR_EXPORT_MODES",
    "DTYPES",
    "EXPORTERS",
    "ExportError",
    "ExportReport",
    "export_onnx",
    "flatten_inputs",
    "supported_opsets",
    "unflatten_inputs",
]

EXPORTERS = ("dynamo", "legacy")
CORR_EXPORT_MODES = ("standard", "custom")
DTYPES = {torch.float32: "float32", torch.float16: "float16"}
DYNAMO_MIN_OPSET = 18  # the exporter's own opset; below it needs lossy version conversion
FP16_DYNAMIC_CHECK_RTOL = 1e-2  # torch and onnxruntime round float16 differently

Progress = Callable[[str], None]


def supported_opsets(exporter: str = "dynamo") -> range:
    """The opset versions :func:`export_onnx` accepts for ``exporter``."""
    import onnx  # heavy, optional at import time
    from torch.onnx import _constants

    if exporter == "legacy":
        return range(_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)
    return range(DYNAMO_MIN_OPSET, onnx.defs.onnx_opset_version() + 1)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | Sequence[Any],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    fuse: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    corr: str = "standard",
    exporter: str = "dynamo",
    dtype: torch.dtype | None = None,
    fp32_io: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    source: str | None = None,
    check: Callable[[Path], Any] | None = None,
    check_dynamic_axes: bool = True,
    progress: Progress | None = None,
) -> ExportReport:
    """Export ``model`` to an ONNX file at ``path``.

    Args:
        model: the model, in training form (it is fused on a copy) or already fused.
        path: the ``.onnx`` file to write; replaced atomically, untouched on failure.
        example_inputs: one tensor or a sequence of positional arguments, each a tensor, a
            constant (None, bool, int, float) or nested tuples/lists/dicts of them; every
            tensor becomes one graph input, in order (``forward(self, *xs)`` included).
        example_kwargs: keyword arguments, likewise (parameters with defaults may be left
            out: their defaults are exported as constants).
        fuse: fuse every block and Conv→BN pair first (:func:`reparam.fuse`).
        opset: ONNX opset version; default torch's. See :func:`supported_opsets`.
        dynamic_batch: make axis 0 of every input and output symbolic (``batch``).
        dynamic_hw: also make the spatial axes (2 and up) of every input symbolic
            (``height``, ``width``).
        corr: how ``reparam.ops.corr`` (DRConv) is exported: "standard" ONNX operators
            (any runtime, dynamic batch) or "custom", one ``com.reparam::Corr`` node per call
            (needs onnxruntime-extensions to run; see :mod:`reparam.runtime`).
        exporter: "dynamo" (torch.export-based, the default) or "legacy" (TorchScript,
            deprecated by torch; a fallback).
        dtype: ``torch.float16`` for a half-precision graph (the fused weights are checked
            for overflow first); default the model's own dtype.
        fp32_io: with float16, keep float32 inputs and outputs (a Cast at each end).
        input_names, output_names: graph names; default "input"/"output", numbered when
            there are several.
        source: what the model is (e.g. a bundled name), for the metadata.
        check: called with the temporary file once it is written and its dynamic axes are
            checked, before it replaces ``path``; an exception (or a falsy ``ok`` attribute
            of its result, as a failed :class:`~reparam.export.VerifyReport` has) aborts the
            export and leaves ``path`` as it was. Its result is ``report.check``.
        check_dynamic_axes: run the graph at other sizes (see
            :mod:`~reparam.export.dynamic_check`); a caller whose ``check`` already runs it at
            several batch sizes may skip it for a dynamic batch alone.
        progress: called with a short line before each slow step.

    Returns:
        An :class:`ExportReport`.

    Raises:
        UserInputError: bad option, or the model does not run on the example inputs.
        ExportError: the exporter fails, a dynamic axis would make a wrong graph, a weight
            overflows float16, or ``check`` fails.
        FusionError: a block cannot be fused.
    """
    started = time.perf_counter()
    say = progress or (lambda line: None)
    tree, inputs = InputTree.from_example(example_inputs, example_kwargs)
    opset = _check_options(opset, corr, exporter, inputs, dynamic_hw, dtype, fp32_io)
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UserInputError(f"output file '{path}' should end in .onnx")

    args, kwargs = tree.rebuild(inputs)
    out_names = list(output_names) if output_names is not None else None
    if exporter == "legacy":  # it needs every output name up front: count them by a run
        with eval_mode_of(model):
            outputs = _run_model(model, args, kwargs, inputs, "the model")
        out_names = _names(output_names, _count_outputs(outputs), "output")
    # The torch.export-based exporter runs the model symbolically, so no eager run is spent
    # here (a second of a ResNet-18 export): output names are set on the graph afterwards,
    # and the model is run only to explain an exporter failure.
    fuse_report = None
    if fuse:
        say("export: fusing")
        target, fuse_report = fuse_with_report(model)
    else:
        target = copy.deepcopy(model).eval()
    half = dtype == torch.float16
    if half:
        target = to_float16(target)
    flat: nn.Module = FlatInputs(target, tree).eval()
    if half and fp32_io:
        flat = Float32Boundary(flat).eval()
    elif half:
        inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    written_dtype = "float16" if half else _dtype_name(inputs)
    in_names = _names(input_names, len(inputs), "input")

    # torch.export specialises a size-1 axis to the constant 1: trace a batch of two.
    traced = (
        tuple(torch.cat([t, t]) if t.dim() else t for t in inputs)
        if dynamic_batch and any(t.dim() and t.shape[0] == 1 for t in inputs)
        else inputs
    )
    say(f"export: {exporter} exporter")
    try:
        proto, tracer_warnings = run_exporter(
            flat, traced, opset=opset, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw,
            corr=corr, exporter=exporter, input_names=in_names, output_names=out_names,
        )  # fmt: skip
        check_symbolic_axes(proto, dynamic_batch, dynamic_hw)
    except ExportError:
        if exporter == "dynamo":  # inputs the model cannot take: say so, not the exporter's trace
            with eval_mode_of(model):
                _run_model(model, args, kwargs, inputs, "the model")
        raise
    if output_names is None:
        out_names = _names(None, len(proto.graph.output), "output")
        rename_outputs(proto, out_names)
    else:
        out_names = _names(output_names, len(proto.graph.output), "output")
    say("export: ONNX checker and shape inference")
    proto = check_and_infer(proto, infer=exporter == "legacy")
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_written != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {opset_written}")

    ops = custom_ops(proto)
    metadata = {
        "reparam.version": __version__,
        "reparam.source": source or f"{type(model).__module__}.{type(model).__qualname__}",
        "reparam.fused": str(bool(fuse)).lower(),
        "reparam.corr": corr,
        "reparam.custom_ops": ",".join(ops),
        "reparam.exporter": exporter,
        "reparam.opset": str(opset_written),
        "reparam.dtype": written_dtype,
        "reparam.dynamic_batch": str(dynamic_batch).lower(),
        "reparam.dynamic_hw": str(dynamic_hw).lower(),
        "reparam.input_shapes": json.dumps([list(t.shape) for t in inputs]),
        "reparam.input_tree": tree.to_json() or "",
    }
    structure = _one_level_structure(example_inputs, example_kwargs)
    if structure is not None:  # read by reparam versions before the input tree
        metadata["reparam.input_structure"] = json.dumps(structure)
    set_metadata(proto, metadata)

    notes = [f"TracerWarning: {line}" for line in tracer_warnings]
    dynamic_diffs: list[OutputDiff] = []
    checked: list[Any] = []

    def write(tmp: Path) -> None:
        import onnx  # heavy, optional at import time

        onnx.save(proto, str(tmp))
        if check_dynamic_axes and (dynamic_batch or dynamic_hw):
            say("export: checking the dynamic axes under onnxruntime")
            rtol = FP16_DYNAMIC_CHECK_RTOL if half else dynamic_check.DYNAMIC_CHECK_RTOL
            dynamic_diffs.extend(
                dynamic_check.check_dynamic_axes(
                    flat,
                    tmp,
                    traced,
                    dynamic_batch,
                    dynamic_hw,
                    notes,
                    custom_ops=bool(ops),
                    rtol=rtol,
                )
            )
        if check is not None:
            result = check(tmp)
            checked.append(result)
            if getattr(result, "ok", True) is False:
                summary = getattr(result, "failure_summary", lambda: "the check failed")()
                raise ExportError(f"{summary}; '{path}' was not written")

    atomic_write(path, write)
    if any(op.startswith("com.reparam::") for op in ops):
        notes.append(
            "the graph uses com.reparam custom operators: run it with reparam.runtime and "
            "onnxruntime-extensions (pip install 'reparam[custom-ops]')"
        )
    return ExportReport(
        path=path,
        exporter=exporter,
        opset=opset_written,
        fused=fuse,
        corr=corr,
        input_names=in_names,
        output_names=out_names,
        input_shapes=[value_shape(v) for v in proto.graph.input],
        output_shapes=[value_shape(v) for v in proto.graph.output],
        node_counts=Counter(op_name(n) for n in proto.graph.node),
        custom_ops=ops,
        file_size=path.stat().st_size,
        metadata=metadata,
        seconds=time.perf_counter() - started,
        fuse_report=fuse_report,
        dynamic_check=dynamic_diffs,
        notes=notes,
        dtype=written_dtype,
        check=checked[0] if checked else None,
    )


def _dtype_name(inputs: tuple[Tensor, ...]) -> str:
    floating = [t.dtype for t in inputs if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def _one_level_structure(example_inputs: Any, example_kwargs: Any) -> list[int | None] | None:
    """The older metadata form, when the arguments fit it (tensors and lists of tensors)."""
    if example_kwargs:
        return None
    try:
        return flatten_inputs(example_inputs)[1]
    except (UserInputError, TypeError):
        return None


def _check_options(
    opset: int | None,
    corr: str,
    exporter: str,
    inputs: tuple[Tensor, ...],
    dynamic_hw: bool,
    dtype: torch.dtype | None,
    fp32_io: bool,
) -> int | None:
    if exporter not in EXPORTERS:
        raise UserInputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if corr not in CORR_EXPORT_MODES:
        raise UserInputError(f"corr must be one of {', '.join(CORR_EXPORT_MODES)}, got {corr!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UserInputError(
            f"dtype must be one of {', '.join(f'torch.{n}' for n in DTYPES.values())}, got {dtype}"
        )
    if fp32_io and dtype != torch.float16:
        raise UserInputError("fp32_io applies to a float16 export: give dtype=torch.float16")
    if opset is not None:
        allowed = supported_opsets(exporter)
        if opset not in allowed:
            hint = " (the legacy exporter goes lower)" if exporter == "dynamo" else ""
            raise UserInputError(
                f"opset {opset} is not supported by the {exporter} exporter: use "
                f"{allowed.start} to {allowed.stop - 1}{hint}"
            )
    if dynamic_hw and not any(t.dim() >= 3 for t in inputs):
        raise UserInputError("dynamic_hw needs an input with spatial axes (rank 3 or more)")
    return opset


def _run_model(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], flat: Sequence[Tensor],
    what: str,
) -> Any:  # fmt: skip
    """``model(*args, **kwargs)`` without gradients; a failure becomes a UserInputError."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as error:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in flat)
        raise UserInputError(
            f"{what} does not run on input shape(s) {shapes}: {summarize(error)}"
        ) from None


def _count_outputs(outputs: Any) -> int:
    try:
        return len(flatten_outputs(outputs))
    except TypeError as error:
        raise ExportError(f"cannot export the model's output: {error}") from None


def _names(names: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if names is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    names = list(names)
    if len(names) != count or len(set(names)) != count:
        raise UserInputError(f"give {count} distinct {stem} names, got {names}")
    return names
