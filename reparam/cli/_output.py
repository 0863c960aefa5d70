"""How the export, verify and run commands print: human text, JSON, report files, progress.

- Human output goes to stdout, or to stderr with ``--json`` (stdout then holds only the JSON
  report), and is suppressed by ``-q``.
- ``--report FILE`` writes the same JSON atomically.
- Progress: a transient rich status line on a terminal; plain ``… step`` lines on stderr
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

__all__ = ["JsonOpt", "Output", "ReportOpt", "json_safe"]

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
    def progress(self) -> Iterator[Callable[[str], None]]:
        """A ``say(line)`` for slow steps: a rich status on a terminal, plain lines otherwise."""
        if settings.quiet:
            yield lambda line: None
            return
        if sys.stderr.isatty():
            from rich.console import Console  # typer's own dependency

            with Console(stderr=True).status("") as status:
                yield lambda line: status.update(line)
            return
        yield lambda line: typer.echo(f"… {line}", err=True)
