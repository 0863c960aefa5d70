"""Valid sizes of a graph's symbolic axes: read from torch.export, recorded, checked.

torch.export traces with symbolic sizes and records what the traced code assumed about
them: a ``forward`` that branches on ``x.shape[-1] > 32`` is traced down one branch, and the
exported program carries the guard ``s0 > 32`` and the range constraint ``s0 ∈ [33, ∞)``.
Outside that range the graph computes the *other* branch's function wrongly (126% off at
24×24 on such a model), so the range is part of the graph's meaning:

- :func:`ranges_from_program` reads each user input axis's range (and the source line of the
  guards that narrowed it) from an ``ExportedProgram``;
- the exporter records them in the ONNX metadata under :data:`METADATA_KEY`, a JSON object
  ``{"<input name>": {"<axis index>": [min, max]}}`` (``max`` null: no upper bound), and
  the axes torch.export made one size (a ``forward`` that branches on ``H == W`` is traced
  with W = H) under :data:`EQUALITIES_KEY`, ``{"<input>": {"<axis>": ["<input>", axis]}}``;
- :func:`check_shapes` refuses, with one line, an input outside the recorded range; the
  runtime, ``verify`` and ``run`` call it before running the graph. It lives in the runtime
  layer (:mod:`reparam.runtime.range_check`, which readers import without loading the
  exporter) and is re-exported here, where the contract names it.

torch assumes every symbolic size is at least 2 while tracing (0/1 specialisation); a lower
bound of 2 or less is that assumption, not the model's, so it is recorded as 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from reparam.runtime.range_check import (
    EQUALITIES_KEY,
    METADATA_KEY,
    check_shapes,
    parse_ranges,
)
from reparam.size_guards import user_location

__all__ = [
    "EQUALITIES_KEY",
    "METADATA_KEY",
    "AxisRange",
    "GuardFlip",
    "add_guard_sources",
    "check_shapes",
    "equalities_to_json",
    "guard_flips",
    "parse_ranges",
    "ranges_from_program",
    "ranges_to_json",
    "relational_guards",
]

_TRACING_ASSUMPTION = 2  # torch's symbolic sizes are traced as >= 2 whatever the model


@dataclass
class AxisRange:
    """The sizes ``[low, high]`` one symbolic axis is valid for (``high`` None: unbounded).

    ``guards`` holds ``"<condition> (file:line in fn)"`` for every guard of torch's that
    narrowed the range beyond the tracing assumption.
    """

    input: str
    axis: int
    low: int = 1
    high: int | None = None
    guards: list[str] = field(default_factory=list)
    equals: tuple[str, int] | None = None
    """``(input, axis)`` of an earlier axis torch.export made the same size (H == W)."""

    @property
    def narrowed(self) -> bool:
        """Whether the model itself (not torch's tracing) restricts this axis."""
        return self.low > 1 or self.high is not None

    def describe(self) -> str:
        return f"{self.low}..{'' if self.high is None else self.high}"


def _bound(value: Any) -> int | None:
    """A sympy bound as an int; None for an infinite one."""
    if getattr(value, "is_finite", True) is False:  # sympy's oo / torch's int_oo
        return None
    try:
        number = int(value)
    except Exception:  # sympy raises AttributeError for some infinities
        return None
    return number if abs(number) < (1 << 62) else None


def ranges_from_program(program: Any, input_names: list[str]) -> list[AxisRange]:
    """Every symbolic axis of the program's user inputs with its valid range.

    Args:
        program: a ``torch.export.ExportedProgram``.
        input_names: the graph input names, one per user input tensor, in order.

    Returns:
        One :class:`AxisRange` per symbolic axis (an axis whose size is one plain symbol).
    """
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    constraints = {str(symbol): value for symbol, value in program.range_constraints.items()}
    shape_env = None
    found: list[AxisRange] = []
    first: dict[str, tuple[str, int]] = {}  # symbol → the first axis that has it
    for name, placeholder in zip(input_names, user_inputs, strict=False):
        node = placeholders.get(placeholder)
        value = node.meta.get("val") if node is not None else None
        if value is None or not hasattr(value, "shape"):
            continue
        shape_env = shape_env or getattr(getattr(value, "fake_mode", None), "shape_env", None)
        for axis, size in enumerate(value.shape):
            symbol = str(size)
            if symbol not in constraints:  # a constant, or an expression of other axes
                continue
            bounds = constraints[symbol]
            low = _bound(bounds.lower)
            low = 1 if low is None or low <= _TRACING_ASSUMPTION else low
            found.append(AxisRange(name, axis, low, _bound(bounds.upper)))
            if symbol in first:  # one size for two axes: the model's code ties them
                found[-1].equals = first[symbol]
            else:
                first[symbol] = (name, axis)
    _attach_guards(found, shape_env, input_names, program)
    return found


def _attach_guards(
    ranges: list[AxisRange], shape_env: Any, input_names: list[str], program: Any
) -> None:
    """Each narrowed axis's guards with their source line, where torch kept them."""
    if shape_env is None or not any(r.narrowed for r in ranges):
        return
    symbols: dict[str, AxisRange] = {}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name, placeholder in zip(input_names, program.graph_signature.user_inputs, strict=False):
        value = placeholders[placeholder].meta.get("val")
        for axis_range in ranges:
            if axis_range.input == name and value is not None:
                symbols[str(value.shape[axis_range.axis])] = axis_range
    for guard in getattr(shape_env, "guards", []):
        expression = getattr(guard, "expr", None)
        names = {str(s) for s in getattr(expression, "free_symbols", ())}
        for symbol in names & set(symbols):
            axis_range = symbols[symbol]
            if axis_range.narrowed:
                where = user_location(guard)
                if where is None:  # torch's own guard, not the model's branch
                    continue
                # the tracer's symbol (s87) means nothing to the user: name the axis instead
                condition = re.sub(rf"\b{symbol}\b", f"shape[{axis_range.axis}]", str(expression))
                axis_range.guards.append(f"{condition} at {where}")


def add_guard_sources(ranges: list[AxisRange], program: Any, input_names: list[str]) -> None:
    """Copy the guards (with source lines) of another trace's narrowed axes onto ``ranges``."""
    traced = {(r.input, r.axis): r for r in ranges_from_program(program, input_names)}
    for axis_range in ranges:
        other = traced.get((axis_range.input, axis_range.axis))
        if other is not None and not axis_range.guards:
            axis_range.guards = list(other.guards)


def _axis_symbols(program: Any, input_names: list[str]) -> dict[str, str]:
    """``{tracer symbol: "input 'x' axis 2"}`` for every plain-symbol input axis."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    names: dict[str, str] = {}
    for name, placeholder in zip(input_names, program.graph_signature.user_inputs, strict=False):
        value = placeholders[placeholder].meta.get("val")
        for axis, size in enumerate(getattr(value, "shape", ())):
            names.setdefault(str(size), f"input '{name}' axis {axis}")
    return names


def relational_guards(program: Any, input_names: list[str]) -> list[str]:
    """Guards that compare two input axes (``H != W``, ``H > W``), with their source line.

    A range cannot express them and the graph is wrong where the comparison flips, so the
    exporter refuses such a dynamic axis. (Two axes torch made *equal* are one symbol, not
    a guard: :attr:`AxisRange.equals` records those.)
    """
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    value = placeholders[-1].meta.get("val") if placeholders else None
    shape_env = getattr(getattr(value, "fake_mode", None), "shape_env", None)
    axes = _axis_symbols(program, input_names)
    found = []
    for guard in getattr(shape_env, "guards", []):
        expression = getattr(guard, "expr", None)
        symbols = sorted({str(s) for s in getattr(expression, "free_symbols", ())} & set(axes))
        where = user_location(guard)
        # torch's own guards (memory-format checks and the like) are not the model's code
        if len(symbols) < 2 or where is None:
            continue
        condition = str(expression)
        for symbol in symbols:
            condition = re.sub(rf"\b{symbol}\b", f"({axes[symbol]})", condition)
        found.append(f"{condition} at {where}")
    return found


@dataclass
class GuardFlip:
    """A size of one input axis, inside its range, where one of the model's guards is false.

    The graph holds the guard's true side only: running it there shows whether it is wrong.
    """

    input: str
    axis: int
    size: int
    guard: str


def guard_flips(program: Any, input_names: list[str], ranges: list[AxisRange]) -> list[GuardFlip]:
    """For each guard of the model's code on one axis (``W % 2 == 0``), a size that flips it.

    Sizes near the example's (±1, ±2, ±3, half, twice plus one) inside the axis's recorded
    range are tried; the first where the guard is false is returned. Guards that only bound
    the range never flip inside it.
    """
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    value = placeholders[-1].meta.get("val") if placeholders else None
    shape_env = getattr(getattr(value, "fake_mode", None), "shape_env", None)
    if shape_env is None:
        return []
    where_of = {}  # symbol → (input, axis)
    by_place = {n.name: n for n in placeholders}
    for name, placeholder in zip(input_names, program.graph_signature.user_inputs, strict=False):
        tensor = by_place[placeholder].meta.get("val")
        for axis, size in enumerate(getattr(tensor, "shape", ())):
            where_of.setdefault(str(size), (name, axis))
    bounds = {(r.input, r.axis): (r.low, r.high) for r in ranges}
    # the example's size of each symbol (newer torch: backed_var_to_val; var_to_val warns)
    hints = getattr(shape_env, "backed_var_to_val", None)
    if hints is None:
        hints = getattr(shape_env, "var_to_val", {})
    examples = {str(k): int(v) for k, v in hints.items()}
    flips = []
    for guard in getattr(shape_env, "guards", []):
        expression = getattr(guard, "expr", None)
        symbols = [s for s in getattr(expression, "free_symbols", ()) if str(s) in where_of]
        location = user_location(guard)
        if len(symbols) != 1 or location is None or str(symbols[0]) not in examples:
            continue
        (symbol,) = symbols
        name, axis = where_of[str(symbol)]
        low, high = bounds.get((name, axis), (1, None))
        example = examples[str(symbol)]
        candidates = [example + d for d in (1, -1, 2, -2, 3, -3)] + [example // 2, 2 * example + 1]
        for size in candidates:
            if size < low or (high is not None and size > high):
                continue
            try:
                holds = bool(expression.xreplace({symbol: size}))
            except (TypeError, ValueError):  # not decidable by substitution: skip the guard
                break
            if not holds:
                text = re.sub(rf"\b{symbol}\b", f"shape[{axis}]", str(expression))
                flips.append(GuardFlip(name, axis, size, f"{text} at {location}"))
                break
    return flips


def equalities_to_json(ranges: list[AxisRange]) -> str | None:
    """The :data:`EQUALITIES_KEY` value: ``{"<input>": {"<axis>": ["<input>", axis]}}``."""
    table: dict[str, dict[str, list[Any]]] = {}
    for axis_range in ranges:
        if axis_range.equals is not None:
            table.setdefault(axis_range.input, {})[str(axis_range.axis)] = list(axis_range.equals)
    return json.dumps(table, sort_keys=True) if table else None


def ranges_to_json(ranges: list[AxisRange]) -> str:
    """The metadata value: ``{"<input>": {"<axis>": [low, high or null]}}``."""
    table: dict[str, dict[str, list[int | None]]] = {}
    for axis_range in ranges:
        table.setdefault(axis_range.input, {})[str(axis_range.axis)] = [
            axis_range.low,
            axis_range.high,
        ]
    return json.dumps(table, sort_keys=True)
