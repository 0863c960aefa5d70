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

- :mod:`~reparam.export.shape_ranges`: the valid range of each symbolic axis, from
  torch.export's range constraints, recorded in the metadata;
- :mod:`~reparam.export.tolerances`: :class:`VerifyOptions`, checked once.

The file is staged (:class:`~reparam.export.staging.Staging`): the graph is saved to a
temporary file beside the target, checked there (dynamic axes, then ``verify``: the graph
against the training-time model under onnxruntime, then the caller's ``check``), and only
then renamed over the target. Any failure or interrupt leaves the old file as it was and no
temporary file.
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

from reparam.compare import OutputDiff, flatten_outputs
from reparam.convert import fuse_with_report
from reparam.errors import ExportError, UserInputError, printable, summarize
from reparam.export import dynamic_check
from reparam.export._torch_exporter import run_exporter, trace_with_guards
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
from reparam.export.metadata import dtype_name, export_metadata, one_level_structure, range_notes
from reparam.export.report import ExportReport
from reparam.export.shape_ranges import (
    add_guard_sources,
    guard_flips,
    ranges_from_program,
    relational_guards,
)
from reparam.export.signature import FlatInputs, InputTree, flatten_inputs, unflatten_inputs
from reparam.export.staging import Staging
from reparam.export.tolerances import VerifyOptions
from reparam.export.verify import eval_mode_of, verify_onnx

__all__ = [
    "CORR_EXPORT_MODES",
    "DTYPES",
    "EXPORTERS",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "VerifyOptions",
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


class ExportVerificationError(ExportError):
    """The new graph failed verification; nothing was replaced. ``report`` has the numbers."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


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
    verify: bool | VerifyOptions = False,
    check: Callable[[Path], Any] | None = None,
    check_dynamic_axes: bool | None = None,
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
        fuse: fuse every block and Conv→BN pair first (:func:`reparam.fuse`, probing with the
            example inputs so that a model fx cannot trace folds what ``reparam fuse`` folds).
        opset: ONNX opset version; default torch's. See :func:`supported_opsets`.
        dynamic_batch: make axis 0 of every input and output symbolic (``batch``).
        dynamic_hw: also make the spatial axes (2 and up) of every input symbolic
            (``height``, ``width``). The range of sizes each symbolic axis is valid for is
            read from torch.export and recorded in the metadata (``reparam.shape_ranges``).
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
        verify: verify the new file against ``model`` (the training-time form) under
            onnxruntime before it replaces ``path`` (True: default :class:`VerifyOptions`;
            a float16 graph's tolerances are floored). A failure raises
            :class:`ExportVerificationError` and leaves ``path`` as it was. Its
            :class:`~reparam.export.VerifyReport` is ``report.check``.
        check: called with the temporary file after the checks above; an exception (or a
            falsy ``ok`` attribute of its result) aborts the export likewise. Its result is
            ``report.check`` when ``verify`` is off.
        check_dynamic_axes: run the graph at other sizes (see
            :mod:`~reparam.export.dynamic_check`); default: with a dynamic height/width, and
            with a dynamic batch unless ``verify`` already runs several batch sizes.
        progress: called with a short line before each slow step.

    Returns:
        An :class:`ExportReport`.

    Raises:
        UserInputError: bad option, or the model does not run on the example inputs.
        ExportError: the exporter fails, a dynamic axis would make a wrong graph, a weight
            overflows float16, or the verification or ``check`` fails.
        FusionError: a block cannot be fused.
    """
    started = time.perf_counter()
    say = progress or (lambda line: None)
    tree, inputs = InputTree.from_example(example_inputs, example_kwargs)
    opset = _check_options(opset, corr, exporter, inputs, dynamic_hw, dtype, fp32_io)
    path = _check_path(path)
    half = dtype == torch.float16
    options = _verify_options(verify, half)
    if check_dynamic_axes is None:
        check_dynamic_axes = dynamic_hw or (dynamic_batch and options is None)
    args, kwargs = tree.rebuild(inputs)
    out_names = (
        _legacy_output_names(model, args, kwargs, inputs, output_names)
        if exporter == "legacy"
        else None
    )
    target, fuse_report = _model_to_export(model, fuse, args, kwargs, say)
    flat, graph_inputs = _flat_module(target, tree, inputs, half, fp32_io)
    in_names = _names(input_names, len(graph_inputs), "input")
    traced = _traced_inputs(graph_inputs, dynamic_batch)
    say(f"export: {exporter} exporter")
    proto, tracer_warnings, program = _trace(
        model, flat, traced, (args, kwargs, inputs), opset=opset, dynamic_batch=dynamic_batch,
        dynamic_hw=dynamic_hw, corr=corr, exporter=exporter, input_names=in_names,
        output_names=out_names,
    )  # fmt: skip
    proto, out_names = _name_outputs(proto, output_names)
    say("export: ONNX checker and shape inference")
    proto = check_and_infer(proto, infer=exporter == "legacy")
    opset_written = _opset_written(proto, opset)
    ranges = ranges_from_program(program, in_names) if program is not None else []
    if program is not None and (dynamic_hw or any(r.narrowed for r in ranges)):
        flips = _check_guards(flat, traced, dynamic_batch, dynamic_hw, ranges, in_names)
    else:
        flips = []
    notes = [f"TracerWarning: {line}" for line in tracer_warnings] + range_notes(ranges)
    ops = custom_ops(proto)
    metadata = export_metadata(
        model, source, fuse, corr, ops, exporter, opset_written,
        "float16" if half else dtype_name(graph_inputs), dynamic_batch, dynamic_hw,
        graph_inputs, tree, ranges,
    )  # fmt: skip
    structure = one_level_structure(example_inputs, example_kwargs)
    if structure is not None:  # read by reparam versions before the input tree
        metadata["reparam.input_structure"] = json.dumps(structure)
    set_metadata(proto, metadata)

    dynamic_diffs: list[OutputDiff] = []
    checked: list[Any] = []
    with Staging() as staging:
        tmp = staging.stage(path)
        _save(proto, tmp)
        if check_dynamic_axes and (dynamic_batch or dynamic_hw):
            say("export: checking the dynamic axes under onnxruntime")
            dynamic_diffs = dynamic_check.check_dynamic_axes(
                flat, tmp, traced, dynamic_batch, dynamic_hw, notes, custom_ops=bool(ops),
                rtol=FP16_DYNAMIC_CHECK_RTOL if half else dynamic_check.DYNAMIC_CHECK_RTOL,
                input_names=in_names, ranges=ranges, flips=flips,
            )  # fmt: skip
        if options is not None:
            checked.append(_verify(model, tmp, path, inputs, options, say))
        if check is not None:
            checked.append(_run_check(check, tmp, path))
        staging.commit()
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
        dtype=metadata["reparam.dtype"],
        check=checked[0] if checked else None,
    )


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UserInputError(f"output file '{printable(path)}' should end in .onnx")
    return path


def _verify_options(verify: bool | VerifyOptions, half: bool) -> VerifyOptions | None:
    if verify is False or verify is None:
        return None
    options = VerifyOptions() if verify is True else verify
    if not isinstance(options, VerifyOptions):
        raise UserInputError(f"verify must be a bool or a VerifyOptions, got {verify!r}")
    return options.for_dtype(half)


def _legacy_output_names(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], inputs: Sequence[Tensor],
    output_names: Sequence[str] | None,
) -> list[str]:  # fmt: skip
    """The legacy exporter needs every output name up front: count the outputs by a run.

    The torch.export-based exporter runs the model symbolically, so no eager run is spent
    there (a second of a ResNet-18 export): its output names are set on the graph afterwards.
    """
    with eval_mode_of(model):
        outputs = _run_model(model, args, kwargs, inputs, "the model")
    return _names(output_names, _count_outputs(outputs), "output")


def _model_to_export(
    model: nn.Module, fuse: bool, args: tuple[Any, ...], kwargs: Mapping[str, Any], say: Progress
) -> tuple[nn.Module, Any]:
    """The fused copy (probing with the example where fx cannot trace), or an eval copy."""
    if not fuse:
        return copy.deepcopy(model).eval(), None
    say("export: fusing")
    # Positional examples only: the probe calls model(*example_inputs).
    probe = None if kwargs else tuple(args)
    return fuse_with_report(model, example_inputs=probe)


def _flat_module(
    target: nn.Module, tree: InputTree, inputs: tuple[Tensor, ...], half: bool, fp32_io: bool
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """``forward(*tensors)`` over the model, in float16 where asked; the graph's inputs."""
    if half:
        target = to_float16(target)
    flat: nn.Module = FlatInputs(target, tree).eval()
    if half and fp32_io:
        flat = Float32Boundary(flat).eval()
    elif half:
        inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    return flat, inputs


def _traced_inputs(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[Tensor, ...]:
    """torch.export specialises a size-1 axis to the constant 1: trace a batch of two."""
    if dynamic_batch and any(t.dim() and t.shape[0] == 1 for t in inputs):
        return tuple(torch.cat([t, t]) if t.dim() else t for t in inputs)
    return inputs


def _trace(
    model: nn.Module, flat: nn.Module, traced: tuple[Tensor, ...], example: tuple, **options: Any
) -> tuple[Any, list[str], Any]:
    """:func:`run_exporter`; an exporter failure on inputs the model cannot take says so."""
    try:
        proto, tracer_warnings, program = run_exporter(flat, traced, **options)
        check_symbolic_axes(proto, options["dynamic_batch"], options["dynamic_hw"])
    except ExportError:
        if options["exporter"] == "dynamo":  # not the exporter's trace: the model's failure
            args, kwargs, inputs = example
            with eval_mode_of(model):
                _run_model(model, args, kwargs, inputs, "the model")
        raise
    return proto, tracer_warnings, program


def _check_guards(
    flat: nn.Module, traced: tuple[Tensor, ...], dynamic_batch: bool, dynamic_hw: bool,
    ranges: list[Any], in_names: list[str],
) -> list[Any]:  # fmt: skip
    """Read torch.export's guards (a second, plain trace: the ONNX program lost them).

    A guard comparing two input axes (``H != W``) cannot be recorded as a range: refused.
    Narrowed ranges get the source line of the guard that narrowed them. Returns, for the
    dynamic check, a size on the other side of each guard on one axis (``W % 2 == 0``).
    """
    guarded = trace_with_guards(flat, traced, dynamic_batch, dynamic_hw)
    if guarded is None:
        return []
    relations = relational_guards(guarded, in_names)
    if relations:
        raise ExportError(
            f"the model's code compares input sizes ({relations[0]}): the graph would be "
            "wrong where that comparison turns out the other way; export with static sizes "
            "(--static-hw)"
        )
    add_guard_sources(ranges, guarded, in_names)
    return guard_flips(guarded, in_names, ranges)


def _name_outputs(proto: Any, output_names: Sequence[str] | None) -> tuple[Any, list[str]]:
    if output_names is None:
        names = _names(None, len(proto.graph.output), "output")
        return rename_outputs(proto, names), names
    return proto, _names(output_names, len(proto.graph.output), "output")


def _opset_written(proto: Any, opset: int | None) -> int:
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {written}")
    return written


def _save(proto: Any, tmp: Path) -> None:
    import onnx  # heavy, optional at import time

    try:
        onnx.save(proto, str(tmp))
    except OSError as error:  # a full disk, a quota
        raise UserInputError(f"writing the graph failed: {printable(error)}") from None


def _verify(
    model: nn.Module, tmp: Path, path: Path, inputs: tuple[Tensor, ...], options: VerifyOptions,
    say: Progress,
) -> Any:  # fmt: skip
    """The new file against the training-time model; a failure leaves ``path`` untouched."""
    result = verify_onnx(
        model, tmp, list(inputs), rtol=options.rtol, atol=options.atol,
        batch_sizes=options.batch_sizes, seed=options.seed, progress=say,
        reference_name=options.reference_name,
    )  # fmt: skip
    result.path = path
    if not result.ok:
        raise ExportVerificationError(
            f"'{printable(path)}' was not written: {result.failure_summary()}", result
        )
    return result


def _run_check(check: Callable[[Path], Any], tmp: Path, path: Path) -> Any:
    result = check(tmp)
    if getattr(result, "ok", True) is False:
        summary = getattr(result, "failure_summary", lambda: "the check failed")()
        raise ExportError(f"'{printable(path)}' was not written: {summary}")
    return result


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
