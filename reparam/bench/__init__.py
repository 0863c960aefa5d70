"""Benchmarks: what fusion buys, measured against the physical limit.

For each block: the training-time form in eval mode vs its fused form vs a plain conv of
the same shape (the limit: a fused block cannot beat the conv it becomes). For each bundled
model: training-time form vs fused form vs (where one exists) the plain network it fuses
down to with its BN folded, torch eager vs onnxruntime on the fused model, and the fused
graph vs the unfused one optimised by onnxruntime; with parameters, multiply-adds and peak
memory.

Modules, one job each: :mod:`~reparam.bench.timing` (interleaved medians),
:mod:`~reparam.bench.memory` (peak memory, the pre-run size check),
:mod:`~reparam.bench.machine`, :mod:`~reparam.bench.targets` (met / missed / noisy),
:mod:`~reparam.bench.blocks` and :mod:`~reparam.bench.models` (the two suites),
:mod:`~reparam.bench.suite` (one run) and :mod:`~reparam.bench.render` (markdown, terminal
tables, JSON).
"""

from __future__ import annotations

from typing import Any

from reparam.bench.blocks import BlockResult, BlockSpec, bench_blocks, list_blocks
from reparam.bench.machine import MachineInfo, machine_info
from reparam.bench.memory import estimate_forward_bytes, peak_memory
from reparam.bench.models import QUICK_MODELS, ModelResult, bench_models, default_models
from reparam.bench.render import print_tables, render_json, render_markdown
from reparam.bench.suite import BenchReport, BenchSettings, check_memory, run_suite
from reparam.bench.targets import (
    BLOCK_TARGET,
    MODEL_LIMIT_TARGET,
    MODEL_SPEEDUP_TARGET,
    ORT_TARGET,
    verdict,
)
from reparam.bench.timing import Timing, time_candidates
from reparam.macs import count_macs

__all__ = [
    "BLOCK_TARGET",
    "MODEL_LIMIT_TARGET",
    "MODEL_SPEEDUP_TARGET",
    "ORT_TARGET",
    "QUICK_MODELS",
    "BenchReport",
    "BenchSettings",
    "BlockResult",
    "BlockSpec",
    "MachineInfo",
    "ModelResult",
    "Timing",
    "bench_blocks",
    "bench_models",
    "check_memory",
    "count_macs",
    "default_models",
    "estimate_forward_bytes",
    "list_blocks",
    "machine_info",
    "peak_memory",
    "print_tables",
    "render_json",
    "render_markdown",
    "run_benchmark",
    "run_suite",
    "time_candidates",
    "verdict",
]


def run_benchmark(**options: Any) -> str:
    """Run the benchmarks and return the markdown: ``render_markdown(run_suite(**options))``
    (see :func:`run_suite` for the keyword arguments)."""
    return render_markdown(run_suite(**options))
