"""How the export, verify and run commands print: human text, JSON, report files, progress.

- Human output goes to stdout, or to stderr with ``--json`` (stdout then holds only the JSON
  report), and is suppressed by ``-q``.
- ``--report FILE`` writes the same JSON atomically.
- Progress (:func:`progress`, the one progress helper of every command): a transient rich
  display on a terminal (spinner per step, bar per unit); plain ``… step`` lines on stderr
  when stderr is piped, so a log shows where the time went.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from reparam._io import atomic_write
from reparam.cli.app import settings

__all__ = ["JsonOpt", "Output", "Progress", "ReportOpt", "json_safe", "progress"]

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the report as JSON on stdout (human output on stderr)."),
]
ReportOpt = Annotated[
    Path | None, typer.Option("--report", help="Also write the JSON report to this file.")
]


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None, so the JSON is strict (RFC 8259)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class Output:
    """One command's printing, per its ``--json`` and ``--report`` options."""

    def __init__(self, as_json: bool = False, report: Path | None = None) -> None:
        self.as_json = as_json
        self.report = report

    def echo(self, text: str = "") -> None:
        """Human output: stdout, stderr under ``--json``, nothing under ``-q``."""
        if not settings.quiet:
            typer.echo(text, err=self.as_json)

    def wrote(self, text: str) -> None:
        """A "wrote FILE" line: shown even under ``-q``."""
        typer.echo(text, err=self.as_json)

    def result(self, data: dict[str, Any]) -> None:
        """The report: JSON on stdout with ``--json``, and to the ``--report`` file."""
        text = json.dumps(json_safe(data), indent=2, allow_nan=False)
        if self.as_json:
            typer.echo(text)
        if self.report is not None:
            atomic_write(self.report, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """A :class:`Progress` for slow steps (see :func:`progress`); call it with a line."""
        with progress(settings.quiet) as shown:
            yield shown


class Progress:
    """Where a command says what it is doing: ``say(line)`` per step, ``bar(total)`` per unit.

    On a terminal: one rich live display on stderr (a spinner with the current step; a bar
    with a count and the time for :meth:`bar`), finished steps kept above it. Piped: plain
    ``… line`` lines on stderr, one per step and one per unit of a bar (an epoch, say), so a
    log shows where the time went. Quiet: nothing. Calling the object is :meth:`say`.
    """

    def __init__(self, live: Any = None) -> None:
        self._live = live  # a rich Progress on a terminal, None when piped
        self._quiet = False
        self._step: Any = None
        self._last = ""

    def __call__(self, line: str) -> None:
        self.say(line)

    def say(self, line: str) -> None:
        """A new step starts: ``line`` says which."""
        if self._quiet:
            return
        if self._live is None:
            typer.echo(f"… {line}", err=True)
            return
        if self._step is None:
            self._step = self._live.add_task(line, total=None)
        else:
            self._live.console.print(f"… {self._last}", style="dim", highlight=False, markup=False)
            self._live.update(self._step, description=line)
        self._last = line

    @contextmanager
    def bar(self, total: int, label: str) -> Iterator[Callable[..., None]]:
        """``advance(detail="")`` once per unit of ``total``: the bar moves on a terminal,
        one ``… label i/total detail`` line is printed when piped."""
        done = 0
        if self._quiet:
            yield lambda detail="": None
            return
        if self._live is None:

            def advance_line(detail: str = "") -> None:
                nonlocal done
                done += 1
                extra = f" ({detail})" if detail else ""
                typer.echo(f"… {label} {done}/{total}{extra}", err=True)

            yield advance_line
            return
        task = self._live.add_task(label, total=total)

        def advance_bar(detail: str = "") -> None:
            text = f"{label} ({detail})" if detail else label
            self._live.update(task, advance=1, description=text)

        try:
            yield advance_bar
        finally:
            self._live.remove_task(task)


@contextmanager
def progress(quiet: bool = False) -> Iterator[Progress]:
    """The one progress display of every command (see :class:`Progress`).

    A terminal is recognised on stderr (where progress goes, so that stdout stays clean for
    ``--json`` and pipes); the display is transient: it is gone when the step is done.
    """
    if quiet:
        shown = Progress()
        shown._quiet = True
        yield shown
        return
    if not sys.stderr.isatty():
        yield Progress()
        return
    from rich.console import Console  # typer's own dependency
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as live:
        yield Progress(live)
