"""``reparam bench --formats MODEL``: one model in every format reparam writes (anchor:
``yolo benchmark``).

One row per format: ONNX fp32, fp16 and INT8 under onnxruntime; OpenVINO IR fp32, fp16 and
INT8; the ``.pt2`` program under torch; the ExecuTorch ``.pte`` (XNNPACK) where ExecuTorch
is installed. Columns: file size, latency at batch 1 and at batch N (medians of interleaved
rounds: every format runs once per round, in rotating order, see
:func:`reparam.bench.timing.time_candidates`), and accuracy at batch N against the
training-time model in eval mode (float32):

- max rel: max|out − ref| / max|ref| over the outputs (the worst output);
- cosine: cosine similarity of the flattened outputs (the smallest);
- top-1: the share of samples whose argmax over axis 1 of the first output agrees
  (for a rank-2 output, i.e. a classifier; "—" otherwise).

A format whose export, conversion or run fails gets its row with the one-line reason, and
the table goes on. An ExecuTorch program that fails with a dynamic batch (ExecuTorch keeps
a traced size inside DRConv/Involution graphs) is measured as two static ones (batch 1 and
N). Every file is written through the library (``export_onnx``,
``quantize_onnx``, ``convert_onnx_to_openvino``, ``export_pt2``, ``export_executorch``) into a
temporary folder that is removed afterwards.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reparam.errors import printable, summarize

__all__ = ["FORMATS", "FormatRow", "FormatsReport", "bench_formats", "render_formats_markdown"]

FORMATS = (
    "ONNX fp32 (onnxruntime)",
    "ONNX fp16 (onnxruntime)",
    "ONNX INT8 (onnxruntime)",
    "OpenVINO fp32",
    "OpenVINO fp16",
    "OpenVINO INT8",
    ".pt2 (torch)",
    "ExecuTorch XNNPACK",
)

Runner = Callable[[torch.Tensor], list[np.ndarray]]


@dataclass
class FormatRow:
    """One format: its file size, latencies, accuracy, or why it has none."""

    name: str
    size_bytes: int | None = None
    latency_1_ms: float | None = None
    latency_n_ms: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    top1: float | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FormatsReport:
    """The table for one model, with the settings it was measured under."""

    model: str
    input_shape: tuple[int, ...]
    batch: int
    repeats: int
    threads: int
    rows: list[FormatRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "batch": self.batch,
            "repeats": self.repeats,
            "threads": self.threads,
            "rows": [row.to_dict() for row in self.rows],
            "notes": list(self.notes),
        }


def _accuracy(row: FormatRow, reference: list[np.ndarray], got: list[np.ndarray]) -> None:
    if len(got) != len(reference):
        raise ValueError(f"{len(got)} outputs, the model has {len(reference)}")
    rels, cosines = [], []
    for want, have in zip(reference, got, strict=True):
        want64, have64 = want.astype(np.float64), np.asarray(have, np.float64)
        if want64.shape != have64.shape:
            raise ValueError(f"output shape {have64.shape}, the model's is {want64.shape}")
        scale = np.abs(want64).max() or 1.0
        rels.append(float(np.abs(have64 - want64).max() / scale))
        norm = np.linalg.norm(want64) * np.linalg.norm(have64)
        cosines.append(float((want64 * have64).sum() / norm) if norm else 1.0)
    row.max_rel, row.cosine = max(rels), min(cosines)
    if reference[0].ndim == 2:
        agree = reference[0].argmax(axis=1) == np.asarray(got[0]).argmax(axis=1)
        row.top1 = float(agree.mean())


def _onnx_runner(session: Any) -> Runner:
    dtype = session.inputs[0].dtype

    def run(x: torch.Tensor) -> list[np.ndarray]:
        return session.run_feeds({session.input_names[0]: x.numpy().astype(dtype)})

    return run


def _build(
    name: str,
    model: torch.nn.Module,
    example: torch.Tensor,
    folder: Path,
    threads: int,
    batch: int,
) -> tuple[Path, Runner]:
    """Write ``name``'s file(s) in ``folder`` and return the file and a runner."""
    from reparam import export_onnx
    from reparam.runtime import load

    fp32, fp16, int8 = folder / "fp32.onnx", folder / "fp16.onnx", folder / "int8.onnx"

    def onnx_file(path: Path) -> Path:
        if not path.exists():
            if path == int8:
                quantize_with_random(onnx_file(fp32), int8, example)
            else:
                dtype = torch.float16 if path == fp16 else None
                export_onnx(model, path, example, dtype=dtype, check_dynamic_axes=False)
        return path

    if name.startswith("ONNX"):
        source = onnx_file({"fp32": fp32, "fp16": fp16, "INT8": int8}[name.split()[1]])
        return source, _onnx_runner(load(source, threads=threads))
    if name.startswith("OpenVINO"):
        from reparam.runtime.openvino import OpenVinoModel, convert_onnx_to_openvino

        precision = name.split()[1]
        xml = folder / f"ov_{precision}.xml"
        onnx_source = onnx_file(int8 if precision == "INT8" else fp32)
        convert_onnx_to_openvino(onnx_source, xml, compress_to_fp16=precision == "fp16")
        session = OpenVinoModel(xml, threads=threads)
        return xml, _onnx_runner(session)
    if name.startswith(".pt2"):
        from reparam.export.pt2 import export_pt2

        path = folder / "model.pt2"
        export_pt2(model, path, example)
        module = torch.export.load(str(path)).module()

        def run_pt2(x: torch.Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                return [_numpy(module(x))]

        return path, run_pt2
    from reparam.errors import ExportError
    from reparam.export.executorch import ExecuTorchModel, export_executorch

    path = folder / "model.pte"
    try:
        export_executorch(model, (example,), path, dynamic_batch=True)
        programs = {0: ExecuTorchModel(path)}
    except ExportError:
        # a graph ExecuTorch cannot run at other batches than the traced one: one static
        # program per batch measured (the size column is the batch-1 program's)
        programs = {}
        for size in (batch, 1):
            path = folder / f"model_b{size}.pte"
            x = example.expand(size, *example.shape[1:]).contiguous()
            export_executorch(model, (x,), path, dynamic_batch=False)
            programs[size] = ExecuTorchModel(path)

    def run_pte(x: torch.Tensor) -> list[np.ndarray]:
        program = programs.get(0) or programs[x.shape[0]]
        return [t.numpy() for t in program.run(x)]

    return path, run_pte


def _numpy(outputs: Any) -> np.ndarray:
    return (outputs[0] if isinstance(outputs, list | tuple) else outputs).detach().numpy()


def quantize_with_random(source: Path, target: Path, example: torch.Tensor) -> None:
    """INT8 calibrated on 16 random-normal inputs (a benchmark of speed and of how far random
    calibration lands; real data calibrates better)."""
    from reparam import quantize_onnx

    calibration = source.with_name("calibration.npy")
    generator = torch.Generator().manual_seed(1)
    np.save(calibration, torch.randn(16, *example.shape[1:], generator=generator).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_onnx(source, target, calibration=calibration)


def bench_formats(
    model_name: str,
    *,
    batch: int = 8,
    size: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
    formats: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> FormatsReport:
    """Export the bundled model ``model_name`` to each format and measure it.

    The model gets random BN statistics (:func:`reparam.testing.randomize_batchnorm` with
    ``seed``), as ``reparam export`` does without weights. ``formats`` picks rows of
    :data:`FORMATS` (default all).
    """
    from reparam.bench.timing import time_candidates, torch_threads
    from reparam.models.registry import create_model, get_model_info
    from reparam.runtime import thread_count
    from reparam.testing import randomize_batchnorm

    say = progress or (lambda line: None)
    shape = tuple(get_model_info(model_name).input_shapes[0])
    if size is not None:
        shape = (*shape[:-2], size, size)
    threads = thread_count(threads)
    model = randomize_batchnorm(create_model(model_name), seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(1, *shape[1:], generator=generator)
    inputs = torch.randn(batch, *shape[1:], generator=generator)
    with torch.no_grad():
        out = model(inputs)
    reference = [o.numpy() for o in (out if isinstance(out, list | tuple) else [out])]
    report = FormatsReport(model_name, (1, *shape[1:]), batch, repeats, threads)
    runners: dict[str, Runner] = {}
    with tempfile.TemporaryDirectory(prefix="reparam-formats-") as tmp, torch_threads(threads):
        folder = Path(tmp)
        for name in FORMATS if formats is None else formats:
            row = FormatRow(name)
            report.rows.append(row)
            say(f"formats: {name}")
            try:
                path, runner = _build(name, model, example, folder, threads, batch)
                row.size_bytes = path.stat().st_size + (
                    path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0
                )
                runner(example)
                _accuracy(row, reference, runner(inputs))
                runners[name] = runner
            except Exception as error:  # any failure is this row's, the table goes on
                row.error = printable(" ".join(summarize(error).split()), 200)
        if runners:
            say(f"formats: timing {len(runners)} formats at batch 1 and {batch}")
            candidates = {}
            for name, runner in runners.items():
                candidates[(name, 1)] = lambda r=runner: r(example)
                candidates[(name, batch)] = lambda r=runner: r(inputs)
            timings = time_candidates(candidates, repeats=repeats, warmup=warmup)
            for row in report.rows:
                if row.name in runners:
                    row.latency_1_ms = timings[(row.name, 1)].median * 1000
                    row.latency_n_ms = timings[(row.name, batch)].median * 1000
    report.notes.append(
        "INT8 rows are calibrated on 16 random-normal inputs; accuracy at batch "
        f"{batch} against the training-time model (float32, random BN statistics)"
    )
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def formats_rows(report: FormatsReport) -> list[list[str]]:
    """The table's cells, one list per format."""
    from reparam.resources import format_bytes

    rows = []
    for row in report.rows:
        if row.error:
            rows.append([row.name, "failed", "", "", "", "", "", row.error])
            continue
        rows.append(
            [
                row.name,
                format_bytes(row.size_bytes) if row.size_bytes is not None else "—",
                _fmt(row.latency_1_ms, ".2f"),
                _fmt(row.latency_n_ms, ".2f"),
                _fmt(row.max_rel, ".2e"),
                _fmt(row.cosine, ".6f"),
                "—" if row.top1 is None else f"{100 * row.top1:.1f}%",
                "",
            ]
        )
    return rows


def headers(report: FormatsReport) -> list[str]:
    return [
        "format",
        "size",
        "ms @1",
        f"ms @{report.batch}",
        "max rel",
        "cosine",
        "top-1",
        "error",
    ]


def render_formats_markdown(report: FormatsReport) -> str:
    """The report as a markdown section."""
    lines = [
        f"## Formats: {printable(report.model)}",
        "",
        f"Input {'x'.join(map(str, report.input_shape))}, batch 1 and {report.batch}, "
        f"{report.threads} threads, median of {report.repeats} interleaved rounds.",
        "",
        "| " + " | ".join(headers(report)) + " |",
        "|" + "|".join("---" for _ in headers(report)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in formats_rows(report)]
    lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"
