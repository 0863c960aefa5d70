"""The ``reparam`` command line (typer)."""

from reparam.cli.app import app, main

__all__ = ["app", "main"]
