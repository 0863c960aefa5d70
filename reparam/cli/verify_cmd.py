"""``reparam verify``: an ONNX file against the PyTorch model, in onnxruntime and/or OpenVINO.

Parses options and prints; the work is :func:`reparam.export.verify_onnx` (onnxruntime) and
:func:`reparam.runtime.verify_runtimes.verify_runtimes` (each runtime of ``--runtime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from reparam.cli._common import (
    FactoryOverrideOpt,
    KwargOpt,
    LoadedModel,
    SeedOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    WeightsKeyOpt,
    WeightsOpt,
    initial_weights_note,
    load_model,
    user_errors,
)
from reparam.cli._output import JsonOpt, Output, ReportOpt
from reparam.errors import UserInputError

__all__ = [
    "AtolOpt",
    "BatchSizesOpt",
    "InputOpt",
    "OnnxArg",
    "RtolOpt",
    "RuntimeOpt",
    "parse_batch_sizes",
    "reference_name",
    "verify",
]

OnnxArg = Annotated[Path, typer.Argument(help="The .onnx file.", show_default=False)]
RtolOpt = Annotated[
    float, typer.Option(help="Fail if max|onnx − torch| / max|torch| exceeds this (and atol).")
]
AtolOpt = Annotated[float, typer.Option(help="Fail if max|onnx − torch| exceeds this (and rtol).")]
BatchSizesOpt = Annotated[
    str, typer.Option(help="Batch sizes checked when the graph's batch axis is dynamic.")
]
InputOpt = Annotated[
    Path | None,
    typer.Option(
        "--input",
        "-i",
        help="Input arrays: .npy for a one-input model, or .npz with one array per graph "
        "input (by input name, or in order). Default: random normal of the graph's shape.",
    ),
]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help='Where the graph runs: onnxruntime, openvino (pip install "reparam[openvino]"), '
        "or all.",
    ),
]


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` → ``(1, 2, 3)``; positive integers only."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"--batch-sizes '{text}' must be integers like 1,2,3") from None
    if not sizes or any(size < 1 for size in sizes):
        raise UserInputError(f"--batch-sizes '{text}' must be positive integers")
    return sizes


def reference_name(loaded: LoadedModel) -> str:
    """What the graph is compared with, for the verify summary."""
    if loaded.fused:
        return f"{loaded.description} — the fused model: fusion itself is not checked"
    return f"{loaded.description}, training form in eval mode"


def _static_shapes(session: Any) -> list[tuple[int, ...]] | None:
    try:
        return session.concrete_shapes(batch=1)
    except UserInputError:
        return None


def _shape_session(onnx_file: Path, runtimes: list[str]) -> Any:
    """A session to read the graph's inputs from: the first of ``runtimes`` that loads the
    graph (each runtime's own failure is reported by the check itself)."""
    from reparam.runtime import load

    first: UserInputError | None = None
    for name in runtimes:
        try:
            if name == "onnxruntime":
                return load(onnx_file, optimization="disable")
            from reparam.runtime.openvino import OpenVinoModel

            return OpenVinoModel(onnx_file)
        except UserInputError as error:
            first = first or error
    raise first if first is not None else UserInputError("--runtime names no runtime")


def _model_path(model: str) -> Path | None:
    """The --model value when it names a file (a fused checkpoint), for the path checks."""
    try:
        path = Path(model)
        return path if path.exists() else None
    except (OSError, ValueError):
        return None


def verify(
    onnx_file: OnnxArg,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="The PyTorch model the file came from: a bundled name, package.module:callable "
            "(with --weights), or a fused checkpoint.",
            show_default=False,
        ),
    ],
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    kwarg: KwargOpt = None,
    input: InputOpt = None,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
    batch_sizes: BatchSizesOpt = "1,2,3",
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    factory: FactoryOverrideOpt = None,
    seed: SeedOpt = 0,
    runtime: RuntimeOpt = "onnxruntime",
    as_json: JsonOpt = False,
    report: ReportOpt = None,
) -> None:
    """Compare ONNX_FILE with the PyTorch model; exit 1 on a mismatch.

    Under onnxruntime the graph runs with ORT optimisations disabled and with the defaults;
    under OpenVINO (--runtime openvino or all) it is converted with the custom Corr inlined
    and run in float32. A dynamic batch is checked at each of --batch-sizes. Each runtime's
    errors are reported, and one that cannot run the graph does not stop the others.
    Without --weights the model gets the same randomised BN statistics as `reparam export`
    with the same --seed.
    """
    from reparam._io import check_distinct_paths, prepare_output
    from reparam.export import verify_onnx
    from reparam.runtime import read_inputs
    from reparam.runtime.verify_runtimes import parse_runtimes, verify_runtimes

    out = Output(as_json, report)
    with user_errors():
        runtimes = parse_runtimes(runtime)
        if onnx_file.suffix.lower() == ".xml" and len(runtimes) > 1 and "openvino" in runtimes:
            # an OpenVINO IR (reparam export --format openvino) runs in OpenVINO only; with
            # onnxruntime alone the loader's one line says to use --runtime openvino
            runtimes = ["openvino"]
            out.echo("note: an OpenVINO IR (.xml) runs under OpenVINO only; onnxruntime skipped")
        sizes = parse_batch_sizes(batch_sizes)
        check_distinct_paths(
            {"--report": report},
            {
                "ONNX_FILE": onnx_file,
                "--model": _model_path(model),
                "--weights": weights,
                "--input": input,
            },
        )
        if report is not None:
            prepare_output(report, inputs=(onnx_file, input, weights))
        session = _shape_session(onnx_file, runtimes)
        shapes = session.example_shapes() or _static_shapes(session)
        loaded = load_model(
            model,
            seed=seed,
            weights=weights,
            weights_key=weights_key,
            kwargs=kwarg,
            input_shapes=[",".join(map(str, shape)) for shape in shapes] if shapes else None,
            trust_pickle=trust_pickle,
            trust_code=trust_code,
            model_override=factory,
        )
        if loaded.initial_weights:  # a mismatch then says nothing about the trained model
            out.echo(f"note: {initial_weights_note('verify')}")
        arrays = read_inputs(input, session.input_names) if input is not None else None
        if runtimes != ["onnxruntime"]:
            with out.progress() as say:
                results = verify_runtimes(
                    loaded.model, onnx_file, arrays, runtimes=runtimes, rtol=rtol, atol=atol,
                    batch_sizes=sizes, seed=seed, progress=say,
                    reference_name=reference_name(loaded),
                )  # fmt: skip
            out.echo(results.summary())
            out.result(results.to_dict())
            if not results.ok:
                raise UserInputError(results.failure_summary())
            return
        with out.progress() as say:
            result = verify_onnx(
                loaded.model, onnx_file, arrays, rtol=rtol, atol=atol, batch_sizes=sizes,
                seed=seed, progress=say, reference_name=reference_name(loaded),
            )  # fmt: skip
        out.echo(result.summary())
        out.result(result.to_dict())
        if not result.ok:
            raise UserInputError(result.failure_summary())
