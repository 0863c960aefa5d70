"""``reparam demo``: the whole job on a small real data set, in about a minute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reparam.cli._common import SeedOpt, user_errors


def demo(
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where the ONNX files go (created).")
    ] = Path("reparam-demo"),
    epochs: Annotated[int, typer.Option(min=1, max=1000, help="Training epochs.")] = 8,
    seed: SeedOpt = 0,
) -> None:
    """Train a digit classifier built from training-time blocks (ACBlock, RepVGG, DRConv, DBB,
    MobileOne) on scikit-learn's digits, fuse it, export ONNX with both Corr modes, verify
    each graph under onnxruntime, and report accuracy at every stage. Exits 1 if any stage
    disagrees with the trained model.
    """
    import os

    from reparam._io import check_distinct_paths
    from reparam._table import format_table
    from reparam.cli._common import check_seed
    from reparam.cli._output import progress
    from reparam.cli.app import settings
    from reparam.demo import DEMO_FILES, run_demo  # imports torch: only when the demo runs
    from reparam.errors import UserInputError, printable

    with user_errors():
        check_seed(seed)
        shown = printable(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise UserInputError(f"'{shown}' exists and is not a directory")
        # Links inside the folder could make two outputs one file: refused before any work.
        check_distinct_paths({f"output '{name}'": output_dir / name for name in DEMO_FILES})
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # read-only file system, no permission
            raise UserInputError(f"cannot create '{shown}': {error.strerror}") from None
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise UserInputError(f"cannot write to '{shown}': permission denied or read-only")

        with progress(settings.quiet) as shown_progress:
            result = run_demo(
                output_dir,
                epochs=epochs,
                seed=seed,
                progress=lambda total: shown_progress.bar(total, "training: epoch"),
                announce=shown_progress.say,
            )
        rows = [
            (
                stage.stage,
                "-" if stage.accuracy is None else f"{stage.accuracy:.1%}",
                stage.agreement or "-",
                stage.check,
                f"{stage.seconds:.1f} s",
            )
            for stage in result.stages
        ]
        typer.echo("")
        typer.echo(format_table(["stage", "test accuracy", "vs trained", "check", "time"], rows))
        for note in result.notes:
            typer.echo(f"note: {note}")
        for path in result.files:
            typer.echo(f"wrote {printable(path)}")
    if not result.ok:
        typer.echo("error: a stage disagrees with the trained model (see the table)", err=True)
        raise typer.Exit(code=1)
