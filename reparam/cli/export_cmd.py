"""``reparam export``: fuse MODEL, export ONNX (or a torch.export program), verify it.

Parses options and prints; the work is :func:`reparam.export.export_onnx` with
:func:`reparam.export.verify_onnx` run on the temporary file before it replaces anything,
so a graph that fails verification never destroys the previous good file.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

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
    load_model,
    model_arg_kind,
    user_errors,
)
from reparam.cli._output import JsonOpt, Output, ReportOpt
from reparam.cli.verify_cmd import (
    AtolOpt,
    BatchSizesOpt,
    RtolOpt,
    parse_batch_sizes,
    reference_name,
)
from reparam.errors import ExportError, UserInputError

__all__ = ["export"]

# float16 is compared with the float32 training-time model: its 11-bit mantissa gives
# relative errors around 1e-3 on a deep net (measured 2e-4 to 2e-3 on the bundled models).
FP16_RTOL = 1e-2
FP16_ATOL = 1e-3


class CorrMode(str, Enum):
    standard = "standard"
    custom = "custom"


class Exporter(str, Enum):
    dynamo = "dynamo"
    legacy = "legacy"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class Format(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


def export(
    model: ModelArg,
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    kwarg: KwargOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write [default: MODEL.onnx or MODEL.pt2]"),
    ] = None,
    format: Annotated[
        Format,
        typer.Option(
            "--format",
            help="onnx, or pt2: a torch.export program (torch.export.load), checked on reload.",
        ),
    ] = Format.onnx,
    input_shape: ShapeOpt = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset version [default: torch's]")] = None,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch/--static-batch", help="Symbolic batch axis.")
    ] = True,
    dynamic_hw: Annotated[
        bool,
        typer.Option(
            "--dynamic-hw/--static-hw",
            help="Symbolic height/width; refused where the graph would be wrong at other sizes.",
        ),
    ] = False,
    corr: Annotated[
        CorrMode,
        typer.Option(
            help="DRConv's per-sample correlation: standard ONNX ops (any runtime) or one "
            "com.reparam::Corr custom node (needs onnxruntime-extensions)."
        ),
    ] = CorrMode.standard,
    exporter: Annotated[
        Exporter,
        typer.Option(help="torch.export-based exporter, or the deprecated TorchScript one."),
    ] = Exporter.dynamo,
    dtype: Annotated[
        Dtype,
        typer.Option(
            help="Graph precision; float16 is verified against the float32 model with "
            "rtol/atol at least 1e-2/1e-3."
        ),
    ] = Dtype.float32,
    fp32_io: Annotated[
        bool, typer.Option("--fp32-io", help="With --dtype float16: float32 inputs and outputs.")
    ] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also quantize the verified float32 graph to INT8 (onnxruntime, static QDQ).",
        ),
    ] = False,
    int8_output: Annotated[
        Path | None,
        typer.Option("--int8-output", help="INT8 file [default: OUTPUT with -int8 before .onnx]"),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="INT8 calibration samples (.npy, .npz or a folder) [default: random, a smoke "
            "test only]",
        ),
    ] = None,
    fuse: Annotated[bool, typer.Option(help="Fuse blocks and Conv→BN pairs first.")] = True,
    verify: Annotated[
        bool, typer.Option(help="Check the file against the model under onnxruntime.")
    ] = True,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
    batch_sizes: BatchSizesOpt = "1,2,3",
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    model_override: ModelOverrideOpt = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    report: ReportOpt = None,
) -> None:
    """Fuse MODEL, export it to ONNX and verify the file under onnxruntime.

    Prints the graph's inputs and outputs, nodes by operator type, custom operators, file
    size and the verification numbers. The new file is verified before it replaces anything:
    on a failure (exit 1) a previous file at the output path is left as it was.
    """
    import torch

    from reparam._io import prepare_output
    from reparam.export import export_onnx, verify_onnx

    out = Output(as_json, report)
    with user_errors():
        sizes = parse_batch_sizes(batch_sizes)
        half = dtype is Dtype.float16
        model_file = Path(model) if model_arg_kind(model) == "file" else None
        if output is not None:  # before any work: refuse an output that is an input
            prepare_output(output, inputs=(weights, model_file, report))
        if report is not None:
            prepare_output(report, inputs=(weights, model_file, output))
        loaded = load_model(
            model,
            seed=seed,
            weights=weights,
            weights_key=weights_key,
            kwargs=kwarg,
            input_shapes=input_shape,
            trust_pickle=trust_pickle,
            trust_code=trust_code,
            model_override=model_override,
        )
        for note in loaded.notes:
            out.echo(note)
        suffix = ".pt2" if format is Format.pt2 else ".onnx"
        target = output or Path(re.sub(r"[^\w-]+", "_", loaded.spec.name) + suffix)
        if output is None:
            prepare_output(target, inputs=(weights, model_file, report))
        inputs = loaded.probe_inputs(seed)
        if format is Format.pt2:
            _export_pt2(loaded, target, inputs, dynamic_batch, fuse, half, int8, out)
            return
        int8_target = None
        if int8:
            if half:
                raise UserInputError("--int8 quantizes a float32 graph: drop --dtype float16")
            int8_target = int8_output or target.with_name(f"{target.stem}-int8.onnx")
            prepare_output(int8_target, inputs=(weights, model_file, report, target))
        if half:  # float16 rounding: never stricter than what the format can meet
            rtol, atol = max(rtol, FP16_RTOL), max(atol, FP16_ATOL)
        verified: list[Any] = []

        def check(tmp: Path) -> Any:
            result = verify_onnx(
                loaded.model, tmp, inputs, rtol=rtol, atol=atol, batch_sizes=sizes,
                seed=seed, progress=say, reference_name=reference_name(loaded),
            )  # fmt: skip
            result.path = target
            verified.append(result)
            return result

        with out.progress() as say:
            try:
                result = export_onnx(
                    loaded.model,
                    target,
                    inputs,
                    fuse=fuse and not loaded.fused,
                    opset=opset,
                    dynamic_batch=dynamic_batch,
                    dynamic_hw=dynamic_hw,
                    corr=corr.value,
                    exporter=exporter.value,
                    dtype=torch.float16 if half else None,
                    fp32_io=fp32_io,
                    source=loaded.spec.name,
                    check=check if verify else None,
                    # verify runs every batch size: only other heights/widths need this check
                    check_dynamic_axes=dynamic_hw or not verify,
                    progress=say,
                )
            except ExportError:
                if verified:  # the graph was made but failed verification: show the numbers
                    out.echo(verified[0].summary())
                    out.result({"path": str(target), "written": False,
                                "verify": verified[0].to_dict()})  # fmt: skip
                raise
        out.echo(f"reparam export: {loaded.description}")
        out.echo(result.summary())
        if verified:
            out.echo("")
            out.echo(verified[0].summary())
            out.wrote(f"wrote {target}")
        else:
            out.wrote(f"wrote {target} (not verified)")
        data = result.to_dict()
        if int8_target is not None:
            from reparam.quantize import quantize_onnx

            with out.progress() as say:
                say("export: quantizing to INT8")
                quantized = quantize_onnx(target, int8_target, calibration=calibration, seed=seed)
            out.echo(str(quantized))
            out.wrote(f"wrote {int8_target}")
            data["int8"] = quantized.to_dict()
        out.result(data)


def _export_pt2(
    loaded: Any, target: Path, inputs: list[Any], dynamic_batch: bool, fuse: bool, half: bool,
    int8: bool, out: Output,
) -> None:  # fmt: skip
    """``--format pt2``: a torch.export program, checked by :func:`export_pt2` on reload."""
    from reparam.export.pt2 import export_pt2

    if half or int8:
        raise UserInputError("--dtype float16 and --int8 apply to --format onnx")
    with out.progress() as say:
        say("export: torch.export program")
        export_pt2(
            loaded.model, target, inputs, dynamic_batch=dynamic_batch,
            fuse=fuse and not loaded.fused,
        )  # fmt: skip
    out.wrote(f"wrote {target}")
    out.result({"path": str(target), "format": "pt2", "dynamic_batch": dynamic_batch})
