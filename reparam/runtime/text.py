"""Text for users: names from files made safe to print, shapes and byte sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reparam.errors import printable

__all__ = ["format_shape", "format_size", "printable"]


def format_shape(shape: Sequence[Any]) -> str:
    """``2x3x32x32``, or ``(batch, 3, 32, 32)`` when an axis is symbolic."""
    if any(isinstance(d, str) for d in shape):
        return "(" + ", ".join(printable(str(d)) for d in shape) + ")"
    return "x".join(str(d) for d in shape)


def format_size(num_bytes: float) -> str:
    """``812 B``, ``3.4 KiB``, ``44.6 MiB``, ``1.2 GiB``."""
    for unit in ("B", "KiB", "MiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"
