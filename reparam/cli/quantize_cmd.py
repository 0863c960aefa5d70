"""``reparam quantize``: static INT8 quantization of an ONNX model, measured against fp32."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from reparam.cli._common import SeedOpt, user_errors
from reparam.cli._output import JsonOpt, Output, ReportOpt


class Method(str, Enum):
    """Calibration methods (onnxruntime's names, lower case)."""

    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


def _parse_batches(text: str) -> tuple[int, ...]:
    from reparam.errors import UserInputError

    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserInputError(f"--batch-sizes '{text}' must be integers like 1,8") from None
    return sizes


def quantize(
    model: Annotated[
        Path, typer.Argument(help="fp32 ONNX model, e.g. written by `reparam export`.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="INT8 ONNX model to write (QDQ format).")
    ],
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            "-c",
            help="Calibration inputs: .npy (one input), .npz (one array per input name) or a "
            "folder of them, samples along axis 0; a fifth is held out to measure accuracy. "
            "Without it: random data, good for smoke tests only.",
        ),
    ] = None,
    per_channel: Annotated[
        bool,
        typer.Option(
            "--per-channel/--per-tensor",
            help="Weight scales per output channel (default; fused weights need it) or one "
            "per tensor.",
        ),
    ] = True,
    method: Annotated[Method, typer.Option(help="Calibration method.")] = Method.minmax,
    report_layers: Annotated[
        bool,
        typer.Option("--report-layers", help="List the layers whose quantization hurts most."),
    ] = False,
    min_cosine: Annotated[
        float | None,
        typer.Option(help="Exit 1 (nothing written) if cosine to fp32 is below this."),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(help="Exit 1 (nothing written) if top-1 agreement is below this (0-1)."),
    ] = None,
    batch_sizes: Annotated[
        str, typer.Option(help="Batch sizes to time fp32 vs INT8 at, one thread.")
    ] = "1,8",
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic", help="Dynamic quantization: refused for conv nets (it slows them)."
        ),
    ] = False,
    as_json: JsonOpt = False,
    report_file: ReportOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Quantize MODEL to INT8 with onnxruntime (static, QDQ, per-channel weights) and report
    file sizes, fp32 vs INT8 latency, and accuracy against the fp32 graph. Exits 1 when a
    --min-cosine / --min-agreement gate fails.
    """
    # The library imports onnx and onnxruntime: imported here so that `reparam --help` does not.
    from reparam._io import check_distinct_paths, prepare_output
    from reparam.quantize import quantize_onnx

    out = Output(as_json, report_file)
    with user_errors():
        # before any work: -o and --report must be two files, neither of them an input
        check_distinct_paths(
            {"-o": output, "--report": report_file},
            {"MODEL": model, "--calibration": calibration},
        )
        if report_file is not None:
            prepare_output(report_file)
        with out.progress() as say:
            say(f"quantizing {model} (calibration, then timing and accuracy against fp32)")
            report = quantize_onnx(
                model,
                output,
                calibration=calibration,
                per_channel=per_channel,
                method=method.value,
                report_layers=report_layers,
                min_cosine=min_cosine,
                min_agreement=min_agreement,
                batch_sizes=_parse_batches(batch_sizes),
                dynamic=dynamic,
                seed=seed,
            )
        width = max(len(key) for key, _ in report.summary())
        for key, value in report.summary():
            out.echo(f"{key.ljust(width)}  {value}")
        out.result(report.to_dict())
        out.wrote(f"wrote {output}")
