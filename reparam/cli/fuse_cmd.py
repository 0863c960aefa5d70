"""``reparam fuse``: fuse a model, check it on a probe input, write the fused checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from reparam._table import format_table
from reparam.checkpoint import save_fused
from reparam.cli._common import (
    KwargOpt,
    ModelArg,
    SeedOpt,
    ShapeOpt,
    TrustPickleOpt,
    WeightsOpt,
    load_model,
    user_errors,
)
from reparam.errors import ReparamError, UserInputError
from reparam.summary import FuseRun, fuse_and_check


def fuse(
    model: ModelArg,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Fused checkpoint to write [default: MODEL-fused.pt]"),
    ] = None,
    input_shape: ShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    rtol: Annotated[
        float, typer.Option(help="Fail if max|fused − original| / max|original| exceeds this.")
    ] = 1e-4,
    trace: Annotated[
        bool, typer.Option(help="Also fold Conv→BN pairs found by torch.fx tracing.")
    ] = True,
    seed: SeedOpt = 0,
) -> None:
    """Fuse every block and Conv→BN pair of MODEL into plain convs and write the weights.

    Prints blocks fused per type, parameters and conv layers before → after, and the output
    difference on a random probe input. Exits 1 if that difference exceeds --rtol.
    """
    with user_errors():
        loaded = load_model(
            model,
            weights=weights,
            kwargs=kwarg,
            input_shapes=input_shape,
            trust_pickle=trust_pickle,
            seed=seed,
        )
        target = output or Path(re.sub(r"[^\w-]+", "_", loaded.spec.name) + "-fused.pt")
        inputs = [weights] if weights is not None else [Path(model)] if loaded.fused else []
        if any(target.resolve() == path.resolve() for path in inputs):
            raise UserInputError("--output would overwrite the input file; choose another path")
        try:
            run = fuse_and_check(loaded.model, loaded.probe_inputs(seed), trace=trace)
        except ReparamError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # probe does not fit
            first_line = str(error).splitlines()[0]
            raise UserInputError(
                f"running {loaded.spec.name} on input shape(s) {loaded.input_shapes} failed: "
                f"{first_line}"
            ) from None
        typer.echo(render_report(loaded.description, loaded.input_shapes, run))
        if run.max_rel > rtol:
            raise UserInputError(
                f"fused model differs from the original: max rel {run.max_rel:.3g} > rtol "
                f"{rtol:g} (max abs {run.max_abs:.3g}); nothing written"
            )
        save_fused(run.fused, target, loaded.spec, input_shapes=loaded.input_shapes, trace=trace)
        typer.echo(f"wrote {target}")


def render_report(description: str, input_shapes: list[tuple[int, ...]], run: FuseRun) -> str:
    """The text ``reparam fuse`` prints: what was fused, sizes before → after, the check."""
    blocks = sorted(run.report.blocks.items()) or [("(nothing to fuse)", 0)]
    sizes = [
        ("parameters", f"{run.before.parameters:,}", f"{run.after.parameters:,}"),
        ("conv layers", run.before.conv_layers, run.after.conv_layers),
        ("BatchNorm layers", run.before.batchnorms, run.after.batchnorms),
    ]
    shapes = ", ".join("x".join(map(str, shape)) for shape in input_shapes)
    check = [
        ("max abs difference", f"{run.max_abs:.3g}"),
        ("max rel difference (÷ max|output|)", f"{run.max_rel:.3g}"),
        ("min cosine similarity", f"{min(d.cosine for d in run.diffs):.9f}"),
        ("fuse time", f"{run.fuse_seconds * 1000:.1f} ms"),
    ]
    lines = [
        f"reparam fuse: {description}",
        "",
        format_table(["block type", "fused"], blocks),
        "",
        format_table(["", "before", "after"], sizes),
        "",
        format_table([f"probe input {shapes}", "value"], check),
    ]
    if run.report.details:
        lines += ["", "notes:", *(f"  {detail}" for detail in run.report.details)]
    if run.report.traced is False:
        lines += ["", f"note: model does not trace with torch.fx ({run.report.trace_error});"]
        lines += ["      only Conv→BN pairs inside nn.Sequential were folded"]
    return "\n".join(lines)
