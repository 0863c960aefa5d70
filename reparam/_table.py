"""Plain-text tables for terminal reports that fit the terminal.

A table wider than the terminal is printed as one key/value block per row instead, so no
line runs past the screen (and nothing depends on a pager or on rich being able to wrap).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

__all__ = ["format_table", "terminal_width"]


def terminal_width() -> int:
    """The terminal's width (``COLUMNS`` when set), 100 when output is not a terminal."""
    return shutil.get_terminal_size(fallback=(100, 24)).columns


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], width: int | None = None
) -> str:
    """Columns padded to their widest cell; the first column left-aligned, others right.

    When the table is wider than ``width`` (default: the terminal's), each row becomes a
    block: its first cell, then ``header: value`` lines for the other cells.
    """
    width = terminal_width() if width is None else width
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if sum(widths) + 2 * (len(widths) - 1) > width:
        return _blocks(cells[0], cells[1:])

    def line(row: list[str]) -> str:
        rest = zip(row[1:], widths[1:], strict=True)
        parts = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in rest]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _blocks(headers: list[str], rows: list[list[str]]) -> str:
    key_width = max(len(h) for h in headers[1:]) if len(headers) > 1 else 0
    blocks = []
    for row in rows:
        lines = [row[0] if not headers[0] else f"{headers[0]}: {row[0]}"]
        lines += [
            f"  {header.ljust(key_width)}  {value}"
            for header, value in zip(headers[1:], row[1:], strict=True)
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
