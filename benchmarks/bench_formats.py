"""Formats by runtime (BENCHMARKS.md, "Formats"), on CPU:

    python benchmarks/bench_formats.py [--models a,b] [--batch N] [--repeats N]
                                       [--threads N] [-o FILE]

For each model, :func:`reparam.bench.formats.bench_formats` (what ``reparam bench --formats``
runs): ONNX fp32/fp16/INT8 under onnxruntime, OpenVINO IR fp32/fp16/INT8, ``.pt2`` and the
ExecuTorch ``.pte`` (XNNPACK) where ExecuTorch is installed; file size, latency at batch 1
and N (medians of interleaved rounds) and accuracy against the training-time model. Then
OpenVINO against onnxruntime per format, as latency ratios from the same interleaved run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reparam.bench.formats import FormatsReport, bench_formats, render_formats_markdown

DEFAULT_MODELS = "resnet18,repvgg_a0,mobileone_s0,yolo_asff_tiny"


def ratios(report: FormatsReport) -> list[str]:
    """``OpenVINO / onnxruntime`` latency per precision, from the same run."""
    rows = {row.name: row for row in report.rows}
    lines = []
    for precision in ("fp32", "fp16", "INT8"):
        ort = rows.get(f"ONNX {precision} (onnxruntime)")
        ov = rows.get(f"OpenVINO {precision}")
        if not ort or not ov or ort.error or ov.error:
            continue
        if ort.latency_1_ms and ov.latency_1_ms and ort.latency_n_ms and ov.latency_n_ms:
            lines.append(
                f"- {precision}: OpenVINO / onnxruntime = {ov.latency_1_ms / ort.latency_1_ms:.2f}"
                f"× at batch 1, {ov.latency_n_ms / ort.latency_n_ms:.2f}× at batch {report.batch}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    sections = []
    for name in args.models.split(","):
        report = bench_formats(
            name.strip(),
            batch=args.batch,
            repeats=args.repeats,
            threads=args.threads,
            progress=lambda line: print(f"… {line}", flush=True),
        )
        section = render_formats_markdown(report) + "\n" + "\n".join(ratios(report)) + "\n"
        print(section, flush=True)
        sections.append(section)
    if args.output is not None:
        args.output.write_text("\n".join(sections), encoding="utf-8")


if __name__ == "__main__":
    main()
