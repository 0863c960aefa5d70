"""The toolchain's own time (BENCHMARKS.md, "Toolchain"), on CPU:

    python benchmarks/bench_toolchain.py [--repeats N] [--threads N] [--model NAME]
                                         [--fuse-model NAME]

- ``reparam.export_onnx`` of the fused ResNet-18 (dynamic batch, its dynamic-axes check
  included) against the raw ``torch.onnx.export(..., dynamo=True)`` call on the same fused
  model with the same dynamic batch, run in turn; and ``export_onnx`` of the training-time
  model, fusion included;
- ``reparam.verify_onnx`` of that graph against the training-time ResNet-18 at its default
  three batch sizes;
- ``reparam.fuse`` of the training-time repvgg_a0.

Each is timed ``--repeats`` times; the report gives medians and ranges.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import reparam
from reparam.models import create_model, get_model_info


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} s ({min(times):.2f}–{max(times):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--model", default="resnet18", help="bundled model to export, verify")
    parser.add_argument("--fuse-model", default="repvgg_a0", help="bundled model to fuse")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the exporter's deprecation chatter
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    fused = reparam.fuse(model)
    (shape,) = get_model_info(args.model).input_shapes  # one input, batch first
    example = torch.randn(2, *shape[1:])
    batch = torch.export.Dim("batch", min=1, max=1024)

    with tempfile.TemporaryDirectory() as folder:
        raw_path, ours_path = Path(folder, "raw.onnx"), Path(folder, "ours.onnx")

        def raw() -> None:
            torch.onnx.export(
                fused,
                (example,),
                raw_path,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )

        def ours() -> None:
            reparam.export_onnx(fused, ours_path, example, fuse=False)

        def ours_with_fusion() -> None:
            reparam.export_onnx(model, ours_path, example)

        raw(), ours()  # warm-up: imports, first-call caches
        raw_times, ours_times, fusing_times = [], [], []
        for round_index in range(args.repeats):
            pair = [(raw, raw_times), (ours, ours_times)]
            for fn, times in pair if round_index % 2 == 0 else reversed(pair):
                times.append(seconds(fn))
            fusing_times.append(seconds(ours_with_fusion))
        verify_times = [
            seconds(lambda: reparam.verify_onnx(model, ours_path, example))
            for _ in range(args.repeats)
        ]
    to_fuse = create_model(args.fuse_model).eval()
    reparam.fuse(to_fuse)  # warm-up
    fuse_times = [seconds(lambda: reparam.fuse(to_fuse)) for _ in range(max(5, args.repeats))]

    ratios = [o / r for o, r in zip(ours_times, raw_times, strict=True)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of runs")
    print()
    print("| step | time | target |")
    print("|---|---|---|")
    print(f"| raw torch.onnx.export(dynamo=True), fused {args.model} | {summary(raw_times)} | |")
    print(
        f"| reparam.export_onnx, same fused model | {summary(ours_times)}; "
        f"{statistics.median(ratios):.2f}× raw ({min(ratios):.2f}–{max(ratios):.2f}×) "
        f"| ≤ 1.3× raw |"
    )
    print(f"| reparam.export_onnx, training model (fusion included) | {summary(fusing_times)} | |")
    print(f"| reparam.verify_onnx at batch 1, 2, 3 | {summary(verify_times)} | ≤ 5 s |")
    print(f"| reparam.fuse({args.fuse_model}) | {summary(fuse_times)} | ≤ 1 s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
