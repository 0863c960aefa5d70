"""The model suite: each bundled model's training form vs fused form, in torch and ORT.

Per model: the training-time form (eval) and the fused form in torch eager; the plain
network it fuses down to, where one exists (ResNet-18 with BN folded for the ACNet and DBB
variants); the fused model under onnxruntime; and what a user would do without reparam:
the *unfused* model exported to ONNX and run under onnxruntime with every graph
optimisation on (ORT folds Conv+BN, but not parallel branches). All candidates of one
model are timed interleaved (see :func:`reparam.bench.timing.time_candidates`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from reparam.bench.blocks import select
from reparam.bench.memory import peak_memory
from reparam.bench.timing import Timing, time_candidates
from reparam.compare import compare_outputs
from reparam.convert import fuse
from reparam.errors import summarize
from reparam.macs import count_macs
from reparam.models import create_model, get_model_info, list_models
from reparam.models import mobileone_nets as _mobileone_nets  # noqa: F401  (registers models)
from reparam.models import repvgg_nets as _repvgg_nets  # noqa: F401  (registers models)
from reparam.summary import model_stats
from reparam.testing import randomize_batchnorm

__all__ = [
    "BASELINES",
    "QUICK_MODELS",
    "ModelResult",
    "bench_models",
    "default_models",
    "model_input_shapes",
]

BASELINES = {"acnet_resnet18": "resnet18", "dbb_resnet18": "resnet18"}
"""Model → the plain model (Conv-BN everywhere) its fused form is structurally equal to."""
SMALL_INPUT = 64
"""Bundled models whose example input is at most this size (spatial) are the --quick set."""
QUICK_MODELS = ("acnet_tiny", "repvgg_tiny", "mobileone_tiny", "dbb_tiny")
"""What ``--quick`` benchmarks by default: small enough to export and time in seconds."""


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
    """One bundled model's timings and sizes on one input shape.

    ``ort`` times the fused model under onnxruntime, ``ort_unfused`` the training-time
    model exported as it is and optimised by onnxruntime; ``macs_*`` are per image.
    """

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
    ort_unfused: Timing | None = None
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
    def ort_vs_torch(self) -> float | None:
        return self.ort.median / self.fused.median if self.ort else None

    @property
    def ort_speedup(self) -> float | None:
        """How much faster the fused graph runs in ORT than the ORT-optimised unfused one."""
        if self.ort is None or self.ort_unfused is None:
            return None
        return self.ort_unfused.median / self.ort.median

    @property
    def timings(self) -> list[Timing]:
        candidates = (self.train, self.fused, self.baseline, self.ort, self.ort_unfused)
        return [t for t in candidates if t is not None]

    @property
    def spread(self) -> float:
        """The largest spread of the row's timings."""
        return max(t.spread for t in self.timings)


def model_input_shapes(name: str, batch: int, size: int | None) -> list[tuple[int, ...]]:
    """A bundled model's input shapes at ``batch`` and (where given) spatial ``size``."""
    shapes = []
    for shape in get_model_info(name).input_shapes:
        shape = (batch, *shape[1:])
        if size is not None and len(shape) >= 3:
            shape = (*shape[:2], *([size] * (len(shape) - 2)))
        shapes.append(shape)
    return shapes


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
    progress: Callable[[str], object] | None = None,
) -> list[ModelResult]:
    """Time each bundled model: training form vs fused vs baseline vs onnxruntime.

    Args:
        names: bundled models (see :func:`reparam.models.list_models`); default
            :func:`default_models`.
        batch: batch size of the inputs.
        size: spatial size of the inputs; default each model's example size.
        repeats, warmup: rounds per comparison (see :func:`time_candidates`).
        onnx: also export the fused and the unfused model (dynamo exporter, to a temporary
            directory) and time both under onnxruntime. An export failure becomes a note,
            not an error.
        memory: measure approximate peak memory per forward (see :func:`peak_memory`).
        seed: for weights, BN statistics and inputs.
        progress: called with a short line as each stage of a model starts.

    Raises:
        UserInputError: an unknown model name.
    """
    names = select(names, list_models(), "model") if names is not None else default_models()
    say = progress or (lambda _line: None)
    results = []
    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
        for name in names:
            results.append(
                _bench_model(name, batch, size, repeats, warmup, onnx, memory, seed, Path(tmp), say)
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
    say: Callable[[str], object],
) -> ModelResult:
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(s, generator=generator) for s in model_input_shapes(name, batch, size)]
    say(f"{name}: fusing")
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
        say(f"{name}: exporting the fused model to ONNX")
        try:
            candidates["ort"], ort_max_rel, ort_memory = _ort_session(
                fused, inputs, directory / f"{name}.onnx", name
            )
        except Exception as error:  # the exporter and ORT raise many types; report, go on
            notes.append(f"onnxruntime skipped: {summarize(error, 200)}")
        say(f"{name}: exporting the unfused model to ONNX")
        try:
            candidates["ort_unfused"], _, _ = _ort_session(
                model, inputs, directory / f"{name}-unfused.onnx", name
            )
        except Exception as error:  # as above
            notes.append(f"onnxruntime (unfused) skipped: {summarize(error, 200)}")
    say(f"{name}: timing {', '.join(candidates)}")
    timings = time_candidates(candidates, repeats=repeats, warmup=warmup)
    memories = {key: peak_memory(candidates[key]) if memory else None for key in ("train", "fused")}
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
        ort_unfused=timings.get("ort_unfused"),
        ort_max_rel=ort_max_rel,
        memory_train=memories["train"],
        memory_fused=memories["fused"],
        memory_ort=ort_memory if memory else None,
        notes=notes,
    )


def _ort_session(module: nn.Module, inputs: list[Tensor], path: Path, name: str):
    """Export ``module`` as it is (no fusing) and open it in onnxruntime, all optimisations on.

    Returns ``(run, max_rel, memory)``: a zero-argument callable running the session on
    ``inputs``, the session's error against torch, and the peak memory of its first run
    (measured then because ORT's arena keeps what it grows). Uses :mod:`reparam.runtime`
    (spinning off, as many intra-op threads as torch uses).
    """
    from reparam import runtime  # imports onnxruntime: only when ORT is benchmarked
    from reparam.export import export_onnx  # imports onnx and the exporter

    export_onnx(module, path, inputs, fuse=False, dynamic_batch=False, source=name)
    session = runtime.load(path, threads=torch.get_num_threads(), optimization="all")
    feeds = session.feeds(*[t.numpy() for t in inputs])
    raw = session.session

    def run() -> object:
        return raw.run(None, feeds)

    with torch.inference_mode():
        reference = module(*inputs)
    first: list = []
    memory = peak_memory(lambda: first.extend(run()))
    outputs = [torch.from_numpy(array) for array in first]
    candidate = outputs[0] if len(outputs) == 1 else outputs
    if isinstance(reference, list | tuple) and not isinstance(candidate, list):
        candidate = [candidate]
    max_rel = max(d.max_rel for d in compare_outputs(reference, candidate))
    return run, max_rel, memory
