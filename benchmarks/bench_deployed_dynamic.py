"""Deployed dynamic operators against reparam's eager forward (CPU, onnxruntime).

Involution (B8 C64 56² K7) and DRConv (B8 C64→64 32² K3, r = 8) are exported with
:func:`reparam.export_onnx` (dynamic batch; DRConv with both Corr modes) and run with
reparam's own sessions: onnxruntime (:func:`reparam.runtime.session.load`) and, when it is
installed, OpenVINO (:func:`reparam.runtime.openvino.load_openvino`, float32). Per thread
condition (1 thread, all threads) the graph's run and the eager forward (``torch.no_grad``,
eval, torch set to the same thread count) alternate ``--repeats`` times after a warm-up;
the table gives medians and the ratio graph / eager (target ≤ 1.25×), and the largest
relative difference of the graph's output from eager's (target ≤ 1e-5 in float32).

Usage: ``python benchmarks/bench_deployed_dynamic.py [--quick] [--repeats N] [--output FILE]``.
The ratios are what counts: both sides run interleaved in one process, so load from
elsewhere hits both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# the same interleaving and thread setting as the eager benchmark beside this script
from bench_dynamic import _threads, interleaved_medians

import reparam
from reparam.blocks.drconv import DRConv2d
from reparam.blocks.involution import Involution
from reparam.runtime.session import load


def runtimes() -> list[tuple[str, Callable]]:
    """(name, loader(path, threads=)) of the runtimes installed here."""
    found: list[tuple[str, Callable]] = [("onnxruntime", load)]
    try:
        import openvino  # noqa: F401

        from reparam.runtime.openvino import load_openvino
    except ImportError:
        return found
    return [*found, ("OpenVINO", load_openvino)]


TARGET = 1.25


def cases(quick: bool):
    """(label, module, input, export keyword arguments)."""
    torch.manual_seed(0)
    if quick:
        inv, x_inv = Involution(32, 7), torch.randn(2, 32, 28, 28)
        dr, x_dr = DRConv2d(16, 16, 3, region_num=8, padding=1), torch.randn(2, 16, 16, 16)
    else:
        inv, x_inv = Involution(64, 7), torch.randn(8, 64, 56, 56)
        dr, x_dr = DRConv2d(64, 64, 3, region_num=8, padding=1), torch.randn(8, 64, 32, 32)
    inv_label = f"Involution B{x_inv.shape[0]} C{x_inv.shape[1]} {x_inv.shape[2]}² K7"
    dr_label = f"DRConv B{x_dr.shape[0]} C{x_dr.shape[1]}→{dr.out_channels} {x_dr.shape[2]}² K3 r=8"
    return [
        (inv_label, inv.eval(), x_inv, {}),
        (f"{dr_label}, standard Corr", dr.eval(), x_dr, {"corr": "standard"}),
        (f"{dr_label}, custom Corr", dr.eval(), x_dr, {"corr": "custom"}),
    ]


def bench(quick: bool, repeats: int) -> list[str]:
    all_threads = torch.get_num_threads()
    conditions = [1] if all_threads == 1 else [1, all_threads]
    header = " | ".join(
        f"{n} thread{'s' if n > 1 else ''}: graph / eager ms (ratio)" for n in conditions
    )
    lines = [
        f"torch {torch.__version__}, medians of {repeats} interleaved runs, target ≤ {TARGET}×",
        "",
        f"| case | runtime | {header} | max rel. diff | met |",
        "|---|---|" + "---|" * len(conditions) + "---|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for index, (label, module, x, options) in enumerate(cases(quick)):
            path = Path(folder) / f"case{index}.onnx"
            try:
                reparam.export_onnx(module, path, x, **options)
            except Exception as error:  # the table goes on; the row says why
                lines.append(f"| {label} | export failed: {str(error).splitlines()[0][:120]} |")
                continue
            with torch.no_grad():
                eager_out = module(x)
            for runtime, loader in runtimes():
                lines.append(
                    _row(label, runtime, loader, path, module, x, eager_out, conditions, repeats)
                )
    return lines


def _row(label, runtime, loader, path, module, x, eager_out, conditions, repeats) -> str:
    """One table row: the graph in ``runtime`` against eager, per thread count."""
    cells, met, worst = [], True, 0.0
    for count in conditions:
        try:
            session = loader(path, threads=count)
        except Exception as error:
            cells.append(f"cannot run: {str(error).splitlines()[0][:100]}")
            met = False
            continue
        feed = {session.inputs[0].name: x.numpy()}
        got = session.run_feeds(feed)[0]
        scale = float(np.abs(eager_out.numpy()).max()) or 1.0
        worst = max(worst, float(np.abs(got - eager_out.numpy()).max()) / scale)

        def eager(module=module, x=x):
            with torch.no_grad():
                module(x)

        with _threads(count):
            graph_s, eager_s = interleaved_medians(
                [lambda s=session, f=feed: s.run_feeds(f), eager], repeats
            )
        ratio = graph_s / eager_s
        met = met and ratio <= TARGET
        cells.append(f"{graph_s * 1e3:.1f} / {eager_s * 1e3:.1f} ({ratio:.2f}×)")
    met = met and worst <= 1e-5
    verdict = "yes" if met else "**no**"
    return f"| {label} | {runtime} | {' | '.join(cells)} | {worst:.1e} | {verdict} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per function")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    lines = bench(args.quick, repeats)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.output is not None:
        from reparam._io import atomic_write

        atomic_write(args.output, lambda tmp: tmp.write_text(text, encoding="utf-8"))


if __name__ == "__main__":
    main()
