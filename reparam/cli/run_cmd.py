"""``reparam run``: run an ONNX file under onnxruntime (or OpenVINO), timed.

Parses options and prints; the work is :mod:`reparam.runtime` (:func:`~reparam.runtime.load`,
:class:`~reparam.runtime.openvino.OpenVinoModel`, :func:`~reparam.runtime.read_inputs`,
:func:`~reparam.runtime.run_timed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reparam.cli._common import SeedOpt, check_seed, user_errors
from reparam.cli._output import JsonOpt, Output, ReportOpt
from reparam.cli.verify_cmd import InputOpt, OnnxArg
from reparam.errors import UserInputError, printable

__all__ = ["run"]


def run(
    onnx_file: OnnxArg,
    input: InputOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the outputs to this .npz file.")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="Batch size of the random input.")
    ] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed runs (after one warm-up).")] = 10,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Intra-op threads, at most 4 per CPU [default: all, ≤ 16]"),
    ] = None,
    seed: SeedOpt = 0,
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime",
            help='onnxruntime, or openvino (pip install "reparam[openvino]"; also runs an '
            "OpenVINO .xml).",
        ),
    ] = "onnxruntime",
    as_json: JsonOpt = False,
    report: ReportOpt = None,
) -> None:
    """Run ONNX_FILE under onnxruntime (or OpenVINO) and print output shapes, statistics and
    timing. Inputs outside the sizes the graph was exported for are refused."""
    from reparam._io import check_distinct_paths, prepare_output
    from reparam.cli.app import settings
    from reparam.runtime import load, read_inputs, run_timed, save_outputs, thread_count
    from reparam.runtime.inputs import describe_source

    out = Output(as_json, report)
    with user_errors():
        check_seed(seed)
        if runtime not in ("onnxruntime", "openvino"):
            raise UserInputError(
                f"--runtime '{printable(runtime)}' is not one of onnxruntime, openvino"
            )
        check_distinct_paths(
            {"--output": output, "--report": report}, {"ONNX_FILE": onnx_file, "--input": input}
        )
        if output is not None and output.suffix != ".npz":
            raise UserInputError(f"--output '{output}' should end in .npz")
        if output is not None:
            prepare_output(output, inputs=(onnx_file, input, report))
        if report is not None:
            prepare_output(report, inputs=(onnx_file, input, output))
        if input is not None and batch is not None:
            raise UserInputError("--batch applies to the random input: drop it with --input")
        if runtime == "openvino":
            from reparam.runtime.openvino import OpenVinoModel

            session = OpenVinoModel(onnx_file, threads=threads, quiet=not settings.verbose)
        else:
            session = load(onnx_file, threads=threads, quiet=not settings.verbose)
        if input is not None:
            feeds = session.feeds(read_inputs(input, session.input_names))
        else:
            feeds = session.random_inputs(batch=batch, seed=seed)
        result = run_timed(session, feeds, repeat, source=describe_source(input))
        if threads is not None and thread_count(threads) != threads:
            result.notes.append(f"--threads {threads} capped at {result.threads}")
        out.echo(result.summary())
        if output is not None:
            save_outputs(output, result.outputs)
            out.wrote(f"wrote {output}")
        out.result(result.to_dict())
