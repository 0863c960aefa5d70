"""``reparam export``: fuse MODEL, export ONNX (or .pt2, OpenVINO IR, ExecuTorch), verify it.

Parses options and prints; the work is :func:`reparam.export.export_onnx` with its
``verify`` option (the new file is verified before it replaces anything). Every path the
command writes is checked against the others and against its inputs before any work, the
calibration data of ``--int8`` is read and checked before the export, and all outputs are
staged as temporary files and renamed together at the end
(:class:`reparam.export.staging.Staging`): a failure or a signal anywhere replaces nothing.
"""

from __future__ import annotations

import re
from dataclasses import replace
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
from reparam.errors import UserInputError, printable

__all__ = ["export"]

_PACKAGE = Path(__file__).resolve().parents[1]
# A format whose module (another part of reparam) is not in this tree is not offered.
_OPTIONAL_FORMATS = {"openvino": "runtime/openvino.py", "executorch": "export/executorch.py"}
_SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "openvino": ".xml", "executorch": ".pte"}


class CorrMode(str, Enum):
    standard = "standard"
    custom = "custom"


class Exporter(str, Enum):
    dynamo = "dynamo"
    legacy = "legacy"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


Format = Enum(  # type: ignore[misc]
    "Format",
    {
        name: name
        for name in _SUFFIXES
        if name not in _OPTIONAL_FORMATS or (_PACKAGE / _OPTIONAL_FORMATS[name]).is_file()
    },
    type=str,
)


def export(
    model: ModelArg,
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    kwarg: KwargOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write [default: MODEL.onnx, .pt2, …]"),
    ] = None,
    format: Annotated[
        Format,
        typer.Option(
            "--format",
            help="onnx; pt2: a torch.export program (torch.export.load), checked on reload"
            + ("; openvino: IR .xml + .bin" if "openvino" in Format.__members__ else "")
            + ("; executorch: .pte (XNNPACK)" if "executorch" in Format.__members__ else "")
            + ".",
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
            help="Symbolic height/width; the sizes the model's code allows are recorded and "
            "checked, and a graph wrong at other sizes is refused.",
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
            "-c",
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
    from reparam.export.tolerances import VerifyOptions

    out = Output(as_json, report)
    with user_errors():
        kind, half = format.value, dtype is Dtype.float16
        _check_options(kind, half, fp32_io, int8, int8_output, calibration, dynamic_hw)
        _check_onnx_only(kind, opset, corr, exporter)
        # tolerances and batch sizes checked by the library, before any work
        options = VerifyOptions(rtol=rtol, atol=atol, batch_sizes=parse_batch_sizes(batch_sizes))
        model_file = Path(model) if model_arg_kind(model) == "file" else None
        reads = {"MODEL": model_file, "--weights": weights, "--calibration": calibration}
        _check_paths(kind, output, int8_output if int8 else None, report, reads)
        loaded = load_model(
            model, seed=seed, weights=weights, weights_key=weights_key, kwargs=kwarg,
            input_shapes=input_shape, trust_pickle=trust_pickle, trust_code=trust_code,
            model_override=model_override,
        )  # fmt: skip
        for note in loaded.notes:
            out.echo(note)
        target = output or Path(re.sub(r"[^\w-]+", "_", loaded.spec.name) + _SUFFIXES[kind])
        int8_target = _int8_target(target, int8_output) if int8 and kind == "onnx" else None
        _check_paths(kind, target, int8_target, report, reads)
        inputs = loaded.probe_inputs(seed)
        calibration_data = None
        if int8 and calibration is not None:  # read (once: a FIFO reads once) and checked
            calibration_data = _read_calibration(calibration, inputs, dynamic_batch, dynamic_hw)
        settings = {
            "fuse": fuse and not loaded.fused, "opset": opset, "dynamic_batch": dynamic_batch,
            "dynamic_hw": dynamic_hw, "corr": corr.value, "exporter": exporter.value,
            "fp32_io": fp32_io, "source": loaded.spec.name,
        }  # fmt: skip
        options = replace(options, seed=seed, reference_name=reference_name(loaded))
        if kind == "pt2":
            _export_pt2(loaded, target, inputs, dynamic_batch, settings["fuse"], out)
        elif kind == "executorch":
            _export_executorch(loaded, target, inputs, dynamic_batch, out)
        else:
            _export_onnx_family(
                kind, loaded, target, int8_target, inputs, settings, half, verify, options,
                calibration_data, seed, out, int8,
            )  # fmt: skip


def _check_options(
    kind: str, half: bool, fp32_io: bool, int8: bool, int8_output: Path | None,
    calibration: Path | None, dynamic_hw: bool = False,
) -> None:  # fmt: skip
    """Option combinations that cannot work, refused before anything is read."""
    if kind in ("pt2", "executorch") and dynamic_hw:  # it was ignored: a static program
        raise UserInputError(
            f"--dynamic-hw does not apply to --format {kind}: the program is exported for "
            "the probe's height and width (-s); use --format onnx or openvino for symbolic "
            "sizes"
        )
    if kind in ("pt2", "executorch") and (half or int8 or fp32_io):
        raise UserInputError(
            f"--dtype float16, --fp32-io and --int8 do not apply to --format {kind}"
        )
    if int8 and half:
        raise UserInputError("--int8 quantizes a float32 graph: drop --dtype float16")
    if not int8 and (int8_output is not None or calibration is not None):
        raise UserInputError("--int8-output and --calibration apply with --int8")
    if int8_output is not None and int8_output.suffix.lower() != ".onnx":
        raise UserInputError(f"--int8-output '{printable(int8_output)}' should end in .onnx")
    if kind == "openvino" and (fp32_io or int8_output is not None):
        raise UserInputError(
            "--fp32-io and --int8-output do not apply to --format openvino (with --int8 the "
            "IR holds the INT8 graph)"
        )


def _check_onnx_only(kind: str, opset: int | None, corr: CorrMode, exporter: Exporter) -> None:
    """--opset, --corr custom and --exporter legacy shape the ONNX graph only: refused with
    --format pt2 / executorch rather than ignored (those programs always hold DRConv's
    correlation in standard ops, and no ONNX exporter runs)."""
    if kind not in ("pt2", "executorch"):
        return
    given = [
        flag
        for flag, set_ in (
            (f"--opset {opset}", opset is not None),
            ("--corr custom", corr is not CorrMode.standard),
            (f"--exporter {exporter.value}", exporter is not Exporter.dynamo),
        )
        if set_
    ]
    if given:
        raise UserInputError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to ONNX graphs "
            f"only, not to --format {kind} (its program holds DRConv's correlation in "
            "standard ops): drop it, or use --format onnx or openvino"
        )


def _int8_target(target: Path, int8_output: Path | None) -> Path:
    if int8_output is not None:
        return int8_output
    return target.with_name(f"{target.stem}-int8.onnx")


def _check_paths(
    kind: str, target: Path | None, int8_target: Path | None, report: Path | None,
    reads: dict[str, Any],
) -> None:  # fmt: skip
    """Every output distinct from the others and from every input, each writable."""
    from reparam._io import check_distinct_paths, prepare_output

    if target is not None and target.suffix.lower() != _SUFFIXES[kind]:
        raise UserInputError(
            f"output file '{printable(target)}' should end in {_SUFFIXES[kind]} for --format {kind}"
        )
    writes = {"--output": target, "--int8-output": int8_target, "--report": report}
    if kind == "openvino" and target is not None:
        writes["the IR's .bin"] = target.with_suffix(".bin")
    check_distinct_paths(writes, reads)
    for path in writes.values():
        if path is not None:
            prepare_output(path)


def _read_calibration(
    calibration: Path, inputs: list[Any], dynamic_batch: bool, dynamic_hw: bool
) -> Any:
    """The calibration data, read and checked against the graph inputs the export will make."""
    import numpy as np

    from reparam.quantize.calibration import load_calibration
    from reparam.runtime import TensorSpec

    names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    specs = [
        TensorSpec(
            name,
            tuple(
                "batch"
                if axis == 0 and dynamic_batch
                else "size"
                if axis >= 2 and dynamic_hw
                else int(size)
                for axis, size in enumerate(tensor.shape)
            ),
            np.dtype(np.float32),
        )
        for name, tensor in zip(names, inputs, strict=True)
    ]
    return load_calibration(calibration, specs)


def _export_onnx_family(
    kind: str, loaded: Any, target: Path, int8_target: Path | None, inputs: list[Any],
    settings: dict[str, Any], half: bool, verify: bool, options: Any,
    calibration: Any, seed: int, out: Output, int8: bool = False,
) -> None:  # fmt: skip
    """ONNX (and its INT8 twin, or OpenVINO IR from it): all staged, renamed together."""
    import torch

    from reparam.export import export_onnx
    from reparam.export.onnx_export import ExportVerificationError
    from reparam.export.staging import Staging

    with Staging() as staging:
        # The ONNX file is an output itself, or (for OpenVINO) a scratch file beside it.
        onnx_tmp = (
            staging.scratch(target, suffix=".onnx") if kind == "openvino" else staging.stage(target)
        )
        with out.progress() as say:
            try:
                result = export_onnx(
                    loaded.model, onnx_tmp, inputs, progress=say,
                    dtype=torch.float16 if half and kind == "onnx" else None,
                    verify=options if verify else False, **settings,
                )  # fmt: skip
            except ExportVerificationError as failure:  # made, but wrong: show the numbers
                failure.report.path = target
                out.echo(failure.report.summary())
                out.result({"path": str(target), "written": False,
                            "verify": failure.report.to_dict()})  # fmt: skip
                # export_onnx only knows the staged name (.rp-…): name the user's file.
                summary = failure.report.failure_summary()
                raise ExportVerificationError(
                    f"'{printable(target)}' was not written: {summary}", failure.report
                ) from None
        result.path = target
        if result.check is not None:  # for OpenVINO: the ONNX graph it was converted from
            result.check.path = (
                target if kind == "onnx" else Path(f"{target.stem}.onnx (converted to IR)")
            )
        data = result.to_dict()
        quantized, int8_tmp, ir_check = None, None, None
        if int8_target is not None or (kind == "openvino" and int8):
            int8_tmp = (
                staging.scratch(target, suffix=".onnx")
                if int8_target is None
                else staging.stage(int8_target)
            )
            quantized = _quantize(onnx_tmp, int8_tmp, calibration, seed, out)
            quantized.model_path, quantized.output_path = target, int8_target
            data["int8"] = quantized.to_dict()
        if kind == "openvino":  # the IR of the INT8 graph with --int8
            xml_tmp = _convert_openvino(int8_tmp or onnx_tmp, target, half, staging, out)
            data["format"] = "openvino"
            if verify and int8_tmp is None:  # INT8 is measured by the quantizer instead
                ir_check = _verify_openvino(loaded, xml_tmp, target, inputs, options, half, out)
                data["verify_openvino"] = ir_check.to_dict()
        staging.commit()
    _show_onnx(loaded, result, quantized, ir_check, target, int8_target, kind, out)
    out.result(data)


def _verify_openvino(
    loaded: Any, xml_tmp: Path, target: Path, inputs: list[Any], options: Any, half: bool,
    out: Output,
) -> Any:  # fmt: skip
    """The staged IR run by OpenVINO against the model; a failure replaces nothing."""
    from reparam.errors import ExportError
    from reparam.runtime.verify_runtimes import verify_openvino

    options = options.for_dtype(half)  # fp16-compressed weights: the float16 floor
    with out.progress() as say:
        report = verify_openvino(
            loaded.model, xml_tmp, inputs, rtol=options.rtol, atol=options.atol,
            batch_sizes=options.batch_sizes, seed=options.seed, progress=say,
            reference_name=options.reference_name,
        )  # fmt: skip
    report.path = target
    if not report.ok:
        out.echo(report.summary())
        raise ExportError(f"'{printable(target)}' was not written: {report.failure_summary()}")
    return report


def _quantize(source: Path, destination: Path, calibration: Any, seed: int,
              out: Output) -> Any:  # fmt: skip
    from reparam.quantize import quantize_onnx

    with out.progress() as say:
        say("export: quantizing to INT8")
        return quantize_onnx(source, destination, calibration=calibration, seed=seed)


def _convert_openvino(source: Path, target: Path, half: bool, staging: Any, out: Output) -> Path:
    """OpenVINO IR of the staged graph, as staged .xml + .bin (helper: reparam.runtime)."""
    from reparam.runtime.openvino import convert_onnx_to_openvino

    xml_tmp = staging.stage(target, suffix=".xml")
    staging.adopt(xml_tmp.with_suffix(".bin"), target.with_suffix(".bin"))
    with out.progress() as say:
        say("export: converting to OpenVINO IR")
        convert_onnx_to_openvino(source, xml_tmp, compress_to_fp16=half)
    return xml_tmp


def _show_onnx(
    loaded: Any, result: Any, quantized: Any, ir_check: Any, target: Path,
    int8_target: Path | None, kind: str, out: Output,
) -> None:  # fmt: skip
    out.echo(f"reparam export: {loaded.description}")
    out.echo(result.summary())
    for check in (result.check, ir_check):
        if check is not None:
            out.echo("")
            out.echo(check.summary())
    if quantized is not None:
        out.echo(str(quantized))
    if kind == "openvino":
        out.wrote(f"wrote {target} and {target.with_suffix('.bin')} (OpenVINO IR)")
    else:
        out.wrote(f"wrote {target}" + ("" if result.check is not None else " (not verified)"))
    if int8_target is not None:
        out.wrote(f"wrote {int8_target}")


def _export_pt2(
    loaded: Any, target: Path, inputs: list[Any], dynamic_batch: bool, fuse: bool, out: Output
) -> None:
    """``--format pt2``: a torch.export program, checked by :func:`export_pt2` on reload."""
    from reparam.export.pt2 import export_pt2

    with out.progress() as say:
        say("export: torch.export program")
        export_pt2(loaded.model, target, inputs, dynamic_batch=dynamic_batch, fuse=fuse)
    out.wrote(f"wrote {target}")
    out.result({"path": str(target), "format": "pt2", "dynamic_batch": dynamic_batch})


def _export_executorch(
    loaded: Any, target: Path, inputs: list[Any], dynamic_batch: bool, out: Output
) -> None:
    """``--format executorch``: a .pte lowered to XNNPACK (reparam.export.executorch)."""
    from reparam.convert import fuse_with_report
    from reparam.export.executorch import export_executorch

    with out.progress() as say:
        say("export: ExecuTorch program")
        fused = loaded.model
        if not loaded.fused:  # probing with the example, as reparam fuse does
            fused, _ = fuse_with_report(loaded.model, example_inputs=tuple(inputs))
        export_executorch(fused, tuple(inputs), target, dynamic_batch=dynamic_batch, fuse=False)
    out.wrote(f"wrote {target}")
    out.result({"path": str(target), "format": "executorch", "dynamic_batch": dynamic_batch})
