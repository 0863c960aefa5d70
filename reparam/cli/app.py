"""The ``reparam`` typer application: one command per module, registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from reparam._version import __version__
from reparam.cli import bench_cmd, demo_cmd, fuse_cmd

app = typer.Typer(
    name="reparam",
    help="Fuse, export and verify CNNs trained with multi-branch and dynamic blocks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"reparam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Fuse, export and verify CNNs trained with multi-branch and dynamic blocks."""


app.command("fuse")(fuse_cmd.fuse)
app.command("demo")(demo_cmd.demo)
app.command("bench")(bench_cmd.bench)
from reparam.cli import export_cmd  # noqa: E402, F401  (registers export, verify, run)


def main() -> None:
    """Console-script entry point."""
    app()
