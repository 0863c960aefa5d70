"""Benchmarks: what fusion buys, measured against the physical limit.

For each block: the training-time form in eval mode vs its fused form vs a plain conv of
the same shape (the limit: a fused block cannot beat the conv it becomes). For each bundled
model: training-time form vs fused form vs (where one exists) the plain network it fuses
down to with its BN folded, and torch eager vs onnxruntime on the fused model; with
parameters, multiply-adds and peak memory.

Timing method: every candidate of one comparison runs once per round, in an order that
rotates from round to round, so drift (other processes, frequency scaling) spreads over all
candidates instead of biasing the one measured last; the reported time is the median over
rounds and ratios are ratios of medians from the same run. Everything runs under
``torch.inference_mode``. Medians resist outliers but not sustained contention: on a shared
machine, compare ratios, not absolute times.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from reparam.compare import compare_outputs
from reparam.convert import fuse
from reparam.errors import UserInputError
from reparam.models import create_model, get_model_info, list_models
from reparam.models import mobileone_nets as _mobileone_nets  # noqa: F401  (registers models)
from reparam.models import repvgg_nets as _repvgg_nets  # noqa: F401  (registers models)
from reparam.summary import model_stats
from reparam.testing import randomize_batchnorm

__all__ = [
    "BLOCK_TARGET",
    "MODEL_LIMIT_TARGET",
    "MODEL_SPEEDUP_TARGET",
    "QUICK_MODELS",
    "BenchSettings",
    "BlockResult",
    "BlockSpec",
    "MachineInfo",
    "ModelResult",
    "Timing",
    "bench_blocks",
    "bench_models",
    "count_macs",
    "default_models",
    "list_blocks",
    "machine_info",
    "peak_memory",
    "render_markdown",
    "run_benchmark",
    "time_candidates",
    "time_module",
]

BLOCK_TARGET = 1.05
"""A fused block runs within this factor of a plain conv of the same shape."""
MODEL_LIMIT_TARGET = 1.05
"""A fused model runs within this factor of the plain network it fuses down to."""
MODEL_SPEEDUP_TARGET = 1.5
"""The fused ACNet ResNet-18 runs at least this much faster than its training-time form."""
ORT_TARGET = 1.0
"""onnxruntime is no slower than torch eager on a fused model."""

BASELINES = {"acnet_resnet18": "resnet18", "dbb_resnet18": "resnet18"}
"""Model → the plain model (Conv-BN everywhere) its fused form is structurally equal to."""
SPEEDUP_TARGETS = {"acnet_resnet18": MODEL_SPEEDUP_TARGET}
SMALL_INPUT = 64
"""Bundled models whose example input is at most this size (spatial) are the --quick set."""


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: the median and every sample."""

    median: float
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """Interquartile range / median of the samples: how noisy the measurement was."""
        if len(self.samples) < 2 or not self.median:
            return 0.0
        low, _, high = statistics.quantiles(self.samples, n=4)
        return (high - low) / self.median


def time_candidates(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    settle: bool = True,
) -> dict[str, Timing]:
    """Time several zero-argument callables side by side, interleaved.

    Each round calls every candidate once; the order rotates by one each round. The first
    ``warmup`` rounds are not recorded (allocator, oneDNN primitive caches, ORT arenas).
    With ``settle``, each timed call follows an untimed call of the same candidate: a
    candidate otherwise pays for the allocator state its predecessor leaves (measured: a
    fused ACBlock ran 30% slower right after its multi-branch form freed its buffers, and
    as fast as a plain conv after itself).

    Returns:
        The :class:`Timing` of each candidate, by name.
    """
    if repeats < 1 or warmup < 0:
        raise UserInputError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if settle:
                    candidates[name]()
                start = time.perf_counter()
                candidates[name]()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    samples[name].append(elapsed)
    return {
        name: Timing(statistics.median(values), tuple(values)) for name, values in samples.items()
    }


def time_module(
    fn: Callable[..., object], inputs: Sequence[Tensor], repeats: int = 10, warmup: int = 2
) -> float:
    """Median seconds of ``fn(*inputs)`` over ``repeats`` calls after ``warmup`` calls."""
    return time_candidates({"fn": lambda: fn(*inputs)}, repeats=repeats, warmup=warmup)["fn"].median


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Approximate peak memory ``fn()`` adds to the process, in bytes; None if unmeasurable.

    Linux only: returns free heap memory to the system (``malloc_trim``), resets the
    resident-set high-water mark (``/proc/self/clear_refs``), calls ``fn`` and returns
    VmHWM − VmRSS-before. It counts every page the call touches (activations, library
    workspaces, allocator overhead), so treat it as an order of magnitude.
    """
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except (OSError, AttributeError, KeyError):
        return None
    with torch.inference_mode():
        fn()
    try:
        return max(0, _proc_status("VmHWM") - before)
    except (OSError, KeyError):
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def count_macs(model: nn.Module, *inputs: Tensor) -> int:
    """Multiply-adds of every Conv and Linear layer in one forward pass on ``inputs``.

    A conv computes out.numel() · (C_in / groups) · ∏kernel multiply-adds, a linear layer
    out.numel() · in_features. Elementwise operations (BN, ReLU, additions) are not counted.
    """
    total = 0

    def conv_hook(module: nn.modules.conv._ConvNd, _inputs: object, output: Tensor) -> None:
        nonlocal total
        kernel = 1
        for size in module.kernel_size:
            kernel *= size
        total += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, _inputs: object, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class MachineInfo:
    """What the numbers were measured on."""

    cpu: str
    cores: int
    torch_threads: int
    torch_version: str
    ort_version: str
    python: str
    system: str


def machine_info() -> MachineInfo:
    """CPU model (from /proc/cpuinfo where there is one), usable cores, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return MachineInfo(
        cpu=cpu,
        cores=cores,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        ort_version=ort_version,
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
    )


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockSpec:
    """A block to benchmark: its training-time form and the plain layer it fuses into.

    ``build(channels)`` returns the training-time block; ``plain(channels)`` a plain
    ``nn.Conv2d`` of the fused conv's shape followed by whatever the fused block keeps after
    its conv (an activation), i.e. the fastest the fused block could possibly be.
    """

    name: str
    build: Callable[[int], nn.Module]
    plain: Callable[[int], nn.Module]
    description: str


def _conv(channels: int, kernel_size: int, groups: int = 1, act: nn.Module | None = None):
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups)
    return nn.Sequential(conv, act) if act is not None else conv


def _block_specs() -> list[BlockSpec]:
    from reparam.blocks.acb import ACBlock
    from reparam.blocks.dbb import DiverseBranchBlock
    from reparam.blocks.mobileone import MobileOneBlock
    from reparam.blocks.repvgg import RepVGGBlock

    specs = [
        BlockSpec(
            "ACBlock",
            lambda c: ACBlock(c, c, 3),
            lambda c: _conv(c, 3),
            "3x3 + 3x1 + 1x3 conv-BN",
        ),
        BlockSpec(
            "RepVGGBlock",
            lambda c: RepVGGBlock(c, c, 3),
            lambda c: _conv(c, 3, act=nn.ReLU()),
            "3x3 + 1x1 conv-BN + BN identity, ReLU",
        ),
        BlockSpec(
            "DiverseBranchBlock",
            lambda c: DiverseBranchBlock(c, c, 3),
            lambda c: _conv(c, 3),
            "3x3, 1x1, 1x1→3x3, 1x1→avg branches",
        ),
        BlockSpec(
            "MobileOneBlock dw",
            lambda c: MobileOneBlock(c, c, 3, groups=c, num_conv_branches=4),
            lambda c: _conv(c, 3, groups=c, act=nn.ReLU()),
            "depthwise, 4 × 3x3 + 1x1 conv-BN + BN skip, ReLU",
        ),
        BlockSpec(
            "MobileOneBlock pw",
            lambda c: MobileOneBlock(c, c, 1, num_conv_branches=4),
            lambda c: _conv(c, 1, act=nn.ReLU()),
            "pointwise, 4 × 1x1 conv-BN + BN skip, ReLU",
        ),
    ]
    try:  # YOLOv5's Conv-BN-SiLU, where that block is available
        from reparam.blocks.conv import Conv

        specs.append(
            BlockSpec(
                "Conv (YOLOv5)",
                lambda c: Conv(c, c, 3),
                lambda c: _conv(c, 3, act=nn.SiLU()),
                "3x3 conv-BN-SiLU",
            )
        )
    except ImportError:
        pass
    return specs


def list_blocks() -> list[str]:
    """Names of the blocks :func:`bench_blocks` knows."""
    return [spec.name for spec in _block_specs()]


def _select(names: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    if names is None:
        return list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserInputError(
            f"unknown {what} {', '.join(repr(n) for n in unknown)}; choose from {', '.join(known)}"
        )
    return list(names)


@dataclass
class BlockResult:
    """One block's training-time, fused and plain-conv timings on one input shape."""

    name: str
    description: str
    shape: tuple[int, ...]
    train: Timing
    fused: Timing
    plain: Timing
    max_rel: float
    params_train: int
    params_fused: int

    @property
    def fused_vs_plain(self) -> float:
        return self.fused.median / self.plain.median

    @property
    def speedup(self) -> float:
        return self.train.median / self.fused.median


def bench_blocks(
    names: Sequence[str] | None = None,
    *,
    batch: int = 8,
    channels: int = 64,
    size: int = 56,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> list[BlockResult]:
    """Time each block's training-time form (eval), fused form and a plain conv, interleaved.

    Args:
        names: blocks to run (see :func:`list_blocks`); default all.
        batch, channels, size: the input is batch × channels × size × size; the blocks map
            channels to channels at stride 1.
        repeats, warmup: rounds per comparison (see :func:`time_candidates`).
        seed: for weights, BN statistics and the input.

    Raises:
        UserInputError: an unknown block name.
    """
    specs = {spec.name: spec for spec in _block_specs()}
    shape = (batch, channels, size, size)
    return [
        _bench_block(specs[name], shape, repeats, warmup, seed)
        for name in _select(names, list(specs), "block")
    ]


def _bench_block(
    spec: BlockSpec, shape: tuple[int, ...], repeats: int, warmup: int, seed: int
) -> BlockResult:
    channels = shape[1]
    torch.manual_seed(seed)
    block = randomize_batchnorm(spec.build(channels), seed).eval()
    fused = fuse(block)
    plain = spec.plain(channels).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        max_rel = max(d.max_rel for d in compare_outputs(block(x), fused(x)))
    timings = time_candidates(
        {"train": lambda: block(x), "fused": lambda: fused(x), "plain": lambda: plain(x)},
        repeats=repeats,
        warmup=warmup,
    )
    return BlockResult(
        name=spec.name,
        description=spec.description,
        shape=shape,
        train=timings["train"],
        fused=timings["fused"],
        plain=timings["plain"],
        max_rel=max_rel,
        params_train=model_stats(block).parameters,
        params_fused=model_stats(fused).parameters,
    )


# --------------------------------------------------------------------------- models


def default_models(quick: bool = False) -> list[str]:
    """The bundled models worth benchmarking: the small ones with ``quick``, else the rest.

    Models that only serve as a baseline (plain ResNet-18) are left out.
    """
    chosen = []
    for name in list_models():
        if name in BASELINES.values():
            continue
        shapes = get_model_info(name).input_shapes
        small = bool(shapes) and max(max(shape[2:], default=0) for shape in shapes) <= SMALL_INPUT
        if small == quick:
            chosen.append(name)
    return chosen


@dataclass
class ModelResult:
    """One bundled model's timings and sizes on one input shape."""

    name: str
    shapes: list[tuple[int, ...]]
    train: Timing
    fused: Timing
    max_rel: float
    params_train: int
    params_fused: int
    macs_train: int
    macs_fused: int
    baseline_name: str | None = None
    baseline: Timing | None = None
    ort: Timing | None = None
    ort_max_rel: float | None = None
    memory_train: int | None = None
    memory_fused: int | None = None
    memory_ort: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.train.median / self.fused.median

    @property
    def fused_vs_baseline(self) -> float | None:
        return self.fused.median / self.baseline.median if self.baseline else None

    @property
    def timings(self) -> list[Timing]:
        return [t for t in (self.train, self.fused, self.baseline, self.ort) if t is not None]

    @property
    def ort_vs_torch(self) -> float | None:
        return self.ort.median / self.fused.median if self.ort else None


def _model_inputs(
    name: str, batch: int, size: int | None, generator: torch.Generator
) -> list[Tensor]:
    shapes = []
    for shape in get_model_info(name).input_shapes:
        shape = (batch, *shape[1:])
        if size is not None and len(shape) >= 3:
            shape = (*shape[:2], *([size] * (len(shape) - 2)))
        shapes.append(shape)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _ort_session(fused: nn.Module, inputs: list[Tensor], directory: Path, name: str):
    """Export ``fused`` with the dynamo exporter and open it in onnxruntime.

    Returns ``(run, max_rel, memory)``: a zero-argument callable running the session on
    ``inputs``, the session's error against torch, and the peak memory of its first run
    (measured then because ORT's arena keeps what it grows). Uses :mod:`reparam.runtime`
    (spinning off, as many intra-op threads as torch uses).
    """
    from reparam import runtime
    from reparam.export.onnx_export import export_onnx

    path = directory / f"{name}.onnx"
    export_onnx(fused, path, inputs, fuse=False, dynamic_batch=False, source=name)
    session = runtime.load(path, threads=torch.get_num_threads())
    feeds = session.feeds(*[t.numpy() for t in inputs])
    raw = session.session

    def run() -> object:
        return raw.run(None, feeds)

    with torch.inference_mode():
        reference = fused(*inputs)
    first: list = []
    memory = peak_memory(lambda: first.extend(run()))
    outputs = [torch.from_numpy(array) for array in first]
    candidate = outputs[0] if len(outputs) == 1 else outputs
    if isinstance(reference, list | tuple) and not isinstance(candidate, list):
        candidate = [candidate]
    max_rel = max(d.max_rel for d in compare_outputs(reference, candidate))
    return run, max_rel, memory


def bench_models(
    names: Sequence[str] | None = None,
    *,
    batch: int = 8,
    size: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
    onnx: bool = True,
    memory: bool = True,
    seed: int = 0,
) -> list[ModelResult]:
    """Time each bundled model: training-time form vs fused vs baseline vs onnxruntime.

    Args:
        names: bundled models (see :func:`reparam.models.list_models`); default
            :func:`default_models`.
        batch: batch size of the inputs.
        size: spatial size of the inputs; default each model's example size.
        repeats, warmup: rounds per comparison (see :func:`time_candidates`).
        onnx: also export the fused model (dynamo exporter, to a temporary directory) and
            time it under onnxruntime. An export failure becomes a note, not an error.
        memory: measure approximate peak memory per forward (see :func:`peak_memory`).
        seed: for weights, BN statistics and inputs.

    Raises:
        UserInputError: an unknown model name.
    """
    names = _select(names, list_models(), "model") if names is not None else default_models()
    results = []
    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
        for name in names:
            results.append(
                _bench_model(name, batch, size, repeats, warmup, onnx, memory, seed, Path(tmp))
            )
    return results


def _bench_model(
    name: str,
    batch: int,
    size: int | None,
    repeats: int,
    warmup: int,
    onnx: bool,
    memory: bool,
    seed: int,
    directory: Path,
) -> ModelResult:
    generator = torch.Generator().manual_seed(seed)
    inputs = _model_inputs(name, batch, size, generator)
    torch.manual_seed(seed)
    model = randomize_batchnorm(create_model(name), seed).eval()
    fused = fuse(model)
    with torch.inference_mode():
        max_rel = max(d.max_rel for d in compare_outputs(model(*inputs), fused(*inputs)))
    candidates: dict[str, Callable[[], object]] = {
        "train": lambda: model(*inputs),
        "fused": lambda: fused(*inputs),
    }
    notes: list[str] = []
    baseline_name = BASELINES.get(name)
    if baseline_name is not None:
        torch.manual_seed(seed)
        baseline = fuse(randomize_batchnorm(create_model(baseline_name), seed).eval())
        candidates["baseline"] = lambda: baseline(*inputs)
    ort_max_rel = ort_memory = None
    if onnx:
        try:
            candidates["ort"], ort_max_rel, ort_memory = _ort_session(
                fused, inputs, directory, name
            )
        except Exception as error:  # the exporter and ORT raise many types; report, go on
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            notes.append(f"onnxruntime skipped: {type(error).__name__}: {first[:200]}")
    timings = time_candidates(candidates, repeats=repeats, warmup=warmup)
    torch_forms = ("train", "fused")
    memories = {key: peak_memory(candidates[key]) if memory else None for key in torch_forms}
    return ModelResult(
        name=name,
        shapes=[tuple(t.shape) for t in inputs],
        train=timings["train"],
        fused=timings["fused"],
        max_rel=max_rel,
        params_train=model_stats(model).parameters,
        params_fused=model_stats(fused).parameters,
        macs_train=count_macs(model, *inputs) // batch,
        macs_fused=count_macs(fused, *inputs) // batch,
        baseline_name=baseline_name,
        baseline=timings.get("baseline"),
        ort=timings.get("ort"),
        ort_max_rel=ort_max_rel,
        memory_train=memories["train"],
        memory_fused=memories["fused"],
        memory_ort=ort_memory if memory else None,
        notes=notes,
    )


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BenchSettings:
    """How a benchmark was run, for the report's header."""

    repeats: int
    warmup: int
    batch: int
    block_repeats: int | None = None
    block_shape: tuple[int, ...] | None = None
    model_size: int | None = None
    quick: bool = False


def _ms(timing: Timing | None) -> str:
    return "—" if timing is None else f"{timing.median * 1e3:.2f}"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f}"


def _target(ratio: float | None, limit: float, *, at_least: bool = False) -> str:
    """``met (1.02×)`` or ``**missed** (1.12×)`` for a ratio and its limit."""
    if ratio is None:
        return "—"
    met = ratio >= limit if at_least else ratio <= limit
    return f"{'met' if met else '**missed**'} ({ratio:.2f}×)"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    blocks: Sequence[BlockResult],
    models: Sequence[ModelResult],
    machine: MachineInfo,
    settings: BenchSettings,
) -> str:
    """The benchmark report: machine, method, a block table and a model table, in markdown."""
    lines = [
        "# reparam benchmarks"
        + (" (quick run: tiny shapes, few repeats)" if settings.quick else ""),
        "",
        f"- CPU: {machine.cpu}; {machine.cores} usable cores; {machine.system}",
        f"- torch {machine.torch_version} ({machine.torch_threads} intra-op threads), "
        f"onnxruntime {machine.ort_version} (same thread count, spinning off), "
        f"Python {machine.python}",
        f"- {settings.repeats} timed rounds"
        + (
            f" ({settings.block_repeats} for blocks)"
            if settings.block_repeats not in (None, settings.repeats)
            else ""
        )
        + f" after {settings.warmup} warm-up rounds; candidates "
        "interleaved in rotating order; times are medians in ms per batch; ratios are of "
        "medians from the same run.",
        "",
    ]
    if blocks:
        shape = "×".join(map(str, blocks[0].shape))
        lines += [
            f"## Blocks (input {shape}, eval mode, stride 1)",
            "",
            f"Target: the fused block within {BLOCK_TARGET}× of a plain conv of the same shape "
            "(followed by the same activation), the physical limit of fusion.",
            "",
        ]
        rows = [
            (
                r.name,
                r.description,
                _ms(r.train),
                _ms(r.fused),
                _ms(r.plain),
                f"{r.speedup:.2f}×",
                _target(r.fused_vs_plain, BLOCK_TARGET),
                f"{r.params_train:,} → {r.params_fused:,}",
                f"{r.max_rel:.1e}",
                f"{max(t.spread for t in (r.train, r.fused, r.plain)):.0%}",
            )
            for r in blocks
        ]
        headers = [
            "block",
            "branches",
            "train ms",
            "fused ms",
            "plain conv ms",
            "speedup",
            f"fused / plain ≤ {BLOCK_TARGET}",
            "params",
            "max rel err",
            "spread",
        ]
        lines += [_table(headers, rows), ""]
    if models:
        lines += [
            f"## Models (batch {settings.batch})",
            "",
            f"Targets: fused within {MODEL_LIMIT_TARGET}× of the plain network it fuses down to "
            f"(BN folded); fused ACNet ResNet-18 ≥ {MODEL_SPEEDUP_TARGET}× faster than its "
            "training-time form; onnxruntime no slower than torch eager on the fused model. "
            "MMACs per image count conv and linear layers.",
            "",
        ]
        rows = []
        for r in models:
            speed_target = SPEEDUP_TARGETS.get(r.name)
            rows.append(
                (
                    r.name,
                    "×".join(map(str, r.shapes[0])),
                    _ms(r.train),
                    _ms(r.fused),
                    f"{_ms(r.baseline)} ({r.baseline_name})" if r.baseline else "—",
                    _ms(r.ort),
                    (
                        _target(r.speedup, speed_target, at_least=True)
                        if speed_target
                        else f"{r.speedup:.2f}×"
                    ),
                    _target(r.fused_vs_baseline, MODEL_LIMIT_TARGET),
                    _target(r.ort_vs_torch, ORT_TARGET),
                    f"{_millions(r.params_train)} → {_millions(r.params_fused)}",
                    f"{_millions(r.macs_train)} → {_millions(r.macs_fused)}",
                    f"{_mib(r.memory_train)} / {_mib(r.memory_fused)} / {_mib(r.memory_ort)}",
                    f"{r.max_rel:.1e}"
                    + (f" / {r.ort_max_rel:.1e}" if r.ort_max_rel is not None else ""),
                    f"{max(t.spread for t in r.timings):.0%}",
                )
            )
        headers = [
            "model",
            "input",
            "train ms",
            "fused ms",
            "baseline ms",
            "ORT ms",
            "speedup (train / fused)",
            f"fused / baseline ≤ {MODEL_LIMIT_TARGET}",
            "ORT / torch ≤ 1",
            "params M",
            "MMACs / image",
            "peak MiB train / fused / ORT",
            "max rel err fused / ORT",
            "spread",
        ]
        lines += [_table(headers, rows), ""]
        notes = [f"- {r.name}: {note}" for r in models for note in r.notes]
        if notes:
            lines += ["Notes:", "", *notes, ""]
    lines += [
        "Peak memory is the rise of the process's resident set during one forward pass "
        "(activations plus library workspaces; approximate): for torch a steady-state pass, "
        "for onnxruntime its first run (its arena keeps what it grows). Spread is the largest "
        "interquartile range / median over a row's candidates. Times on a machine shared "
        "with other work are noisy: trust ratios more than absolute times.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- one call


QUICK_MODELS = ("acnet_tiny", "repvgg_tiny", "mobileone_tiny", "dbb_tiny")
"""What ``--quick`` benchmarks by default: small enough to export and time in seconds."""


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_benchmark(
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    blocks: Sequence[str] | None = None,
    batch: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    size: int | None = None,
    threads: int | None = None,
    onnx: bool = True,
    progress: Callable[[str], object] | None = None,
) -> str:
    """Run the block and model benchmarks and return the markdown report.

    The full run (the issue's targets): blocks at 8×64×56² (30 rounds), models at batch 8
    and their own input size (224² for the ImageNet ones, 10 rounds), torch's thread count.
    ``quick``: tiny shapes (blocks 2×8×16², the small bundled models at batch 2), 5 rounds,
    one thread (thread hand-off costs more than tiny convs); it finishes in seconds.

    Args:
        quick: tiny shapes and few repeats.
        models, blocks: names to run (an empty sequence skips that part); default all
            blocks and :data:`QUICK_MODELS` (quick) or :func:`default_models` (full).
        batch, repeats, warmup, size, threads: override the defaults above; ``size`` is
            the models' spatial input size.
        onnx: also time onnxruntime on the fused models.
        progress: called with a line before each block and model (e.g. to print it).

    Raises:
        UserInputError: an unknown name or a non-positive setting.
    """
    for what, value in (
        ("batch", batch),
        ("repeats", repeats),
        ("size", size),
        ("threads", threads),
    ):
        if value is not None and value < 1:
            raise UserInputError(f"{what} must be >= 1, got {value}")
    if warmup is not None and warmup < 0:
        raise UserInputError(f"warmup must be >= 0, got {warmup}")
    batch = batch or (2 if quick else 8)
    block_repeats = repeats or (5 if quick else 30)  # blocks are cheap and noisier
    repeats = repeats or (5 if quick else 10)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    threads = threads or (1 if quick else None)
    if models is None:
        models = [m for m in QUICK_MODELS if m in list_models()] if quick else default_models()
    block_names = _select(blocks, list_blocks(), "block")
    model_names = _select(models, list_models(), "model")
    channels, block_size = (8, 16) if quick else (64, 56)
    say = progress or (lambda _line: None)
    block_results, model_results = [], []
    with _torch_threads(threads):
        for name in block_names:
            say(f"block {name} ({batch}×{channels}×{block_size}²)")
            block_results += bench_blocks(
                [name],
                batch=batch,
                channels=channels,
                size=block_size,
                repeats=block_repeats,
                warmup=warmup,
            )
        for name in model_names:
            say(f"model {name} (batch {batch})")
            model_results += bench_models(
                [name], batch=batch, size=size, repeats=repeats, warmup=warmup, onnx=onnx
            )
        machine = machine_info()
    settings = BenchSettings(
        repeats=repeats,
        block_repeats=block_repeats,
        warmup=warmup,
        batch=batch,
        block_shape=(batch, channels, block_size, block_size),
        model_size=size,
        quick=quick,
    )
    return render_markdown(block_results, model_results, machine, settings)
