"""One call into torch's ONNX exporters, quiet, with readable dynamic axes and errors.

The torch.export-based exporter (``dynamo=True``) takes ``dynamic_shapes``; the legacy
TorchScript one takes ``dynamic_axes``. Both get the names ``batch``, ``height`` and
``width`` for the symbolic axes, so the graph's inputs read ``(batch, 3, height, width)``
instead of the tracer's ``s53``: torch renames string and ``Dim`` entries of
``dynamic_shapes`` in the ONNX graph (https://pytorch.org/docs/stable/onnx_export.html).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from reparam.errors import ExportError, ReparamError, summarize

__all__ = ["axis_name", "run_exporter", "trace_with_guards"]


def axis_name(input_index: int, axis: int, rank: int) -> str:
    """``batch`` for axis 0; ``height``/``width`` for an image's spatial axes; numbered for
    the second and later inputs, whose sizes may differ (ASFF's three scales)."""
    if axis == 0:
        return "batch"
    spatial = {
        4: {2: "height", 3: "width"},
        3: {2: "length"},
        5: {2: "depth", 3: "height", 4: "width"},
    }
    name = spatial.get(rank, {}).get(axis, f"dim{axis}")
    return name if input_index == 0 else f"{name}_{input_index}"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[list[str]]:
    """Silence the exporters' chatter; collect the TracerWarnings worth reporting."""
    caught: list[str] = []
    # symbolic_shapes: its "Unable to find user code" warning on a data-dependent branch
    # went through torch's own handler, a second line beside the one error line.
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            with (
                contextlib.redirect_stderr(io.StringIO()),
                contextlib.redirect_stdout(io.StringIO()),
            ):
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


def run_exporter(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    *,
    opset: int | None,
    dynamic_batch: bool,
    dynamic_hw: bool,
    corr: str,
    exporter: str,
    input_names: list[str],
    output_names: list[str],
) -> tuple[Any, list[str], Any]:
    """Export ``model(*inputs)`` (a ``forward(*tensors)`` module) to an ``onnx.ModelProto``.

    Returns the proto, the TracerWarnings seen and the ``torch.export.ExportedProgram``
    (None from the legacy exporter), whose range constraints say which sizes the graph is
    valid for (:mod:`reparam.export.shape_ranges`).

    Raises:
        ExportError: the exporter fails; one line with the root cause and the model line.
    """
    from reparam.ops import corr_onnx

    _import_exporter(exporter)
    corr_onnx.register_schema()
    program = None
    try:
        with _quiet_exporter() as tracer_warnings, _corr_context(corr):
            if exporter == "dynamo":
                table = corr_onnx.translation_table() if corr == "custom" else None
                onnx_program = torch.onnx.export(
                    model,
                    inputs,
                    None,
                    dynamo=True,
                    verbose=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch, dynamic_hw),
                    custom_translation_table=table,
                )
                proto, program = onnx_program.model_proto, onnx_program.exported_program
            else:
                proto = _legacy_export(
                    model, inputs, opset, dynamic_batch, dynamic_hw, corr,
                    input_names, output_names,
                )  # fmt: skip
    except ReparamError:
        raise
    except Exception as error:
        _reraise_interrupt(error)
        raise ExportError(_export_failure(error, exporter, dynamic_hw)) from error
    if corr == "custom":
        # Ship Corr's meaning in the file: plain onnxruntime (and any runtime that inlines
        # functions) runs the node; a runtime with a native Corr kernel may use its own.
        corr_onnx.attach_corr_function(proto)
    return proto, tracer_warnings, program


def trace_with_guards(
    model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, dynamic_hw: bool
) -> Any:
    """A plain ``torch.export.export`` of the model, whose shape environment keeps its guards.

    The ONNX exporter's program has been through decompositions, which drop the guards and
    their source lines; this second trace (run only when a range was narrowed) keeps them.
    None when it fails: the source line is a courtesy, the range itself is already known.
    """
    from torch.export import Dim

    shapes = _dynamic_shapes(inputs, dynamic_batch, dynamic_hw)
    if shapes is not None:  # the ONNX exporter's axis names are plain Dim.DYNAMIC here
        shapes = tuple(
            tuple(
                {a: Dim.DYNAMIC if isinstance(d, str) else d for a, d in axes.items()}
                for axes in entry
            )
            for entry in shapes
        )
    try:
        with _quiet_exporter(), _corr_context("standard"), torch.no_grad():
            return torch.export.export(model, inputs, dynamic_shapes=shapes)
    except Exception:  # any failure: no source line, nothing else lost
        return None


def _import_exporter(exporter: str) -> None:
    """Import torch's exporter before the ``try`` that turns its failures into one line.

    Ctrl-C during this import (seconds: onnxscript, the op registry) then reaches the caller
    as the interruption it is; inside the ``try`` a half-done import surfaced later as
    "the dynamo ONNX exporter failed: AttributeError".
    """
    if exporter != "dynamo":
        return
    try:
        import onnxscript  # noqa: F401
        from torch.onnx._internal.exporter import _core  # noqa: F401
    except ImportError:  # reported by the export call itself, with the exporter's words
        pass


def _reraise_interrupt(error: BaseException) -> None:
    """Raise the interrupt (Ctrl-C, the CLI's SIGTERM exception) an exporter error wraps."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if not isinstance(link, Exception):  # KeyboardInterrupt, SystemExit, Terminated
            raise link
        link = link.__cause__ or link.__context__


def _legacy_export(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    opset: int | None,
    dynamic_batch: bool,
    dynamic_hw: bool,
    corr: str,
    input_names: list[str],
    output_names: list[str],
) -> Any:
    import onnx  # heavy, optional at import time

    from reparam.ops import corr_onnx

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
        dynamic_axes=_dynamic_axes(inputs, input_names, output_names, dynamic_batch, dynamic_hw),
        custom_opsets=({corr_onnx.DOMAIN: corr_onnx.DOMAIN_VERSION} if corr == "custom" else None),
    )
    return onnx.load_from_string(buffer.getvalue())


def _dynamic_shapes(
    inputs: tuple[Tensor, ...], dynamic_batch: bool, dynamic_hw: bool
) -> tuple[Any, ...] | None:
    """One axes dict per tensor, for a ``forward(*tensors)`` module (one varargs parameter)."""
    from torch.export import Dim

    if not (dynamic_batch or dynamic_hw):
        return None
    # A named Dim shared by every input: the batch must be one size, and a model that
    # forces it to a constant is an error rather than a silent constant.
    batch = Dim("batch")
    shapes = []
    for index, tensor in enumerate(inputs):
        axes: dict[int, Any] = {}
        if dynamic_batch and tensor.dim() >= 1:
            axes[0] = batch
        if dynamic_hw:
            # A string is Dim.DYNAMIC with a name: relations between inputs (ASFF's 2x
            # scales) are inferred, and the name replaces the tracer's in the graph.
            axes.update(
                {axis: axis_name(index, axis, tensor.dim()) for axis in range(2, tensor.dim())}
            )
        shapes.append(axes)
    return (tuple(shapes),)


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
    for index, (name, tensor) in enumerate(zip(input_names, inputs, strict=True)):
        spec = {0: "batch"} if dynamic_batch else {}
        if dynamic_hw:
            spec.update(
                {axis: axis_name(index, axis, tensor.dim()) for axis in range(2, tensor.dim())}
            )
        axes[name] = spec
    for name in output_names:
        axes[name] = {0: "batch"} if dynamic_batch else {}
    return axes


def _export_failure(error: BaseException, exporter: str, dynamic_hw: bool) -> str:
    """One readable line from an exporter failure: the root cause and the model line."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    first = summarize(root).split(" [Caused by")[0]
    message = f"the {exporter} ONNX exporter failed: {first}"
    lines = str(error).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("The following call raised this error:") and i + 2 < len(lines):
            message += f" (at {lines[i + 1].strip()}: {lines[i + 2].strip()})"
            break
    if dynamic_hw:
        message += "; the model may not support a dynamic height/width: try without it"
    return message
