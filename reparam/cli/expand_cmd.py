"""``reparam expand``: expand a plain model's convs into a family's training-time blocks,
check it computes what the model computes, write a training checkpoint."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated

import typer

from reparam._table import format_table
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

FAMILY_HELP = "Block family: acnet, repvgg, dbb, mobileone or qarepvgg."


def expand(
    model: ModelArg,
    into: Annotated[str, typer.Option("--into", help=FAMILY_HELP, show_default=False)],
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Training checkpoint to write [default: MODEL-FAMILY.pt]"
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="Expand only convs whose path matches this glob (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Leave convs whose path matches this glob alone (repeatable)."),
    ] = None,
    branches: Annotated[
        int, typer.Option(help="MobileOne: parallel KxK branches (the first holds the conv).")
    ] = 2,
    input_shape: ShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    rtol: Annotated[
        float,
        typer.Option(help="Fail if max|expanded − original| / max|original| exceeds this."),
    ] = 1e-5,
    trace: Annotated[
        bool, typer.Option(help="Also find Conv→BN pairs by torch.fx tracing.")
    ] = True,
    seed: SeedOpt = 0,
    weights_key: WeightsKeyOpt = None,
    model_override: ModelOverrideOpt = None,
    trust_code: TrustCodeOpt = False,
    as_json: JsonOpt = False,
    report: ReportOpt = None,
) -> None:
    """Expand MODEL's plain convs into FAMILY's training-time blocks and write the checkpoint.

    Every Conv→BatchNorm pair (and conv with a bias and no BatchNorm) the family can express
    becomes its block, initialised so the model computes exactly what it did; convs left
    alone are listed with the reason. The output is checked on a probe input (exit 1 above
    --rtol). The checkpoint rebuilds with reparam.expansion_checkpoint.load_expanded, which
    runs no code from the file; `reparam fuse` of the trained model gives back MODEL's
    architecture.
    """
    # The library modules import torch: imported here so that `reparam --help` does not.
    from reparam._io import check_distinct_paths, prepare_output
    from reparam.expansion import check_family

    out = Output(as_json, report)
    with user_errors():
        family = check_family(into)
        if not math.isfinite(rtol) or rtol < 0:
            raise UserInputError(f"--rtol must be a finite number >= 0, not {rtol}")
        if not 1 <= branches <= 64:
            raise UserInputError(f"--branches must be from 1 to 64, not {branches}")
        model_file = Path(model) if model_arg_kind(model) == "file" else None
        reads = {"--weights": weights, "MODEL": model_file}
        # Checked before any work: outputs that collide with each other or with an input
        # (links too), and a bad -o, fail at once.
        check_distinct_paths(writes={"-o": output, "--report": report}, reads=reads)
        inputs = [weights, model_file]
        for path in (output, report):
            if path is not None:
                prepare_output(path, inputs=inputs)
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
        stem = re.sub(r"[^\w-]+", "_", loaded.spec.name)[:200]
        target = output or Path(f"{stem}-{family}.pt")
        check_distinct_paths(writes={"-o": target, "--report": report}, reads=reads)
        prepare_output(target, inputs=inputs)
        for note in loaded.notes:
            out.echo(f"note: {note}")
        if loaded.initial_weights:
            out.echo(f"note: {initial_weights_note('expand')}")
        options = {
            "include": list(include) if include else None,
            "exclude": list(exclude) if exclude else None,
            "num_conv_branches": branches,
            "trace": trace,
        }
        with out.progress() as say:
            say(f"expanding {printable(loaded.spec.name)} into {family} and checking it")
            run = _expand_and_check(loaded, family, options, seed)
        out.echo(render_report(loaded.description, family, run))
        passed = run["max_rel"] <= rtol and math.isfinite(run["max_abs"])
        out.result(
            {
                "model": loaded.spec.name,
                "description": loaded.description,
                "family": family,
                "input_shapes": [list(shape) for shape in loaded.input_shapes],
                "rtol": rtol,
                "passed": passed,
                "output": str(target) if passed else None,
                **{key: value for key, value in run.items() if key != "expanded_model"},
            }
        )
        if not math.isfinite(run["max_abs"]):
            raise UserInputError(
                "the outputs on the probe hold NaN or infinity (NaN or infinite weights or BN "
                "statistics?): the expanded model cannot be checked against them; nothing written"
            )
        if not passed:
            raise UserInputError(
                f"expanded model differs from the original: max rel {run['max_rel']:.3g} > "
                f"rtol {rtol:g} (max abs {run['max_abs']:.3g}); nothing written"
            )
        from reparam.expansion_checkpoint import save_expanded

        save_expanded(
            run["expanded_model"],
            target,
            loaded.spec,
            family,
            options=options,
            base="deploy" if loaded.fused else "training",
            input_shapes=loaded.input_shapes,
        )
        out.wrote(f"wrote {printable(target)}")


def _expand_and_check(loaded, family: str, options: dict, seed: int) -> dict:
    """Expand, compare with the original on a probe input, fuse back; the numbers."""
    import torch

    from reparam.compare import compare_outputs
    from reparam.convert import fuse
    from reparam.expansion import expand_with_report
    from reparam.summary import model_stats

    probe = loaded.probe_inputs(seed)
    original = loaded.model.eval()
    expanded, report = expand_with_report(
        original,
        family,
        example_inputs=tuple(probe),
        include=options["include"],
        exclude=options["exclude"],
        num_conv_branches=options["num_conv_branches"],
        trace=options["trace"],
    )
    try:
        with torch.no_grad():
            want = original(*probe)
            diffs = compare_outputs(want, expanded.eval()(*probe))
            # The probe too: a model fx cannot trace has its pairs found on it (as expand did).
            fused_back = fuse(expanded, trace=options["trace"], example_inputs=tuple(probe))
            fused_original = fuse(original, trace=options["trace"], example_inputs=tuple(probe))
    except ReparamError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as error:  # probe does not fit
        raise UserInputError(
            f"running {printable(loaded.spec.name)} on input shape(s) "
            f"{printable(loaded.input_shapes)} failed: {printable(summarize(error))}"
        ) from None
    before, after = model_stats(original), model_stats(expanded)
    back, reference = model_stats(fused_back), model_stats(fused_original)
    same_arch = [type(m).__name__ for m in fused_back.modules()] == [
        type(m).__name__ for m in fused_original.modules()
    ]
    return {
        "expanded_model": expanded.train(),
        "report": report.to_dict(),
        "parameters": {
            "original": before.parameters,
            "expanded": after.parameters,
            "fused_back": back.parameters,
            "original_fused": reference.parameters,
        },
        "conv_layers": {"original": before.conv_layers, "expanded": after.conv_layers},
        "fuses_back_to_original": same_arch and back.parameters == reference.parameters,
        "max_abs": max(d.max_abs for d in diffs),
        "max_rel": max(d.max_rel for d in diffs),
    }


def render_report(description: str, family: str, run: dict) -> str:
    """The text ``reparam expand`` prints: what was expanded, sizes, the check."""
    report, params = run["report"], run["parameters"]
    sizes = [
        ("parameters", f"{params['original']:,}", f"{params['expanded']:,}"),
        ("conv layers", run["conv_layers"]["original"], run["conv_layers"]["expanded"]),
    ]
    check = [
        ("convs expanded", len(report["expanded"])),
        ("convs left alone", len(report["left_alone"])),
        ("max abs difference", f"{run['max_abs']:.3g}"),
        ("max rel difference (÷ max|output|)", f"{run['max_rel']:.3g}"),
        ("fused back", f"{params['fused_back']:,} params"),
        ("original fused", f"{params['original_fused']:,} params"),
        ("same architecture", "yes" if run["fuses_back_to_original"] else "NO"),
    ]
    lines = [
        f"reparam expand: {description} into {family}",
        "",
        format_table(["", "original", "expanded"], sizes),
        "",
        format_table(["probe check", "value"], check),
    ]
    if report["left_alone"]:
        lines += ["", "left alone:"]
        lines += [
            f"  {printable(row['path'])}: {printable(row['reason'])}"
            for row in report["left_alone"]
        ]
    if report["traced"] is False:
        lines += ["", f"note: model does not trace with torch.fx ({report['trace_error']})"]
    return "\n".join(lines)
