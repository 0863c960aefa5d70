"""``reparam bench``: time blocks and bundled models before and after fusion, write markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reparam._io import atomic_write
from reparam.cli._common import user_errors
from reparam.errors import UserInputError


def _names(text: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; ``"none"`` → ``[]`` (skip); None → None (the defaults)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_output(path: Path) -> None:
    """Fail before minutes of benchmarking, not after, when the report cannot be written."""
    if not path.parent.is_dir():
        raise UserInputError(f"output directory '{path.parent}' does not exist")
    if path.is_dir():
        raise UserInputError(f"output path '{path}' is a directory")


def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Tiny shapes, few repeats, one thread, the small models: seconds."
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also write the markdown report to this file."),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated bundled models, or 'none'. (default: the ImageNet-size "
            "models; with --quick the tiny ones)",
            show_default=False,
        ),
    ] = None,
    blocks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated blocks (e.g. ACBlock,RepVGGBlock), or 'none'. (default: all)",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(min=1, help="Batch size. (default: 8; 2 with --quick)", show_default=False),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Timed rounds per comparison. (default: 10; 5 with --quick)",
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option(
            min=0, help="Untimed rounds first. (default: 2; 1 with --quick)", show_default=False
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Spatial input size of the models. (default: each model's own)",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Intra-op threads for torch and onnxruntime. (default: torch's; 1 with --quick)",
            show_default=False,
        ),
    ] = None,
    onnx: Annotated[
        bool, typer.Option(help="Also export the fused models and time them in onnxruntime.")
    ] = True,
) -> None:
    """Time blocks and bundled models: training-time form vs fused vs plain conv, torch vs ORT.

    Prints a markdown table (medians of interleaved runs, ratios, targets met or missed,
    parameters, multiply-adds, peak memory) and with --output writes it to a file.
    """
    from reparam.bench import run_benchmark

    with user_errors():
        if output is not None:
            _check_output(output)
        report = run_benchmark(
            quick=quick,
            models=_names(models),
            blocks=_names(blocks),
            batch=batch,
            repeats=repeats,
            warmup=warmup,
            size=size,
            threads=threads,
            onnx=onnx,
            progress=lambda line: typer.echo(f"… {line}", err=True),
        )
        typer.echo(report)
        if output is not None:
            atomic_write(output, lambda tmp: tmp.write_text(report, encoding="utf-8"))
            typer.echo(f"wrote {output}")
