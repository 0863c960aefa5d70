"""``reparam export``, ``reparam verify`` and ``reparam run``: ONNX out, checked, and run.

The commands only parse options and print; the work is done by
:func:`reparam.export.export_onnx`, :func:`reparam.export.verify_onnx` and
:mod:`reparam.runtime`. onnx and onnxruntime are imported inside the commands.
"""

from __future__ import annotations

import re
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from reparam._table import format_table
from reparam.cli._common import (
    KwargOpt,
    LoadedModel,
    ModelArg,
    SeedOpt,
    ShapeOpt,
    TrustPickleOpt,
    WeightsOpt,
    load_model,
    user_errors,
)
from reparam.cli.app import app
from reparam.errors import UserInputError

__all__ = ["export", "run", "verify"]


class CorrMode(str, Enum):
    standard = "standard"
    custom = "custom"


class Exporter(str, Enum):
    dynamo = "dynamo"
    legacy = "legacy"


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


@app.command("export")
def export(
    model: ModelArg,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="ONNX file to write [default: MODEL.onnx]"),
    ] = None,
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
    fuse: Annotated[bool, typer.Option(help="Fuse blocks and Conv→BN pairs first.")] = True,
    verify: Annotated[
        bool, typer.Option(help="Check the file against the model under onnxruntime.")
    ] = True,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
    batch_sizes: BatchSizesOpt = "1,2,3",
    trust_pickle: TrustPickleOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Fuse MODEL, export it to ONNX and verify the file under onnxruntime.

    Prints the graph's inputs and outputs, nodes by operator type, custom operators, file
    size and the verification numbers. Exits 1 (and removes the file) if verification fails.
    """
    from reparam.export import export_onnx, verify_onnx

    with user_errors():
        sizes = _parse_batch_sizes(batch_sizes)
        loaded = load_model(
            model,
            seed=seed,
            weights=weights,
            kwargs=kwarg,
            input_shapes=input_shape,
            trust_pickle=trust_pickle,
        )
        target = output or Path(re.sub(r"[^\w-]+", "_", loaded.spec.name) + ".onnx")
        inputs = loaded.probe_inputs(seed)
        report = export_onnx(
            loaded.model,
            target,
            inputs,
            fuse=fuse and not loaded.fused,
            opset=opset,
            dynamic_batch=dynamic_batch,
            dynamic_hw=dynamic_hw,
            corr=corr.value,
            exporter=exporter.value,
            source=loaded.spec.name,
        )
        typer.echo(_render_export(loaded, report))
        if not verify:
            typer.echo(f"wrote {target} (not verified)")
            return
        try:
            result = verify_onnx(
                loaded.model, target, inputs, rtol=rtol, atol=atol, batch_sizes=sizes, seed=seed
            )
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        typer.echo("")
        typer.echo(_render_verify(result, _reference_name(loaded)))
        if not result.ok:
            target.unlink(missing_ok=True)
            raise UserInputError(f"{result.failure_summary()}; {target} removed")
        typer.echo(f"wrote {target}")


@app.command("verify")
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
    kwarg: KwargOpt = None,
    input: InputOpt = None,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
    batch_sizes: BatchSizesOpt = "1,2,3",
    trust_pickle: TrustPickleOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Compare ONNX_FILE with the PyTorch model under onnxruntime; exit 1 on a mismatch.

    The graph runs with ORT optimisations disabled and with the defaults; a dynamic batch
    is checked at each of --batch-sizes. Without --weights the model gets the same
    randomised BN statistics as `reparam export` with the same --seed.
    """
    from reparam.export import verify_onnx
    from reparam.runtime import load

    with user_errors():
        sizes = _parse_batch_sizes(batch_sizes)
        session = load(onnx_file, optimization="disable")
        shapes = session.example_shapes() or _static_shapes(session)
        loaded = load_model(
            model,
            seed=seed,
            weights=weights,
            kwargs=kwarg,
            input_shapes=[",".join(map(str, shape)) for shape in shapes] if shapes else None,
            trust_pickle=trust_pickle,
        )
        arrays = _read_inputs(input, session) if input is not None else None
        result = verify_onnx(
            loaded.model, onnx_file, arrays, rtol=rtol, atol=atol, batch_sizes=sizes, seed=seed
        )
        typer.echo(_render_verify(result, _reference_name(loaded)))
        if not result.ok:
            raise UserInputError(result.failure_summary())


@app.command("run")
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
        int | None, typer.Option(min=1, help="onnxruntime intra-op threads [default: all]")
    ] = None,
    seed: SeedOpt = 0,
) -> None:
    """Run ONNX_FILE under onnxruntime and print output shapes, statistics and timing."""
    from reparam.runtime import load

    with user_errors():
        if output is not None and output.suffix != ".npz":
            raise UserInputError(f"--output '{output}' should end in .npz")
        session = load(onnx_file, threads=threads)
        if input is not None:
            if batch is not None:
                raise UserInputError("--batch applies to the random input: drop it with --input")
            feeds = session.feeds(_read_inputs(input, session))
        else:
            feeds = session.random_inputs(batch=batch, seed=seed)
        outputs = session.run(feeds)
        timings = []
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(feeds)
            timings.append(time.perf_counter() - start)
        typer.echo(_render_run(session, feeds, outputs, timings, input))
        if output is not None:
            from reparam._io import atomic_write

            atomic_write(output, lambda tmp: _save_npz(tmp, outputs))
            typer.echo(f"wrote {output}")


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"--batch-sizes '{text}' must be integers like 1,2,3") from None
    if not sizes or any(size < 1 for size in sizes):
        raise UserInputError(f"--batch-sizes '{text}' must be positive integers")
    return sizes


def _static_shapes(session: Any) -> list[tuple[int, ...]] | None:
    try:
        return session.concrete_shapes(batch=1)
    except UserInputError:
        return None


def _read_inputs(path: Path, session: Any) -> dict[str, np.ndarray]:
    """Arrays for the graph inputs from a .npy (one input) or .npz (by name, or in order)."""
    if not path.is_file():
        raise UserInputError(f"input file '{path}' does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UserInputError(f"cannot read '{path}' as .npy/.npz: {error}") from None
    names = session.input_names
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise UserInputError(
                f"the model takes {len(names)} inputs ({', '.join(names)}): give a .npz"
            )
        return {names[0]: loaded}
    with loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    if set(arrays) >= set(names):
        return {name: arrays[name] for name in names}
    if len(arrays) == len(names):
        return dict(zip(names, arrays.values(), strict=True))
    raise UserInputError(
        f"'{path}' holds {', '.join(arrays) or 'no arrays'}; the model's inputs are "
        f"{', '.join(names)}"
    )


def _save_npz(path: Path, outputs: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **outputs)


def _reference_name(loaded: LoadedModel) -> str:
    if loaded.fused:
        return f"{loaded.description} — the fused model: fusion itself is not checked"
    return f"{loaded.description}, training form in eval mode"


def _shape(shape: Any) -> str:
    """``2x3x32x32``, or ``(batch, 3, 32, 32)`` when an axis is symbolic."""
    if any(isinstance(d, str) for d in shape):
        return "(" + ", ".join(str(d) for d in shape) + ")"
    return "x".join(str(d) for d in shape)


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if num_bytes < 1024 or unit == "MiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"  # pragma: no cover


def _render_export(loaded: LoadedModel, report: Any) -> str:
    lines = [f"reparam export: {loaded.description}", ""]
    rows = [
        ("file", str(report.path)),
        ("exporter", f"{report.exporter} (opset {report.opset})"),
        ("fused", "yes" if report.fused or loaded.fused else "no"),
        ("corr", report.corr),
    ]
    rows += [
        (f"input {name}", _shape(shape))
        for name, shape in zip(report.input_names, report.input_shapes, strict=True)
    ]
    rows += [
        (f"output {name}", _shape(shape))
        for name, shape in zip(report.output_names, report.output_shapes, strict=True)
    ]
    rows += [
        ("custom operators", ", ".join(report.custom_ops) or "none"),
        ("file size", _size(report.file_size)),
        *_dynamic_check_row(report),
        ("export time", f"{report.seconds:.2f} s"),
    ]
    lines.append(format_table(["graph", ""], rows))
    lines.append("")
    counts = sorted(report.node_counts.items(), key=lambda item: (-item[1], item[0]))
    lines.append(format_table([f"op type ({report.node_total} nodes)", "count"], counts))
    if report.notes:
        lines += ["", "notes:", *(f"  {note}" for note in report.notes)]
    return "\n".join(lines)


def _dynamic_check_row(report: Any) -> list[tuple[str, str]]:
    if not report.dynamic_check:
        return []
    worst = max(diff.max_rel for diff in report.dynamic_check)
    return [("dynamic axes check", f"max rel {worst:.3g} at other sizes")]


def _render_verify(result: Any, reference: str) -> str:
    rows = [
        (
            diff.name,
            _shape(diff.shape[1:]) if diff.shape else "",
            f"{diff.max_abs:.3g}",
            f"{diff.max_rel:.3g}",
            f"{diff.cosine:.9f}",
        )
        for diff in result.worst()
    ]
    batches = ",".join(map(str, result.batch_sizes))
    lines = [
        f"verify {result.path} against {reference}",
        f"onnxruntime {', '.join(result.providers)}; optimizations disabled and all; "
        f"batch sizes {batches}; {len(result.cases)} runs",
        "",
        format_table(["output", "per sample", "max abs", "max rel", "min cosine"], rows),
        "",
    ]
    if result.ok:
        lines.append(f"OK: within rtol {result.rtol:g} / atol {result.atol:g}")
    else:
        lines += ["FAILED:", *(f"  {line}" for line in result.failures())]
    return "\n".join(lines)


def _render_run(
    session: Any,
    feeds: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    timings: list[float],
    source: Path | None,
) -> str:
    origin = f"from {source}" if source is not None else "random normal"
    lines = [
        f"reparam run: {session.path} (opset {session.opset}, {session.node_count} nodes, "
        f"{', '.join(session.providers)})",
        "",
    ]
    rows = [(f"input {name}", _shape(a.shape), str(a.dtype), origin) for name, a in feeds.items()]
    rows += [
        (
            f"output {name}",
            _shape(a.shape),
            str(a.dtype),
            f"min {a.min():.4g}  max {a.max():.4g}  mean {a.mean():.4g}" if a.size else "empty",
        )
        for name, a in outputs.items()
    ]
    lines.append(format_table(["tensor", "shape", "dtype", "values"], rows))
    ms = sorted(t * 1000 for t in timings)
    lines += [
        "",
        f"time per run: median {ms[len(ms) // 2]:.3f} ms, min {ms[0]:.3f} ms "
        f"over {len(ms)} runs (after 1 warm-up)",
    ]
    return "\n".join(lines)
