"""Inputs on the other side of a module's own size guards.

A pasted copy may branch on its input's size or batch (``y * 0.5 if x.shape[-1] > 40``).
Fixed probe sizes see one side of such a branch only, so the copy would be adopted and the
fused model be wrong at every size past the threshold. torch.export, run with symbolic
batch and spatial axes, records each branch on a size as a guard (``s1 <= 40``) with the
line of the copy's code that made it. For every guard on one axis, a size where it is false
is looked for among small and round sizes, and a probe of that size (the other axes as in
the first probe) is added: the copy is then compared with the block on both sides.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reparam.errors import FusionError, printable

__all__ = ["ValueBranchError", "flip_inputs"]


class ValueBranchError(FusionError):
    """The module's forward branches on its input's values (``if x.mean() > 5``): no probe
    can show every side, so a conversion of it cannot be checked."""


# Sizes tried for each guard, smallest first (a flip at a small size keeps the probe cheap).
_SIZES = (*range(1, 33), 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 512)
_MAX_ELEMENTS = 1 << 22  # a probe bigger than this (16 MiB of float32) is not run


def flip_inputs(foreign: nn.Module, inputs: tuple) -> list[tuple[tuple, str]]:
    """Inputs (with a label) at sizes that flip ``foreign``'s own single-axis size guards
    traced on ``inputs`` (one tensor, batch first, channels second).

    Empty when the module does not export (nothing known) or has no such guard.

    Raises:
        ValueBranchError: the forward branches on its input's values (torch.export cannot
            guard on a data-dependent expression), with the line of the branch.
    """
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 3:
        return []
    example = inputs[0].detach().to(torch.float32)
    program = _export(foreign, example)
    if program is None:
        return []
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder"
                       and n.name == program.graph_signature.user_inputs[0])  # fmt: skip
    value = placeholder.meta.get("val")
    shape_env = getattr(getattr(value, "fake_mode", None), "shape_env", None)
    if shape_env is None:
        return []
    axis_of = {str(size): axis for axis, size in enumerate(value.shape) if axis != 1}
    probes: list[tuple[tuple, str]] = []
    seen: set[tuple[int, int]] = set()
    for guard in getattr(shape_env, "guards", []):
        expression = getattr(guard, "expr", None)
        symbols = [s for s in getattr(expression, "free_symbols", ()) if str(s) in axis_of]
        location = user_location(guard)
        if len(symbols) != 1 or location is None:
            continue
        (symbol,) = symbols
        axis = axis_of[str(symbol)]
        size = _flip(expression, symbol)
        if size is None or (axis, size) in seen:
            continue
        shape = list(example.shape)
        shape[axis] = size
        if torch.Size(shape).numel() > _MAX_ELEMENTS:
            continue
        seen.add((axis, size))
        generator = torch.Generator().manual_seed(size)
        tensor = torch.randn(shape, generator=generator).to(inputs[0].dtype)
        text = re.sub(rf"\b{symbol}\b", f"shape[{axis}]", str(expression))
        label = f"{'×'.join(map(str, shape))} (the other side of {text} at {location})"
        probes.append(((tensor,), label))
    return probes


def _export(foreign: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` of a float32 eval copy with symbolic batch and spatial axes."""
    axes = {axis: torch.export.Dim.DYNAMIC for axis in range(example.dim()) if axis != 1}
    try:
        module = copy.deepcopy(foreign).to(torch.float32).eval()
        with _quiet(), torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes=(axes,))
    except Exception as error:  # a forward torch.export cannot take: only the fixed probes
        if type(error).__name__ == "GuardOnDataDependentSymNode":
            raise ValueBranchError(
                f"its forward branches on its input's values ({_code_line(error)}): no probe "
                "can show every side of that branch, so a conversion of it cannot be checked"
            ) from None
        return None


def _code_line(error: BaseException) -> str:
    """``file:line in fn`` of the innermost frame outside torch in ``error``'s message."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(error))
    outside = [f for f in frames if not str(Path(f[0]).resolve()).startswith(torch_dir)]
    if not outside:
        return "a data-dependent expression"
    filename, line, function = outside[-1]
    return f"{printable(filename)}:{line} in {function}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export's log lines (a failed trace is no news here: the fixed probes remain)."""
    names = ("torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
             "torch._dynamo", "torch.__trace")  # fmt: skip
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),  # its graph dump on a failed guard
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def user_location(guard: Any) -> str | None:
    """``file:line in fn`` of the user's code that made a torch.export ``guard``; None when
    torch itself made it."""
    frame = getattr(getattr(guard, "sloc", None), "framework_loc", None)
    filename = str(getattr(frame, "filename", "") or "")
    if not filename or Path(filename).resolve().is_relative_to(Path(torch.__file__).parent):
        return None
    return f"{filename}:{getattr(frame, 'lineno', '?')} in {getattr(frame, 'name', '?')}"


def _flip(expression: Any, symbol: Any) -> int | None:
    for size in _SIZES:
        try:
            if not bool(expression.xreplace({symbol: size})):
                return size
        except (TypeError, ValueError):  # not decidable by substitution
            return None
    return None
