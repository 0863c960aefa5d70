"""Benchmark the dynamic operators against their reference formulations (CPU).

Conditions table (the headline): Involution (B8 C64 56² K7) vs the unfold formulation and
DRConv (B8 C64→64 32² K3, r = 8) vs the seed's formulation (grouped-conv Corr, all r region
outputs, plain-autograd straight-through assignment), forward (eval, no grad) and training
step (train mode, forward + backward), each in three conditions: one intra-op thread; all
threads; all threads beside a busy process (a spin-loop subprocess, bounded in time and
killed when the condition ends). Peak extra memory of the forwards is measured once.

Involution: our shift-and-accumulate vs the published unfold formulation — the whole module
(kernel generation included) and the operator alone, time and peak extra memory.
DRConv: inference (``torch.no_grad``, eval) of our forward vs the reference formulation that
computes all r region outputs and keeps one per pixel. Corr: the custom op vs the
standard-op (im2col + matmul) form vs a per-sample loop.

Timing: the compared functions run interleaved, ``--repeats`` times each after a warm-up;
the table gives medians (and the ratio of medians). Peak extra memory: every CPU allocation
and free made by ATen during one call, recorded by ``torch.profiler`` with
``profile_memory=True``; the running sum of their sizes in time order, maximised, is the peak
memory allocated by the call beyond what existed before it (inputs and parameters excluded,
the returned output included).

Usage: ``python benchmarks/bench_dynamic.py [--quick] [--threads N] [--repeats N]
[--rounds N] [--conditions-only] [--output FILE]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from reparam.blocks.drconv import DRConv2d, assign_region_reference
from reparam.blocks.involution import Involution, involution_shift, involution_unfold
from reparam.ops.corr import corr, corr_reference, corr_standard

MIB = 2**20


def interleaved_medians(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds per call of each function, run in turn so load drifts hit all alike.

    The order is reversed every other round: a call pays for the memory its predecessor
    freed (large blocks go back to the OS and fault in again), so a fixed order would
    charge one function for the other's allocations every time.
    """
    for fn in functions:
        fn()
    samples: list[list[float]] = [[] for _ in functions]
    pairs = list(zip(functions, samples, strict=True))
    for round_index in range(repeats):
        for fn, times in pairs if round_index % 2 == 0 else reversed(pairs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ATen during ``fn()`` beyond what was live before it.

    Measured with one thread: the profiler misses allocations made on other threads. Each
    further thread holds at most one more chunk's temporaries.
    """
    from torch.profiler import ProfilerActivity, profile

    with _threads(1), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def bench_involution(shapes, repeats: int) -> list[str]:
    rows = [
        "| shape (B, C, H=W, K, s) | input MiB | module ours ms | module unfold ms | "
        "speed-up | op ours ms | op unfold ms | op speed-up | op peak extra MiB ours / "
        "unfold | module peak extra MiB ours / unfold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, channels, size, kernel, stride in shapes:
        torch.manual_seed(0)
        block = Involution(channels, kernel, stride).eval()
        x = torch.randn(batch, channels, size, size)
        with torch.no_grad():
            weight = block.kernels(x)
            module_fns = [partial(block, x), partial(block.forward_unfold, x)]
            op_fns = [
                partial(involution_shift, x, weight, kernel, stride, 16),
                partial(involution_unfold, x, weight, kernel, stride, 16),
            ]
            ours, unfold = interleaved_medians(module_fns, repeats)
            op_ours, op_unfold = interleaved_medians(op_fns, repeats)
            op_mem = [peak_extra_bytes(fn) for fn in op_fns]
            module_mem = [peak_extra_bytes(fn) for fn in module_fns]
        input_mib = x.numel() * x.element_size() / MIB
        rows.append(
            f"| {batch}, {channels}, {size}, {kernel}, {stride} | {input_mib:.1f} | "
            f"{ours * 1e3:.1f} | {unfold * 1e3:.1f} | {unfold / ours:.1f}× | "
            f"{op_ours * 1e3:.1f} | {op_unfold * 1e3:.1f} | {op_unfold / op_ours:.1f}× | "
            f"{op_mem[0] / MIB:.1f} / {op_mem[1] / MIB:.1f} | "
            f"{module_mem[0] / MIB:.1f} / {module_mem[1] / MIB:.1f} |"
        )
    return rows


def bench_drconv(shape, regions: list[int], repeats: int) -> list[str]:
    batch, c_in, c_out, size, kernel = shape
    rows = [
        f"| r | reference ms | forward ms (path) | speed-up | 1/r path forced ms | "
        f"forced speed-up |  (B{batch}, C{c_in}→{c_out}, {size}², K={kernel})",
        "|---|---|---|---|---|---|",
    ]
    for r in regions:
        torch.manual_seed(0)
        block = DRConv2d(c_in, c_out, kernel, region_num=r, padding=kernel // 2).eval()
        x = torch.randn(batch, c_in, size, size)
        with torch.no_grad():
            path = "1/r" if block.uses_fast_path(x) else "reference"
            functions = [
                partial(block.forward_reference, x),
                partial(block, x),
                partial(block._forward_fast, x),
            ]
            reference, forward, forced = interleaved_medians(functions, repeats)
            error = (block._forward_fast(x) - block.forward_reference(x)).abs().max()
            scale = block.forward_reference(x).abs().max()
        assert error <= 1e-5 * scale, f"fast path differs: {error / scale:.3g}"
        rows.append(
            f"| {r} | {reference * 1e3:.1f} | {forward * 1e3:.1f} ({path}) | "
            f"{reference / forward:.2f}× | {forced * 1e3:.1f} | {reference / forced:.2f}× |"
        )
    return rows


def bench_corr(shape, repeats: int) -> list[str]:
    batch, channels, out_channels, size, kernel = shape
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    weights = torch.randn(batch, out_channels, channels, kernel, kernel)
    pad = kernel // 2
    with torch.no_grad():
        op, standard, loop = interleaved_medians(
            [
                lambda: torch.ops.reparam.corr(x, weights, 1, 1, pad, 1),
                lambda: corr_standard(x, weights, 1, 1, pad, 1),
                lambda: corr_reference(x, weights, 1, 1, pad, 1),
            ],
            repeats,
        )
    return [
        f"| Corr (B{batch}, C{channels}→{out_channels}, {size}², K={kernel}) | ms |",
        "|---|---|",
        f"| torch.ops.reparam.corr (grouped conv, groups = B) | {op * 1e3:.1f} |",
        f"| corr_standard (one-hot depthwise im2col + matmul) | {standard * 1e3:.1f} |",
        f"| per-sample F.conv2d loop | {loop * 1e3:.1f} |",
    ]


# Longest the busy neighbour may live, whatever happens to this process.
_SPIN_SECONDS = 900
_SPIN = "import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass"


@contextmanager
def busy_neighbour() -> Iterator[None]:
    """A spin-loop subprocess holding one core for the duration of the ``with`` block."""
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=_SPIN_SECONDS)])
    try:
        time.sleep(0.5)  # let it start spinning
        yield
    finally:
        spinner.kill()
        spinner.wait()


@contextmanager
def _threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _drconv_seed_forward(block: DRConv2d, x: torch.Tensor) -> torch.Tensor:
    """The seed's DRConv: all r region outputs by grouped-conv Corr, hard + soft − soft.detach()."""
    outputs = corr(x, block._kernels(x), 1, block.stride, block.padding, block.dilation)
    batch, _, height, width = outputs.shape
    outputs = outputs.reshape(batch, block.region_num, block.out_channels, height, width)
    return assign_region_reference(outputs, block.conv_guide(x))


def _train_step(forward: Callable[[torch.Tensor], torch.Tensor], module, x, grad) -> None:
    module.zero_grad(set_to_none=True)
    forward(x).backward(grad)


def condition_cases(quick: bool):
    """(name, [ours, reference]) pairs of callables for the conditions table."""
    if quick:
        inv_shape, dr_shape = (2, 32, 28, 7), (2, 16, 16, 16, 3)
    else:
        inv_shape, dr_shape = (8, 64, 56, 7), (8, 64, 64, 32, 3)
    batch, channels, size, kernel = inv_shape
    torch.manual_seed(0)
    inv = Involution(channels, kernel)
    x = torch.randn(batch, channels, size, size)
    grad = torch.randn(batch, channels, size, size)
    b, c_in, c_out, dsize, dk = dr_shape
    dr = DRConv2d(c_in, c_out, dk, region_num=8, padding=dk // 2)
    xd = torch.randn(b, c_in, dsize, dsize)
    grad_d = torch.randn(b, c_out, dsize, dsize)

    def eval_no_grad(module, fn):
        def run():
            module.eval()
            with torch.no_grad():
                return fn()

        return run

    def train(module, forward, inp, g):
        def run():
            module.train()
            _train_step(forward, module, inp, g)

        return run

    inv_label = f"Involution B{batch} C{channels} {size}² K{kernel}"
    dr_label = f"DRConv B{b} C{c_in}→{c_out} {dsize}² K{dk} r=8"
    return [
        (f"{inv_label} forward, vs unfold", 12.0,
         [eval_no_grad(inv, partial(inv, x)), eval_no_grad(inv, partial(inv.forward_unfold, x))]),
        (f"{inv_label} training step, vs unfold", 5.0,
         [train(inv, inv, x, grad), train(inv, inv.forward_unfold, x, grad)]),
        (f"{dr_label} forward, vs seed", 3.0,
         [eval_no_grad(dr, partial(dr, xd)),
          eval_no_grad(dr, partial(_drconv_seed_forward, dr, xd))]),
        (f"{dr_label} training step, vs seed", 1.5,
         [train(dr, dr, xd, grad_d), train(dr, partial(_drconv_seed_forward, dr), xd, grad_d)]),
    ], (inv, x, dr, xd)  # fmt: skip


def bench_conditions(quick: bool, repeats: int, rounds: int = 1) -> list[str]:
    """The three-condition table: medians per condition, ratio reference / ours.

    With ``rounds`` > 1 the three conditions are measured that many times in turn (a noisy
    host drifts over minutes); each cell then gives the median over rounds of ours, of the
    reference and of their ratio, with the ratios' range, and "met" is judged on the
    median ratio.
    """
    cases, (inv, x, dr, xd) = condition_cases(quick)
    all_threads = os.cpu_count() or 1
    conditions = [
        ("1 thread", 1, False),
        (f"{all_threads} threads", all_threads, False),
        (f"{all_threads} threads + busy process", all_threads, True),
    ]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    loads: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, threads, busy in conditions:
            with _threads(threads), busy_neighbour() if busy else _nothing():
                loads.setdefault(name, []).append(os.getloadavg()[0])
                for label, _, functions in cases:
                    ours, reference = interleaved_medians(functions, repeats)
                    results.setdefault((label, name), []).append((ours, reference))
    header = "| case | target | " + " | ".join(
        f"{name}: ours / reference ms (ratio)" for name, _, _ in conditions
    )
    rows = [header + " | met |", "|---|---|" + "---|" * len(conditions) + "---|"]
    for label, target, _ in cases:
        cells, met = [], True
        for name, _, _ in conditions:
            runs = results[label, name]
            ours = statistics.median(o for o, _ in runs)
            reference = statistics.median(r for _, r in runs)
            ratios = [r / o for o, r in runs]
            ratio = statistics.median(ratios)
            met &= ratio >= target
            spread = f"; {min(ratios):.1f}–{max(ratios):.1f}×" if rounds > 1 else ""
            cells.append(f"{ours * 1e3:.1f} / {reference * 1e3:.1f} ({ratio:.1f}×{spread})")
        rows.append(
            f"| {label} | ≥ {target:g}× | "
            + " | ".join(cells)
            + f" | {'yes' if met else '**no**'} |"
        )
    load_text = ", ".join(
        f"{name}: {' / '.join(f'{v:.2f}' for v in loads[name])}" for name, _, _ in conditions
    )
    rounds_text = f" ({rounds} rounds)" if rounds > 1 else ""
    rows += ["", f"1-minute load average when each condition started{rounds_text}: {load_text}."]
    with torch.no_grad():
        inv.eval()
        dr.eval()
        input_mib = x.numel() * x.element_size() / MIB
        mem = [peak_extra_bytes(partial(inv, x)) / MIB,
               peak_extra_bytes(partial(inv.forward_unfold, x)) / MIB]  # fmt: skip
        dmem = [peak_extra_bytes(partial(dr, xd)) / MIB,
                peak_extra_bytes(partial(_drconv_seed_forward, dr, xd)) / MIB]  # fmt: skip
    rows += [
        "",
        f"Peak extra memory, eval forward, one thread: Involution ours {mem[0]:.1f} MiB "
        f"({mem[0] / input_mib:.2f}× its {input_mib:.1f} MiB input) vs unfold {mem[1]:.1f} MiB; "
        f"DRConv ours {dmem[0]:.1f} MiB vs seed {dmem[1]:.1f} MiB.",
    ]
    return rows


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per function")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure the three conditions this many times"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--conditions-only", action="store_true", help="only the three-condition table"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        repeats = args.repeats or 3
        involution_shapes = [(2, 32, 28, 7, 1), (2, 32, 28, 3, 2)]
        drconv_shape, regions = (2, 16, 16, 16, 3), [2, 8]
        corr_shape = (2, 16, 64, 16, 3)
    else:
        repeats = args.repeats or 11
        involution_shapes = [(8, 64, 56, 7, 1), (8, 128, 28, 7, 1), (8, 64, 56, 3, 2)]
        drconv_shape, regions = (8, 64, 64, 32, 3), [2, 4, 8]
        corr_shape = (4, 64, 512, 32, 3)
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, medians of {repeats} interleaved runs"
    )
    load_before = os.getloadavg()
    lines = [header, "", "### Three conditions", ""]
    lines += bench_conditions(args.quick, repeats, max(1, args.rounds))
    if args.conditions_only:
        lines += _load_line(load_before)
        return _emit(lines, args.output)
    lines += ["", "### Involution (eval, no grad)", ""]
    lines += bench_involution(involution_shapes, repeats)
    lines += ["", "### DRConv inference (eval, no grad)", ""]
    lines += bench_drconv(drconv_shape, regions, repeats)
    lines += ["", "### Corr", ""]
    lines += bench_corr(corr_shape, repeats)
    lines += _load_line(load_before)
    _emit(lines, args.output)


def _load_line(before) -> list[str]:
    after = os.getloadavg()
    fmt = ", ".join
    return [
        "",
        f"Load average (1, 5, 15 min) before: {fmt(f'{v:.2f}' for v in before)}; "
        f"after: {fmt(f'{v:.2f}' for v in after)}.",
    ]


def _emit(lines: list[str], output: Path | None) -> None:
    text = "\n".join(lines)
    print(text)
    if output is not None:
        output.write_text(text + "\n")


if __name__ == "__main__":
    main()
