"""The reader's side of ``reparam.shape_ranges``: refuse inputs outside a graph's valid sizes.

The exporter (:mod:`reparam.export.shape_ranges`) records, in the ONNX metadata under
:data:`METADATA_KEY`, the sizes each symbolic input axis is valid for, as a JSON object
``{"<input name>": {"<axis index>": [min, max]}}`` (``max`` null: no upper bound). Outside
that range a graph traced down one side of a shape-dependent branch computes the other
side's function wrongly, so readers (runtime sessions, ``verify``, ``run``) call
:func:`check_shapes` before running it. It also checks :data:`EQUALITIES_KEY`: axes traced
as one size (a model branching on ``H == W`` is exported for square inputs only). This
module needs nothing but the error types, so the runtime layer imports it without loading
the exporter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from reparam.errors import UserInputError, printable

__all__ = ["EQUALITIES_KEY", "METADATA_KEY", "check_shapes", "parse_ranges"]

METADATA_KEY = "reparam.shape_ranges"
# Axes the graph was traced with as one size (e.g. W = H): {"<input>": {"<axis>": [input, axis]}}
EQUALITIES_KEY = "reparam.shape_equalities"


def parse_ranges(text: str) -> dict[str, dict[int, tuple[int, int | None]]]:
    """The metadata value back as ``{input: {axis: (low, high)}}``; malformed → UserInputError."""
    try:
        table = json.loads(text)
        parsed: dict[str, dict[int, tuple[int, int | None]]] = {}
        for name, axes in table.items():
            parsed[str(name)] = {}
            for axis, (low, high) in axes.items():
                if not isinstance(low, int) or not (high is None or isinstance(high, int)):
                    raise TypeError("bounds must be integers or null")
                parsed[str(name)][int(axis)] = (low, high)
        return parsed
    except (ValueError, TypeError, AttributeError) as error:
        raise UserInputError(
            f"the graph's {METADATA_KEY} metadata is malformed ({printable(error)}); "
            "re-export the model"
        ) from None


def check_shapes(model_metadata: Mapping[str, str], inputs: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse an input whose size on a symbolic axis is outside the graph's valid range.

    Args:
        model_metadata: the ONNX model's ``metadata_props`` as a dict (no
            :data:`METADATA_KEY` entry: nothing to check).
        inputs: ``{input name: shape}`` of the arrays about to be run.

    Raises:
        UserInputError: one line naming input, axis, size and the valid range.
    """
    _check_equalities(model_metadata.get(EQUALITIES_KEY), inputs)
    text = model_metadata.get(METADATA_KEY)
    if not text:
        return
    for name, axes in parse_ranges(text).items():
        shape = inputs.get(name)
        if shape is None:
            continue
        for axis, (low, high) in sorted(axes.items()):
            if axis >= len(shape):
                continue
            size = int(shape[axis])
            if size < low or (high is not None and size > high):
                valid = f"{low} to {high}" if high is not None else f"{low} or more"
                raise UserInputError(
                    f"input '{printable(name)}' axis {axis} has size {size}; the graph is valid "
                    f"for sizes {valid} only (the model's code depends on that size: re-export "
                    "with static sizes at the size you need)"
                )


def _check_equalities(text: str | None, inputs: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse inputs whose tied axes (:data:`EQUALITIES_KEY`) differ in size."""
    if not text:
        return
    try:
        table = json.loads(text)
        pairs = [
            (str(name), int(axis), str(other), int(other_axis))
            for name, axes in table.items()
            for axis, (other, other_axis) in axes.items()
        ]
    except (ValueError, TypeError, AttributeError) as error:
        raise UserInputError(
            f"the graph's {EQUALITIES_KEY} metadata is malformed ({printable(error)}); "
            "re-export the model"
        ) from None
    for name, axis, other, other_axis in pairs:
        shape, other_shape = inputs.get(name), inputs.get(other)
        if shape is None or other_shape is None:
            continue
        if axis >= len(shape) or other_axis >= len(other_shape):
            continue
        if int(shape[axis]) != int(other_shape[other_axis]):
            raise UserInputError(
                f"input '{printable(name)}' axis {axis} has size {int(shape[axis])}; the graph "
                f"needs it equal to input '{printable(other)}' axis {other_axis} "
                f"({int(other_shape[other_axis])}): the model's code ties the two sizes "
                "(re-export with static sizes at the size you need)"
            )
