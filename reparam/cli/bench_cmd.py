"""``reparam bench``: time blocks and bundled models before and after fusion.

Tables on the terminal; markdown with ``-o``; the report as JSON with ``--json`` (stdout)
or ``--report FILE``. Progress goes to stderr: a status line on a terminal, one plain line
per stage when piped, so a log shows where the time went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from reparam._io import atomic_write
from reparam.cli._common import user_errors
from reparam.cli._output import progress as progress_display
from reparam.errors import UserInputError


def _names(text: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; ``"none"`` → ``[]`` (skip); None → None (the defaults)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_output(path: Path) -> None:
    """Fail before minutes of benchmarking, not after, when a file cannot be written."""
    if not path.parent.is_dir():
        raise UserInputError(f"output directory '{path.parent}' does not exist")
    if path.is_dir():
        raise UserInputError(f"output path '{path}' is a directory")


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _bench_formats(
    model: str,
    quick: bool,
    batch: int | None,
    repeats: int | None,
    warmup: int | None,
    size: int | None,
    threads: int | None,
    quiet: bool,
    json_out: bool,
    output: Path | None,
    report_file: Path | None,
) -> None:
    """``--formats MODEL``: the format table (:func:`reparam.bench.formats.bench_formats`)."""
    import json

    from reparam.bench.formats import (
        bench_formats,
        formats_rows,
        headers,
        render_formats_markdown,
    )
    from reparam.models.registry import get_model_info

    get_model_info(model)  # an unknown name: one line listing the choices, before any work
    with progress_display(quiet) as progress:
        report = bench_formats(
            model,
            batch=batch or (2 if quick else 8),
            size=size if size is not None else (32 if quick else None),
            repeats=repeats or (3 if quick else 10),
            warmup=warmup if warmup is not None else (1 if quick else 2),
            threads=threads,
            progress=progress,
        )
    text = json.dumps(report.to_dict(), indent=2)
    if json_out:
        typer.echo(text)
    else:
        from reparam._table import print_table

        print_table(
            Console(), headers(report), formats_rows(report), title=f"formats: {report.model}"
        )
        for note in report.notes:
            typer.echo(f"note: {note}")
    if output is not None:
        _write(output, render_formats_markdown(report))
        typer.echo(f"wrote {output}", err=True)
    if report_file is not None:
        _write(report_file, text)
        typer.echo(f"wrote {report_file}", err=True)


def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Tiny shapes, few repeats, one thread, the small models: seconds."
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the markdown report to this file."),
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print the report as JSON on stdout instead of the tables."),
    ] = False,
    report_file: Annotated[
        Path | None,
        typer.Option("--report", help="Write the report as JSON to this file."),
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
            help="Timed rounds per comparison. (default: 10, 30 for blocks; 5 with --quick)",
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
        bool,
        typer.Option(help="Also time the fused and the unfused models under onnxruntime."),
    ] = True,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")
    ] = False,
    formats: Annotated[
        str | None,
        typer.Option(
            "--formats",
            metavar="MODEL",
            help="Instead: one bundled model in every format (ONNX fp32/fp16/INT8, OpenVINO "
            "fp32/fp16/INT8, .pt2, ExecuTorch): size, latency at batch 1 and --batch, "
            "accuracy against the training-time model.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Time blocks and bundled models: training form vs fused vs plain conv, torch vs ORT.

    Shows tables of medians of interleaved runs, ratios, targets met, missed or noisy,
    parameters, multiply-adds and peak memory.
    """
    from reparam._io import check_distinct_paths
    from reparam.bench import print_tables, render_json, render_markdown, run_suite

    with user_errors():
        check_distinct_paths({"--output": output, "--report": report_file})
        for path in (output, report_file):
            if path is not None:
                _check_output(path)
        if formats is not None:
            _bench_formats(formats, quick, batch, repeats, warmup, size, threads, quiet,
                           json_out, output, report_file)  # fmt: skip
            return
        with progress_display(quiet) as progress:
            report = run_suite(
                quick=quick,
                models=_names(models),
                blocks=_names(blocks),
                batch=batch,
                repeats=repeats,
                warmup=warmup,
                size=size,
                threads=threads,
                onnx=onnx,
                progress=progress,
            )
        if json_out:
            typer.echo(render_json(report))
        else:
            print_tables(report, Console())
        if output is not None:
            _write(output, render_markdown(report))
            typer.echo(f"wrote {output}", err=True)
        if report_file is not None:
            _write(report_file, render_json(report))
            typer.echo(f"wrote {report_file}", err=True)
