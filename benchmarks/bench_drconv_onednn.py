"""DRConv with and without oneDNN's matmul for its dense products, interleaved (CPU).

Compares :func:`reparam.ops.segment_mm.dense_mm` / ``segment_mm(..., onednn=True)``
(oneDNN's matmul) against the same code with oneDNN switched off for the run
(``torch.mm`` / ``torch._grouped_mm``, MKL: the previous products; the training step's
other change, RegionCorr keeping each sample's outputs uncopied, is in both), and both
against the blog post's
form (grouped-conv Corr over all r regions, then region assignment): eval forward under
``torch.no_grad()`` and the training step (forward + backward), B8 C64→64 32² K3 r = 8, at
1 intra-op thread and at all threads. Medians of ``--repeats`` runs, the functions run in
turn, the order reversed every other round.

Usage: ``python benchmarks/bench_drconv_onednn.py [--repeats N] [--threads N ...]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

import reparam.ops.segment_mm as segment
from reparam.blocks.drconv import DRConv2d, assign_region_reference
from reparam.ops.corr import corr


@contextmanager
def _without_onednn() -> Iterator[None]:
    """The previous code: every product through torch.mm / torch._grouped_mm."""
    saved = segment._onednn_ok
    segment._onednn_ok = lambda a, b: False
    try:
        yield
    finally:
        segment._onednn_ok = saved


def _seed_forward(block: DRConv2d, x: torch.Tensor) -> torch.Tensor:
    outputs = corr(x, block._kernels(x), 1, block.stride, block.padding, block.dilation)
    batch, _, height, width = outputs.shape
    outputs = outputs.reshape(batch, block.region_num, block.out_channels, height, width)
    return assign_region_reference(outputs, block.conv_guide(x))


def _interleaved(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    for fn in functions:
        fn()
    times: list[list[float]] = [[] for _ in functions]
    pairs = list(zip(functions, times, strict=True))
    for index in range(repeats):
        for fn, samples in pairs if index % 2 == 0 else reversed(pairs):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()
    torch.manual_seed(0)
    block = DRConv2d(64, 64, 3, region_num=8, padding=1)
    x = torch.randn(8, 64, 32, 32)
    grad = torch.randn(8, 64, 32, 32)

    def forward(fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            block.eval()
            with torch.no_grad():
                return fn()

        return run

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run():
            block.train()
            block.zero_grad(set_to_none=True)
            fn(x).backward(grad)

        return run

    def old(fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with _without_onednn():
                return fn()

        return run

    with torch.no_grad():  # same outputs up to float32 rounding
        block.eval()
        new_out = block(x)
        with _without_onednn():
            old_out = block(x)
        error = (new_out - old_out).abs().max() / old_out.abs().max()
    print(f"max |new − old| / max |old| (eval forward): {error:.2e}")
    saved = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)  # this script's own process only
            for name, ours, reference in [
                ("forward", forward(partial(block, x)), forward(partial(_seed_forward, block, x))),
                ("training step", step(block), step(partial(_seed_forward, block))),
            ]:
                new, previous, ref = _interleaved([ours, old(ours), reference], args.repeats)
                print(
                    f"{threads} thread(s), {name}: oneDNN {new * 1e3:.1f} ms "
                    f"({ref / new:.2f}x the reference), previous {previous * 1e3:.1f} ms "
                    f"({ref / previous:.2f}x), reference {ref * 1e3:.1f} ms; "
                    f"previous / oneDNN {previous / new:.2f}x"
                )
    finally:
        torch.set_num_threads(saved)
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
