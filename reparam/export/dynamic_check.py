"""Dynamic axes checked, not trusted: run the graph at other sizes and compare with torch.

Some operators silently bake the example's size into the graph — ``nn.AdaptiveAvgPool2d(k)``
with k > 1 becomes a fixed AveragePool under the torch.export-based exporter, a reshape by
``int(sqrt(L))`` a fixed Reshape — so a graph exported with a symbolic batch or height/width
is run under onnxruntime at another batch size (and twice the example's height and width)
and refused with :class:`~reparam.errors.ExportError` when it disagrees with the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from reparam.compare import OutputDiff, compare_outputs
from reparam.errors import ExportError, MissingCustomOpError, UserInputError, summarize

__all__ = ["DYNAMIC_CHECK_RTOL", "check_dynamic_axes", "other_size_inputs"]

DYNAMIC_CHECK_RTOL = 1e-3  # a baked-in size gives errors of order 1, not 1e-6


def other_size_inputs(
    inputs: tuple[Tensor, ...], dynamic_batch: bool, dynamic_hw: bool
) -> tuple[Tensor, ...]:
    """Inputs at another batch size and, with ``dynamic_hw``, twice the spatial size.

    ``inputs`` are those the graph was traced with; the other batch is one smaller (one
    larger from a batch of one), the cheapest size that still differs from the traced one.
    """
    generator = torch.Generator().manual_seed(1)
    second = []
    for tensor in inputs:
        shape = list(tensor.shape)
        if dynamic_batch and shape:
            shape[0] = shape[0] - 1 if shape[0] > 1 else 2
        if dynamic_hw:
            shape[2:] = [2 * s for s in shape[2:]]
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        second.append(values.to(tensor.device, tensor.dtype))
    return tuple(second)


def _extensions_missing(custom: bool) -> bool:
    """True when the graph has custom operators and onnxruntime-extensions is not installed."""
    if not custom:
        return False
    from reparam.ops.corr_ort import custom_ops_library  # imports onnxruntime-extensions

    try:
        custom_ops_library()
    except (MissingCustomOpError, UserInputError):  # it raises only for a missing library
        return True
    return False


def check_dynamic_axes(
    model: nn.Module,
    onnx_path: Path,
    inputs: tuple[Tensor, ...],
    dynamic_batch: bool,
    dynamic_hw: bool,
    notes: list[str],
    *,
    custom_ops: bool = False,
    rtol: float = DYNAMIC_CHECK_RTOL,
) -> list[OutputDiff]:
    """Run the graph at other sizes under onnxruntime; refuse it if it disagrees with torch.

    ``model`` takes the flat graph inputs (``forward(*tensors)``); ``inputs`` are those the
    graph was traced with. Notes say why a check was skipped.

    Raises:
        ExportError: the graph is wrong at the other size, or the model fails there.
    """
    from reparam.runtime import OnnxModel

    if not all(t.is_floating_point() for t in inputs):
        notes.append("dynamic axes not checked: the model has non-float inputs")
        return []
    if _extensions_missing(custom_ops):
        notes.append("dynamic axes not checked: onnxruntime-extensions is not installed")
        return []
    second = other_size_inputs(inputs, dynamic_batch, dynamic_hw)
    what = "twice the example height/width" if dynamic_hw else "another batch size"
    try:
        with torch.no_grad():
            reference = model(*second)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ExportError(
            f"cannot check the dynamic axes: the model itself fails at {what} "
            f"({summarize(error)}); export with static sizes"
        ) from None
    session = OnnxModel(onnx_path, optimization="disable", providers=["CPUExecutionProvider"])
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
        if not diff.within(rtol):
            raise ExportError(
                f"the exported graph is wrong at {what}: output '{name}' max abs error "
                f"{diff.max_abs:.3g}, max rel {diff.max_rel:.3g} (an operator baked the "
                "example's size into the graph); export with static sizes"
            )
    return diffs
