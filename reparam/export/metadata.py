"""The metadata an exported graph carries, and the notes on its shape ranges.

Every key is prefixed ``reparam.``: the version, what the model is, how it was exported
(fused, Corr mode, exporter, opset, dtype, dynamic axes), the example's input shapes, the
input tree (how graph inputs regroup into the model's arguments, read by ``verify``) and
the valid range of each symbolic axis (:mod:`reparam.export.shape_ranges`).
"""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor, nn

from reparam._version import __version__
from reparam.errors import UserInputError
from reparam.export.shape_ranges import (
    EQUALITIES_KEY,
    METADATA_KEY,
    AxisRange,
    equalities_to_json,
    ranges_to_json,
)
from reparam.export.signature import InputTree, flatten_inputs

__all__ = ["dtype_name", "export_metadata", "one_level_structure", "range_notes"]


def range_notes(ranges: list[AxisRange]) -> list[str]:
    """One note per axis the model's code restricts: the range, the guard, what to do."""
    notes = []
    for axis_range in ranges:
        where = f"input '{axis_range.input}' axis {axis_range.axis}"
        if axis_range.equals is not None:
            other, other_axis = axis_range.equals
            notes.append(
                f"{where} must equal input '{other}' axis {other_axis}: the model's code ties "
                "the two sizes; the graph refuses other inputs at run time (export with "
                "--static-hw for one fixed size)"
            )
        if not axis_range.narrowed:
            continue
        guard = f" (torch.export guard {axis_range.guards[0]})" if axis_range.guards else ""
        notes.append(
            f"{where} is valid for sizes {axis_range.describe()} only: the model's code "
            f"depends on it{guard}; the range is recorded in the graph and other sizes are "
            "refused at run time (export with --static-hw for one fixed size)"
        )
    return notes


def export_metadata(
    model: nn.Module, source: str | None, fuse: bool, corr: str, ops: list[str], exporter: str,
    opset: int, dtype: str, dynamic_batch: bool, dynamic_hw: bool,
    inputs: tuple[Tensor, ...], tree: InputTree, ranges: list[AxisRange],
) -> dict[str, str]:  # fmt: skip
    metadata = {
        "reparam.version": __version__,
        "reparam.source": source or f"{type(model).__module__}.{type(model).__qualname__}",
        "reparam.fused": str(bool(fuse)).lower(),
        "reparam.corr": corr,
        "reparam.custom_ops": ",".join(ops),
        "reparam.exporter": exporter,
        "reparam.opset": str(opset),
        "reparam.dtype": dtype,
        "reparam.dynamic_batch": str(dynamic_batch).lower(),
        "reparam.dynamic_hw": str(dynamic_hw).lower(),
        "reparam.input_shapes": json.dumps([list(t.shape) for t in inputs]),
        "reparam.input_tree": tree.to_json() or "",
    }
    if ranges:
        metadata[METADATA_KEY] = ranges_to_json(ranges)
        equalities = equalities_to_json(ranges)
        if equalities is not None:
            metadata[EQUALITIES_KEY] = equalities
    return metadata


def dtype_name(inputs: tuple[Tensor, ...]) -> str:
    floating = [t.dtype for t in inputs if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def one_level_structure(example_inputs: Any, example_kwargs: Any) -> list[int | None] | None:
    """The older metadata form, when the arguments fit it (tensors and lists of tensors)."""
    if example_kwargs:
        return None
    try:
        return flatten_inputs(example_inputs)[1]
    except (UserInputError, TypeError):
        return None
