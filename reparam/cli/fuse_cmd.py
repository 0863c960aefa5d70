"""``reparam fuse``: fuse a model, check it on a probe input, write the fused checkpoint."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from reparam.cli._common import (
    KwargOpt,
    ModelArg,
    ModelOverrideOpt,
    SeedOpt,
    ShapeOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    WeightsKeyOpt,
    WeightsOpt,
    initial_weights_note,
    load_model,
    model_arg_kind,
    user_errors,
)
from reparam.cli._output import JsonOpt, Output, ReportOpt
from reparam.errors import ReparamError, UserInputError, printable, summarize

if TYPE_CHECKING:
    from reparam.summary import FuseRun


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
        float,
        typer.Option(min=0.0, help="Fail if max|fused − original| / max|original| exceeds this."),
    ] = 1e-4,
    trace: Annotated[
        bool, typer.Option(help="Also fold Conv→BN pairs found by torch.fx tracing.")
    ] = True,
    seed: SeedOpt = 0,
    weights_key: WeightsKeyOpt = None,
    model_override: ModelOverrideOpt = None,
    trust_code: TrustCodeOpt = False,
    as_json: JsonOpt = False,
    report: ReportOpt = None,
) -> None:
    """Fuse every block and Conv→BN pair of MODEL into plain convs and write the weights.

    Prints blocks fused per type, parameters and conv layers before → after, and the output
    difference on a random probe input. Exits 1 if that difference exceeds --rtol.
    """
    # The library modules import torch: imported here so that `reparam --help` does not.
    from reparam._io import check_distinct_paths, prepare_output
    from reparam.checkpoint import save_fused
    from reparam.summary import fuse_and_check

    out = Output(as_json, report)
    with user_errors():
        if not math.isfinite(rtol) or rtol < 0:
            raise UserInputError(f"--rtol must be a finite number >= 0, not {rtol}")
        model_file = Path(model) if model_arg_kind(model) == "file" else None
        inputs = [weights, model_file]
        # Checked before any work: outputs that collide with each other or with an input
        # (links too), and a bad -o, fail at once.
        check_distinct_paths(
            {"-o": output, "--report": report}, {"--weights": weights, "MODEL": model_file}
        )
        if output is not None:
            prepare_output(output, inputs=inputs)
        if report is not None:
            prepare_output(report, inputs=inputs)
        loaded = load_model(
            model,
            weights=weights,
            kwargs=kwarg,
            input_shapes=input_shape,
            trust_pickle=trust_pickle,
            seed=seed,
            weights_key=weights_key,
            model_override=model_override,
            trust_code=trust_code,
        )
        target = output or Path(re.sub(r"[^\w-]+", "_", loaded.spec.name)[:200] + "-fused.pt")
        if output is None:
            check_distinct_paths({"-o": target, "--report": report}, {"--weights": weights})
        prepare_output(target, inputs=inputs)
        for note in loaded.notes:
            out.echo(f"note: {note}")
        if loaded.initial_weights:
            out.echo(f"note: {initial_weights_note('fuse')}")
        try:
            with out.progress() as say:
                say(f"fusing {printable(loaded.spec.name)} and checking it on a probe input")
                run = fuse_and_check(loaded.model, loaded.probe_inputs(seed), trace=trace)
        except ReparamError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # probe does not fit
            raise UserInputError(
                f"running {printable(loaded.spec.name)} on input shape(s) "
                f"{printable(loaded.input_shapes)} failed: {printable(summarize(error))}"
            ) from None
        out.echo(render_report(loaded.description, loaded.input_shapes, run))
        passed = run.max_rel <= rtol and math.isfinite(run.max_abs)  # NaN fails too
        out.result(
            {
                "model": loaded.spec.name,
                "description": loaded.description,
                "input_shapes": [list(shape) for shape in loaded.input_shapes],
                "rtol": rtol,
                "passed": passed,
                "output": None if not passed else str(target),
                **run.to_dict(),
            }
        )
        if not math.isfinite(run.max_abs):
            raise UserInputError(
                "the outputs on the probe hold NaN or infinity (NaN or infinite weights or BN "
                "statistics?): a fused model cannot be checked against them; nothing written"
            )
        if not passed:
            raise UserInputError(
                f"fused model differs from the original: max rel {run.max_rel:.3g} > rtol "
                f"{rtol:g} (max abs {run.max_abs:.3g}); nothing written"
            )
        save_fused(
            run.fused,
            target,
            loaded.spec,
            input_shapes=loaded.input_shapes,
            trace=trace,
            probe_seed=seed,
        )
        out.wrote(f"wrote {printable(target)}")


# reparam's own reasons (with a module path or class name inside) run to ~400 characters:
# escaped and bounded, but not cut at printable's 160 meant for a bare user value.
_REASON = 1000


def render_report(description: str, input_shapes: list[tuple[int, ...]], run: FuseRun) -> str:
    """The text ``reparam fuse`` prints: what was fused, sizes before → after, the check."""
    from reparam._table import format_table  # rich: imported when a report is printed

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
        lines += [
            "",
            "notes:",
            *(f"  {printable(detail, _REASON)}" for detail in run.report.details),
        ]
    if run.report.adopted:
        lines += ["", "adopted (your copies of published blocks, checked equal on a probe):"]
        lines += [f"  {printable(entry, _REASON)}" for entry in run.report.adopted]
    if run.report.not_fused:
        lines += ["", "not fused:"]
        lines += [
            f"  {printable(path)}: {printable(why, _REASON)}" for path, why in run.report.not_fused
        ]
    if run.report.traced is False:
        lines += [
            "",
            f"note: model does not trace with torch.fx ({printable(run.report.trace_error)});",
        ]
        if run.report.probed:  # the probe forward saw which conv feeds which BN
            lines += ["      Conv→BN pairs were found by a probe forward on the input instead"]
        else:  # Sequential adjacency alone proves nothing: the forward may not run it whole
            lines += [
                "      no Conv→BN pair is proven without a trace: give -s so a probe finds them"
            ]
            if run.report.probe_error:
                lines += [f"      (the probe forward failed: {printable(run.report.probe_error)})"]
    return "\n".join(lines)
