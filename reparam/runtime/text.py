"""Text for users: names from files made safe to print, and byte sizes."""

from __future__ import annotations

__all__ = ["format_size", "printable"]


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\n``), so a tensor name that
    holds a terminal escape sequence cannot recolour, move or clear the user's terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def format_size(num_bytes: float) -> str:
    """``812 B``, ``3.4 KiB``, ``44.6 MiB``, ``1.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
