"""Export a (fused) model to ONNX, checked, with metadata, written atomically.

:func:`export_onnx` fuses the model, exports it with torch's torch.export-based exporter
(or, on request, the legacy TorchScript one), runs ``onnx.checker.check_model(full_check=True)``
and shape inference, and embeds metadata. Dynamic axes are checked rather than trusted: the
graph is run under onnxruntime at a second batch size and, with ``dynamic_hw``, at twice the
example's height and width, and compared with the model. Some operators silently bake the
example's size into the graph — ``nn.AdaptiveAvgPool2d((k, k))`` becomes a fixed
AveragePool, a reshape by ``int(sqrt(L))`` a fixed Reshape (REFERENCE.md §3) — and such a
graph is refused with :class:`ExportError` instead of written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam._io import atomic_write
from reparam._version import __version__
from reparam.compare import OutputDiff, compare_outputs
from reparam.convert import FuseReport, fuse_with_report
from reparam.errors import ExportError, ReparamError, UserInputError

__all__ = [
    "CORR_EXPORT_MODES",
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
DYNAMO_MIN_OPSET = 18  # the exporter's own opset; below it needs lossy version conversion
DYNAMIC_CHECK_RTOL = 1e-3  # a baked-in size gives errors of order 1, not 1e-6
MAX_MESSAGE = 300


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote."""

    path: Path
    exporter: str
    opset: int
    fused: bool
    corr: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[tuple[int | str, ...]]
    output_shapes: list[tuple[int | str, ...]]
    node_counts: Counter
    custom_ops: list[str]
    file_size: int
    metadata: dict[str, str]
    seconds: float
    fuse_report: FuseReport | None = None
    dynamic_check: list[OutputDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def node_total(self) -> int:
        return sum(self.node_counts.values())


def supported_opsets(exporter: str = "dynamo") -> range:
    """The opset versions :func:`export_onnx` accepts for ``exporter``."""
    import onnx
    from torch.onnx import _constants

    if exporter == "legacy":
        return range(_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)
    return range(DYNAMO_MIN_OPSET, onnx.defs.onnx_opset_version() + 1)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    fuse: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    corr: str = "standard",
    exporter: str = "dynamo",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    source: str | None = None,
) -> ExportReport:
    """Export ``model`` to an ONNX file at ``path``.

    Args:
        model: the model, in training form (it is fused on a copy) or already fused.
        path: the ``.onnx`` file to write; replaced atomically, untouched on failure.
        example_inputs: one tensor or a sequence of tensors (one per model input).
        fuse: fuse every block and Conv→BN pair first (:func:`reparam.fuse`).
        opset: ONNX opset version; default torch's. See :func:`supported_opsets`.
        dynamic_batch: make axis 0 of every input and output symbolic.
        dynamic_hw: also make the spatial axes (2 and up) of every input symbolic.
        corr: how ``reparam.ops.corr`` (DRConv) is exported: "standard" ONNX operators
            (any runtime, dynamic batch) or "custom", one ``com.reparam::Corr`` node per call
            (needs onnxruntime-extensions to run; see :mod:`reparam.runtime`).
        exporter: "dynamo" (torch.export-based, the default) or "legacy" (TorchScript,
            deprecated by torch; a fallback).
        input_names, output_names: graph names; default "input"/"output", numbered when
            there are several.
        source: what the model is (e.g. a bundled name), for the metadata.

    Returns:
        An :class:`ExportReport`.

    Raises:
        UserInputError: bad option, or the model does not run on ``example_inputs``.
        ExportError: the exporter fails, or a dynamic axis would make a wrong graph.
        FusionError: a block cannot be fused.
    """
    started = time.perf_counter()
    inputs, structure = flatten_inputs(example_inputs)
    opset = _check_options(opset, corr, exporter, inputs, dynamic_hw)
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UserInputError(f"output file '{path}' should end in .onnx")

    with _eval_mode(model):
        outputs = _run_model(model, unflatten_inputs(inputs, structure), inputs, "the model")
    n_outputs = _count_outputs(outputs)
    fuse_report = None
    if fuse:
        target, fuse_report = fuse_with_report(model)
    else:
        target = copy.deepcopy(model).eval()
    if any(entry is not None for entry in structure):
        target = _FlatArgs(target, structure).eval()
    in_names = _names(input_names, len(inputs), "input")
    out_names = _names(output_names, n_outputs, "output")

    # torch.export specialises a size-1 axis to the constant 1: trace a batch of two.
    traced = (
        tuple(torch.cat([t, t]) for t in inputs)
        if dynamic_batch and any(t.dim() and t.shape[0] == 1 for t in inputs)
        else inputs
    )
    proto, tracer_warnings = _export(target, traced, opset, dynamic_batch, dynamic_hw, corr,
                                     exporter, in_names, out_names)  # fmt: skip
    proto = _check_and_infer(proto)
    _check_symbolic_axes(proto, dynamic_batch, dynamic_hw)
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_written != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {opset_written}")

    from reparam.ops.corr_onnx import DOMAIN

    custom_ops = sorted(
        {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    )
    metadata = {
        "reparam.version": __version__,
        "reparam.source": source or f"{type(model).__module__}.{type(model).__qualname__}",
        "reparam.fused": str(bool(fuse)).lower(),
        "reparam.corr": corr,
        "reparam.custom_ops": ",".join(custom_ops),
        "reparam.exporter": exporter,
        "reparam.opset": str(opset_written),
        "reparam.dynamic_batch": str(dynamic_batch).lower(),
        "reparam.dynamic_hw": str(dynamic_hw).lower(),
        "reparam.input_shapes": json.dumps([list(t.shape) for t in inputs]),
        "reparam.input_structure": json.dumps(structure),
    }
    _set_metadata(proto, metadata)

    notes = [f"TracerWarning: {line}" for line in tracer_warnings]
    dynamic_check: list[OutputDiff] = []

    def write(tmp: Path) -> None:
        import onnx

        onnx.save(proto, str(tmp))
        if dynamic_batch or dynamic_hw:
            dynamic_check.extend(
                _check_dynamic_axes(target, tmp, inputs, dynamic_batch, dynamic_hw, notes)
            )

    atomic_write(path, write)
    if any(op.startswith(f"{DOMAIN}::") for op in custom_ops):
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
        input_shapes=[_value_shape(v) for v in proto.graph.input],
        output_shapes=[_value_shape(v) for v in proto.graph.output],
        node_counts=Counter(_op_name(n) for n in proto.graph.node),
        custom_ops=custom_ops,
        file_size=path.stat().st_size,
        metadata=metadata,
        seconds=time.perf_counter() - started,
        fuse_report=fuse_report,
        dynamic_check=dynamic_check,
        notes=notes,
    )


def flatten_inputs(example_inputs: Any) -> tuple[tuple[Tensor, ...], list[int | None]]:
    """Positional arguments → (flat tensors, structure).

    Each argument is a tensor (structure entry ``None``) or a list/tuple of n tensors (entry
    n), as ASFF's ``forward((x2, x1, x0))`` takes. The ONNX graph has one input per tensor.
    """
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    flat: list[Tensor] = []
    structure: list[int | None] = []
    for arg in args:
        if isinstance(arg, Tensor):
            flat.append(arg)
            structure.append(None)
        elif isinstance(arg, list | tuple) and arg and all(isinstance(t, Tensor) for t in arg):
            flat.extend(arg)
            structure.append(len(arg))
        else:
            raise UserInputError(
                "example_inputs must be a tensor or a sequence whose items are tensors or "
                f"sequences of tensors, got an item of type {type(arg).__name__}"
            )
    if not flat:
        raise UserInputError("example_inputs is empty")
    return tuple(flat), structure


def unflatten_inputs(flat: Sequence[Any], structure: Sequence[int | None]) -> list[Any]:
    """Inverse of :func:`flatten_inputs`: the positional arguments for the model."""
    args: list[Any] = []
    position = 0
    for entry in structure:
        if entry is None:
            args.append(flat[position])
            position += 1
        else:
            args.append(list(flat[position : position + entry]))
            position += entry
    return args


class _FlatArgs(nn.Module):
    """Calls the wrapped model with flat tensors regrouped as its arguments."""

    def __init__(self, model: nn.Module, structure: list[int | None]) -> None:
        super().__init__()
        self.model = model
        self.structure = structure

    def forward(self, *flat: Tensor) -> Any:
        return self.model(*unflatten_inputs(flat, self.structure))


def _check_options(
    opset: int | None, corr: str, exporter: str, inputs: tuple[Tensor, ...], dynamic_hw: bool
) -> int | None:
    if exporter not in EXPORTERS:
        raise UserInputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if corr not in CORR_EXPORT_MODES:
        raise UserInputError(f"corr must be one of {', '.join(CORR_EXPORT_MODES)}, got {corr!r}")
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


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's training flag restored after it."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _run_model(model: nn.Module, args: Sequence[Any], flat: Sequence[Tensor], what: str) -> Any:
    """``model(*args)`` without gradients; a shape mismatch becomes a UserInputError."""
    try:
        with torch.no_grad():
            return model(*args)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in flat)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{what} does not run on input shape(s) {shapes}: {first}") from None


def _count_outputs(outputs: Any) -> int:
    from reparam.compare import flatten_outputs

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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[list[str]]:
    """Silence the exporters' chatter; collect the TracerWarnings worth reporting."""
    caught: list[str] = []
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            with contextlib.redirect_stderr(io.StringIO()):
                yield caught
        for record in records:
            if record.category.__name__ == "TracerWarning":
                line = str(record.message).splitlines()[0]
                if line not in caught:
                    caught.append(line)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _corr_context(corr: str) -> contextlib.AbstractContextManager:
    """DRConv's correlation as standard ops, or as the custom op the translation maps."""
    from reparam.ops.corr import corr_mode

    return corr_mode("standard" if corr == "standard" else "op")


def _export(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    opset: int | None,
    dynamic_batch: bool,
    dynamic_hw: bool,
    corr: str,
    exporter: str,
    input_names: list[str],
    output_names: list[str],
) -> tuple[Any, list[str]]:
    from reparam.ops import corr_onnx

    corr_onnx.register_schema()
    try:
        with _quiet_exporter() as tracer_warnings, _corr_context(corr):
            if exporter == "dynamo":
                table = corr_onnx.translation_table() if corr == "custom" else None
                program = torch.onnx.export(
                    model,
                    inputs,
                    None,
                    dynamo=True,
                    verbose=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=_dynamic_shapes(
                        inputs, dynamic_batch, dynamic_hw, isinstance(model, _FlatArgs)
                    ),
                    custom_translation_table=table,
                )
                proto = program.model_proto
            else:
                import onnx

                if corr == "custom":
                    corr_onnx.register_legacy_symbolic()
                # The legacy exporter turns its C++ log on and prints the graph on failures.
                torch._C._jit_set_onnx_log_output_stream("stderr")
                buffer = io.BytesIO()
                torch.onnx.export(
                    model,
                    inputs,
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=_dynamic_axes(
                        inputs, input_names, output_names, dynamic_batch, dynamic_hw
                    ),
                    custom_opsets=(
                        {corr_onnx.DOMAIN: corr_onnx.DOMAIN_VERSION} if corr == "custom" else None
                    ),
                )
                proto = onnx.load_from_string(buffer.getvalue())
    except ReparamError:
        raise
    except Exception as error:
        raise ExportError(_export_failure(error, exporter, dynamic_hw)) from error
    return proto, tracer_warnings


def _dynamic_shapes(
    inputs: tuple[Tensor, ...], dynamic_batch: bool, dynamic_hw: bool, varargs: bool
) -> tuple[Any, ...] | None:
    from torch.export import Dim

    if not (dynamic_batch or dynamic_hw):
        return None
    batch = Dim("batch")
    shapes = []
    for tensor in inputs:
        axes: dict[int, Any] = {}
        if dynamic_batch and tensor.dim() >= 1:
            axes[0] = batch
        if dynamic_hw:
            # DYNAMIC: relations between inputs (ASFF's 2x scales) are inferred, and an
            # axis the model forces to a constant is an error rather than a silent constant.
            axes.update({axis: Dim.DYNAMIC for axis in range(2, tensor.dim())})
        shapes.append(axes)
    # _FlatArgs.forward(*flat) has one parameter holding every input.
    return (tuple(shapes),) if varargs else tuple(shapes)


def _dynamic_axes(
    inputs: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    dynamic_hw: bool,
) -> dict[str, dict[int, str]] | None:
    if not (dynamic_batch or dynamic_hw):
        return None
    axes: dict[str, dict[int, str]] = {}
    for i, (name, tensor) in enumerate(zip(input_names, inputs, strict=True)):
        spec = {0: "batch"} if dynamic_batch else {}
        if dynamic_hw:
            spec.update({axis: f"in{i}_dim{axis}" for axis in range(2, tensor.dim())})
        axes[name] = spec
    for name in output_names:
        axes[name] = {0: "batch"} if dynamic_batch else {}
    return axes


def _export_failure(error: BaseException, exporter: str, dynamic_hw: bool) -> str:
    """One readable line from an exporter failure: the root cause and the model line."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    first = text.splitlines()[0] if text else type(root).__name__
    first = first.split(" [Caused by")[0]
    if len(first) > MAX_MESSAGE:
        first = first[: MAX_MESSAGE - 3] + "..."
    message = f"the {exporter} ONNX exporter failed: {type(root).__name__}: {first}"
    lines = str(error).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("The following call raised this error:") and i + 2 < len(lines):
            message += f" (at {lines[i + 1].strip()}: {lines[i + 2].strip()})"
            break
    if dynamic_hw:
        message += "; the model may not support a dynamic height/width: try without it"
    return message


def _check_and_infer(proto: Any) -> Any:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"the exported graph fails the ONNX checker: {first}") from error


def _set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _value_shape(value: Any) -> tuple[int | str, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    )


def _op_name(node: Any) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _check_symbolic_axes(proto: Any, dynamic_batch: bool, dynamic_hw: bool) -> None:
    """Refuse a graph whose requested dynamic input axes came out as constants."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        axes = ([0] if dynamic_batch and dims else []) + (
            list(range(2, len(dims))) if dynamic_hw else []
        )
        for axis in axes:
            if dims[axis].HasField("dim_value"):
                what = "batch" if axis == 0 else "height/width"
                raise ExportError(
                    f"the exporter fixed axis {axis} of input '{value.name}' to "
                    f"{dims[axis].dim_value}: the model's code depends on that size, so the "
                    f"graph cannot have a dynamic {what}; export with a static {what}"
                )


def _second_inputs(
    inputs: tuple[Tensor, ...], dynamic_batch: bool, dynamic_hw: bool
) -> tuple[Tensor, ...]:
    """Inputs at another batch size and, with ``dynamic_hw``, twice the spatial size."""
    generator = torch.Generator().manual_seed(1)
    second = []
    for tensor in inputs:
        shape = list(tensor.shape)
        if dynamic_batch and shape:
            shape[0] += 1
        if dynamic_hw:
            shape[2:] = [2 * s for s in shape[2:]]
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        second.append(values.to(tensor.device, tensor.dtype))
    return tuple(second)


def _check_dynamic_axes(
    model: nn.Module,
    onnx_path: Path,
    inputs: tuple[Tensor, ...],
    dynamic_batch: bool,
    dynamic_hw: bool,
    notes: list[str],
) -> list[OutputDiff]:
    """Run the graph at other sizes under onnxruntime; refuse it if it disagrees with torch."""
    from reparam.runtime import OnnxModel

    if not all(t.is_floating_point() for t in inputs):
        notes.append("dynamic axes not checked: the model has non-float inputs")
        return []
    second = _second_inputs(inputs, dynamic_batch, dynamic_hw)
    what = "twice the example height/width" if dynamic_hw else "another batch size"
    try:
        with torch.no_grad():
            reference = model(*second)
    except (RuntimeError, ValueError, IndexError) as error:
        first = str(error).strip().splitlines()[0]
        raise ExportError(
            f"cannot check the dynamic axes: the model itself fails at {what} "
            f"({first}); export with static sizes"
        ) from None
    try:
        session = OnnxModel(onnx_path, optimization="disable", providers=["CPUExecutionProvider"])
    except UserInputError as error:
        if "onnxruntime-extensions" not in str(error):
            raise
        notes.append("dynamic axes not checked: onnxruntime-extensions is not installed")
        return []
    try:
        outputs = session.run(*(t.cpu().numpy() for t in second))
        diffs = compare_outputs(reference, [torch.from_numpy(v) for v in outputs.values()])
    except (UserInputError, ValueError) as error:
        raise ExportError(
            f"the exported graph is wrong at {what}: {error}; an operator baked the "
            "example's size into the graph (e.g. nn.AdaptiveAvgPool2d with an output size "
            "other than 1: use reparam.ops.AdaptiveAvgPool2dExact) — export with static sizes"
        ) from None
    for diff, name in zip(diffs, session.output_names, strict=True):
        if not diff.within(DYNAMIC_CHECK_RTOL):
            raise ExportError(
                f"the exported graph is wrong at {what}: output '{name}' max abs error "
                f"{diff.max_abs:.3g}, max rel {diff.max_rel:.3g} (an operator baked the "
                "example's size into the graph); export with static sizes"
            )
    return diffs
