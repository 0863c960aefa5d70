"""One benchmark run: settings, a memory check before anything is allocated, both suites.

The full run: blocks at 8×64×56² (30 rounds), models at batch 8 and their own input size
(224² for the ImageNet ones, 10 rounds), torch's thread count. ``quick``: tiny shapes
(blocks 2×8×16², the small bundled models at batch 2), 5 rounds, one thread (thread
hand-off costs more than tiny convs); it finishes in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reparam.bench.blocks import (
    BlockResult,
    bench_blocks,
    block_specs,
    list_blocks,
    select,
)
from reparam.bench.machine import MachineInfo, machine_info
from reparam.bench.memory import available_memory, estimate_forward_bytes
from reparam.bench.models import (
    QUICK_MODELS,
    ModelResult,
    bench_models,
    default_models,
    model_input_shapes,
)
from reparam.bench.timing import torch_threads
from reparam.errors import UserInputError
from reparam.models import create_model, list_models

__all__ = ["BenchReport", "BenchSettings", "check_memory", "run_suite"]


@dataclass(frozen=True)
class BenchSettings:
    """How a benchmark was run, for the report's header."""

    repeats: int
    block_repeats: int
    warmup: int
    batch: int
    threads: int | None
    quick: bool = False


@dataclass
class BenchReport:
    """Everything one run measured: the machine, the settings and both suites' rows."""

    machine: MachineInfo
    settings: BenchSettings
    blocks: list[BlockResult] = field(default_factory=list)
    models: list[ModelResult] = field(default_factory=list)


def _gib(value: int) -> str:
    return f"{value / 2**30:,.1f} GiB"


def check_memory(
    models: Sequence[str],
    blocks: Sequence[str],
    *,
    batch: int,
    size: int | None,
    block_shape: tuple[int, int, int, int],
    onnx: bool = True,
    available: int | None = None,
) -> None:
    """Refuse a run that cannot fit in the memory the machine has, before allocating it.

    Each model and block is run once on the ``meta`` device (no storage) to estimate the
    memory of one forward pass (see :func:`estimate_forward_bytes`); nothing real is
    allocated. With ``onnx`` a model needs three times that: onnxruntime's arena keeps the
    peak of each of its two sessions (fused and unfused) alive beside torch.

    Raises:
        UserInputError: one line naming the model or block, the memory it would take and
            what this machine has available.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    specs = {spec.name: spec for spec in block_specs()}
    jobs: list[tuple[str, Callable, list[tuple[int, ...]]]] = [
        (f"model {name}", lambda n=name: create_model(n), model_input_shapes(name, batch, size))
        for name in models
    ]
    channels = block_shape[1]
    jobs += [
        (f"block {name}", lambda s=specs[name]: s.build(channels), [block_shape]) for name in blocks
    ]
    for what, build, shapes in jobs:
        copies = 3 if onnx and what.startswith("model") else 1
        # The inputs alone are checked first: beyond memory, building the model is wasted.
        needed, where = sum(4 * _numel(shape) for shape in shapes), "the input alone"
        if needed <= available:
            needed = estimate_forward_bytes(build, shapes) * copies
            where = "torch and 2 onnxruntime sessions" if copies == 3 else "one forward pass"
            where += ", estimated"
        if needed > available:
            shape = "×".join(map(str, shapes[0]))
            raise UserInputError(
                f"{what} at input {shape} needs about {_gib(needed)} ({where}); "
                f"this machine has {_gib(available)} available: use a smaller --size or --batch"
            )


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def run_suite(
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
) -> BenchReport:
    """Run the block and model benchmarks and return what they measured.

    Args:
        quick: tiny shapes and few repeats (see the module docstring).
        models, blocks: names to run (an empty sequence skips that part); default all
            blocks and :data:`QUICK_MODELS` (quick) or :func:`default_models` (full).
        batch, repeats, warmup, size, threads: override the defaults; ``size`` is the
            models' spatial input size.
        onnx: also time onnxruntime on the fused and the unfused models.
        progress: called with a line as each block and each stage of a model starts.

    Raises:
        UserInputError: an unknown name, a non-positive setting, or a run too large for
            this machine's memory; raised before anything is measured.
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
    block_names = select(blocks, list_blocks(), "block")
    model_names = select(models, list_models(), "model")
    channels, block_size = (8, 16) if quick else (64, 56)
    block_shape = (batch, channels, block_size, block_size)
    check_memory(
        model_names, block_names, batch=batch, size=size, block_shape=block_shape, onnx=onnx
    )
    say = progress or (lambda _line: None)
    report = BenchReport(
        machine=machine_info(),
        settings=BenchSettings(repeats, block_repeats, warmup, batch, threads, quick),
    )
    with torch_threads(threads):
        for name in block_names:
            say(f"block {name} ({'×'.join(map(str, block_shape))})")
            report.blocks += bench_blocks(
                [name],
                batch=batch,
                channels=channels,
                size=block_size,
                repeats=block_repeats,
                warmup=warmup,
            )
        for name in model_names:
            say(f"model {name} (batch {batch})")
            report.models += bench_models(
                [name],
                batch=batch,
                size=size,
                repeats=repeats,
                warmup=warmup,
                onnx=onnx,
                progress=say,
            )
        # Read at the end, under the run's thread count, with the load the run saw.
        report.machine = machine_info()
    return report
