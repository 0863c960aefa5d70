"""The one table renderer of reparam's terminal reports, on rich.

:func:`build_table` makes the rich :class:`~rich.table.Table` (first column left-aligned,
the others right-aligned, cells taken literally: ``[red]`` in a model name is text, not
markup). :func:`print_table` prints it on a console where it fits, else as one key/value
table per row, so no line runs past the screen. :func:`format_table` renders the same table
as plain text (for reports that are also written to logs and compared in tests)::

    stage  accuracy
    ------ --------
    fused     98.9%
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Sequence

from rich.box import Box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["build_table", "fits", "format_table", "print_table", "terminal_width"]

# A plain header rule of ASCII dashes, a space between columns, no frame: readable in a log.
_PLAIN = Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)

Cell = Callable[[str], Text | str]


def terminal_width() -> int:
    """The terminal's width (``COLUMNS`` when set), 100 when output is not a terminal."""
    return shutil.get_terminal_size(fallback=(100, 24)).columns


def _literal(cell: str) -> Text:
    return Text(cell)


def build_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    title: str | None = None,
    cell: Cell | None = None,
    box: Box | None = _PLAIN,
) -> Table:
    """A rich table: first column left, others right; ``cell`` styles a cell's text
    (default: the text as it is, never read as rich markup)."""
    style = cell or _literal
    table = Table(
        title=title,
        title_justify="left",
        box=box,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        highlight=False,
    )
    for index, header in enumerate(headers):
        table.add_column(Text(str(header)), justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(style(str(value)) for value in row))
    return table


def _width(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> int:
    """Columns' widest cells plus the two characters between columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(cell_len(row[i]) for row in cells) for i in range(len(headers))]
    return sum(widths) + 2 * (len(widths) - 1)


def fits(console: Console, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> bool:
    """Whether the table is no wider than ``console`` (else :func:`print_table` prints one
    key/value table per row)."""
    return _width(headers, rows) <= console.width


def _key_value_tables(
    headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None, cell: Cell | None
) -> list[Table]:
    """One two-column table per row: its first cell as the title, then header/value lines."""
    style = cell or _literal
    tables = []
    for row in rows:
        first = str(row[0]) if not headers[0] else f"{headers[0]}: {row[0]}"
        label = f"{title}: {first}" if title else first
        table = Table(
            title=Text(label),
            title_justify="left",
            box=None,
            show_header=False,
            pad_edge=False,
            padding=(0, 2, 0, 0),
        )
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        for header, value in zip(headers[1:], row[1:], strict=True):
            table.add_row(Text(f"  {header}"), style(str(value)))
        tables.append(table)
    return tables


def print_table(
    console: Console,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    title: str | None = None,
    cell: Cell | None = None,
    box: Box | None = _PLAIN,
) -> None:
    """Print the table on ``console`` where it fits its width, else one key/value table
    per row (what a narrow terminal can show)."""
    if fits(console, headers, rows):
        console.print(build_table(headers, rows, title=title, cell=cell, box=box))
        return
    for table in _key_value_tables(headers, rows, title, cell):
        console.print(table)
        console.print()


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], width: int | None = None
) -> str:
    """The table as plain text, at most ``width`` columns wide (default: the terminal's).

    When it does not fit, each row becomes a block: its first cell, then ``header  value``
    lines for the other cells.
    """
    width = terminal_width() if width is None else width
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, color_system=None, force_terminal=False, soft_wrap=False
    )
    if _width(headers, rows) <= width:
        console.print(build_table(headers, rows))
        return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
    blocks = []
    key_width = max(cell_len(str(h)) for h in headers[1:]) if len(headers) > 1 else 0
    for row in rows:
        lines = [str(row[0]) if not headers[0] else f"{headers[0]}: {row[0]}"]
        lines += [
            f"  {str(header).ljust(key_width)}  {value}"
            for header, value in zip(headers[1:], row[1:], strict=True)
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
