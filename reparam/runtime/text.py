"""Text for users: names from files made safe to print, shapes and byte sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reparam.errors import printable
from reparam.resources import format_bytes

__all__ = ["format_shape", "format_size", "printable"]


def format_shape(shape: Sequence[Any]) -> str:
    """``2x3x32x32``, or ``(batch, 3, 32, 32)`` when an axis is symbolic."""
    if any(isinstance(d, str) for d in shape):
        return "(" + ", ".join(printable(str(d)) for d in shape) + ")"
    return "x".join(str(d) for d in shape)


format_size = format_bytes  # the name the export reports use
