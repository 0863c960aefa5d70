"""Dynamic axes checked, not trusted: run the graph at other sizes and compare with torch.

Some operators silently bake the example's size into the graph — ``nn.AdaptiveAvgPool2d(k)``
with k > 1 becomes a fixed AveragePool under the torch.export-based exporter, a reshape by
``int(sqrt(L))`` a fixed Reshape — so a graph exported with a symbolic batch or height/width
is run under onnxruntime at another batch size (and twice the example's height and width)
and refused with :class:`~reparam.errors.ExportError` when it disagrees with the model.

Where torch.export narrowed an axis's valid range (a ``forward`` that branches on the width
is valid only on the traced side of the branch, see :mod:`reparam.export.shape_ranges`), the
graph is also run at both ends of that range; with a dynamic height/width and no narrowed
range, also at half the example's size, which catches a branch the legacy exporter baked in
without a guard. These extra sizes are skipped (with a note) where the PyTorch model itself
does not run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from reparam.compare import OutputDiff, compare_outputs
from reparam.errors import ExportError, MissingCustomOpError, UserInputError, summarize
from reparam.export.shape_ranges import AxisRange, GuardFlip

__all__ = [
    "DYNAMIC_CHECK_RTOL",
    "check_dynamic_axes",
    "guard_flip_inputs",
    "other_size_inputs",
    "range_end_inputs",
]

DYNAMIC_CHECK_RTOL = 1e-3  # a baked-in size gives errors of order 1, not 1e-6


def other_size_inputs(
    inputs: tuple[Tensor, ...],
    dynamic_batch: bool,
    dynamic_hw: bool,
    bounds: dict[tuple[int, int], tuple[int, int | None]] | None = None,
) -> tuple[Tensor, ...]:
    """Inputs at another batch size and, with ``dynamic_hw``, twice the spatial size.

    ``inputs`` are those the graph was traced with; the other batch is one smaller (one
    larger from a batch of one), the cheapest size that still differs from the traced one.
    ``bounds`` (``{(input index, axis): (low, high)}``) keeps each size inside the axis's
    valid range: outside it the graph is refused at run time, not wrong.
    """
    generator = torch.Generator().manual_seed(1)
    second = []
    for index, tensor in enumerate(inputs):
        shape = list(tensor.shape)
        if dynamic_batch and shape:
            shape[0] = shape[0] - 1 if shape[0] > 1 else 2
        if dynamic_hw:
            shape[2:] = [2 * s for s in shape[2:]]
        for axis, size in enumerate(shape):
            low, high = (bounds or {}).get((index, axis), (1, None))
            shape[axis] = max(low, size if high is None else min(size, high))
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        second.append(values.to(tensor.device, tensor.dtype))
    return tuple(second)


def _random_like(shape: list[int], like: Tensor, generator: torch.Generator) -> Tensor:
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    return values.to(like.device, like.dtype)


def range_end_inputs(
    inputs: tuple[Tensor, ...],
    input_names: list[str],
    ranges: list[AxisRange],
    dynamic_hw: bool,
) -> list[tuple[str, tuple[Tensor, ...]]]:
    """Extra sizes to run: both ends of every narrowed range; else half the spatial size.

    Returns ``(what, inputs)`` pairs; ``what`` says which size it is, for messages.
    """
    generator = torch.Generator().manual_seed(2)
    index = {name: i for i, name in enumerate(input_names)}
    extra = []
    for axis_range in ranges:
        position = index.get(axis_range.input)
        if position is None or not axis_range.narrowed:
            continue
        for end in (axis_range.low, axis_range.high):
            if end is None or end == inputs[position].shape[axis_range.axis]:
                continue
            shape = list(inputs[position].shape)
            shape[axis_range.axis] = end
            changed = list(inputs)
            changed[position] = _random_like(shape, inputs[position], generator)
            what = (
                f"input '{axis_range.input}' axis {axis_range.axis} = {end} (an end of its "
                f"valid range {axis_range.describe()})"
            )
            extra.append((what, tuple(changed)))
    if dynamic_hw and not any(r.narrowed for r in ranges):
        halves = []
        for tensor in inputs:
            shape = list(tensor.shape)
            shape[2:] = [max(1, s // 2) for s in shape[2:]]
            halves.append(_random_like(shape, tensor, generator))
        extra.append(("half the example height/width", tuple(halves)))
    return extra


def guard_flip_inputs(
    inputs: tuple[Tensor, ...], input_names: list[str], flips: list[GuardFlip]
) -> list[tuple[str, tuple[Tensor, ...]]]:
    """Inputs on the other side of each of the model's guards (see ``guard_flips``)."""
    generator = torch.Generator().manual_seed(3)
    index = {name: i for i, name in enumerate(input_names)}
    extra = []
    for flip in flips:
        position = index.get(flip.input)
        if position is None:
            continue
        shape = list(inputs[position].shape)
        shape[flip.axis] = flip.size
        changed = list(inputs)
        changed[position] = _random_like(shape, inputs[position], generator)
        what = f"input '{flip.input}' axis {flip.axis} = {flip.size}, where {flip.guard} is false"
        extra.append((what, tuple(changed)))
    return extra


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
    input_names: list[str] | None = None,
    ranges: list[AxisRange] | None = None,
    flips: list[GuardFlip] | None = None,
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
    names = input_names or [f"input_{i}" for i in range(len(inputs))]
    index = {name: i for i, name in enumerate(names)}
    bounds = {(index[r.input], r.axis): (r.low, r.high) for r in ranges or [] if r.input in index}
    second = other_size_inputs(inputs, dynamic_batch, dynamic_hw, bounds)
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
    diffs = _compare_at(session, reference, second, what, rtol)
    extras = range_end_inputs(inputs, names, ranges or [], dynamic_hw)
    extras += guard_flip_inputs(inputs, names, flips or [])
    skipped: list[tuple[str, BaseException]] = []
    for extra_what, extra in extras:
        try:
            with torch.no_grad():
                extra_reference = model(*extra)
        except (RuntimeError, ValueError, IndexError) as error:
            skipped.append((extra_what, error))  # sizes the model itself does not take
            continue
        _compare_at(session, extra_reference, extra, extra_what, rtol)
    if skipped:  # one note: the first such size, and how many there were
        what, error = skipped[0]
        more = f" and {len(skipped) - 1} other size(s)" if len(skipped) > 1 else ""
        notes.append(
            f"dynamic axes not checked at {what}{more}: the PyTorch model itself fails there "
            f"({summarize(error, 160)})"
        )
    return diffs


def _compare_at(
    session: object, reference: object, inputs: tuple[Tensor, ...], what: str, rtol: float
) -> list[OutputDiff]:
    """Run the graph on ``inputs``; refuse it where it disagrees with ``reference``."""
    try:
        outputs = session.run(*(t.cpu().numpy() for t in inputs))  # type: ignore[attr-defined]
        diffs = compare_outputs(reference, [torch.from_numpy(v) for v in outputs.values()])
    except (UserInputError, ValueError) as error:
        raise ExportError(
            f"the exported graph is wrong at {what}; export with static sizes: {error} (an "
            "operator baked the example's size into the graph, e.g. nn.AdaptiveAvgPool2d with "
            "an output size other than 1: use reparam.ops.AdaptiveAvgPool2dExact)"
        ) from None
    for diff, name in zip(diffs, session.output_names, strict=True):  # type: ignore[attr-defined]
        if not diff.within(rtol):
            raise ExportError(
                f"the exported graph is wrong at {what}; export with static sizes "
                f"(--static-hw): output '{name}' max abs error {diff.max_abs:.3g}, max rel "
                f"{diff.max_rel:.3g} (the model's code depends on the input size, or an "
                "operator baked the example's size into the graph)"
            )
    return diffs
