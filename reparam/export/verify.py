"""Check an ONNX file against the PyTorch model it came from, under onnxruntime.

The reference is the training-time model in eval mode — not the fused one — so one check
covers fusion and export together. The graph runs twice per input set: with ORT's graph
optimisations disabled (so ORT's own Conv+BN fusion cannot hide a bug) and with the defaults
users run. Each output is compared with :func:`reparam.compare.compare_outputs` (max abs
error, max abs error / max |reference|, cosine similarity). A graph with a dynamic batch is
checked at several batch sizes.

Cost: one ORT session per optimisation level, reused across batch sizes; the random inputs
are drawn once at the largest batch and each smaller batch is its leading slice, so the
PyTorch reference runs once and is sliced too. A sample's output depends only on that sample
in eval mode; where a model mixes samples (or an output has no batch axis) the sliced
reference would be wrong, so a case that fails against it is re-run against the model at
that exact batch before it counts as a failure.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from reparam.compare import OutputDiff, check_tolerance, compare_outputs
from reparam.errors import UserInputError, summarize
from reparam.export.signature import InputTree, unflatten_inputs
from reparam.export.verify_report import VerifyCase, VerifyReport
from reparam.runtime.safety import check_allocation

__all__ = ["VerifyCase", "VerifyReport", "eval_mode_of", "verify_onnx"]

OPTIMIZATIONS = ("disable", "all")
DEFAULT_BATCH_SIZES = (1, 2, 3)

Progress = Callable[[str], None]


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct positive integers, or UserInputError."""
    sizes = list(batch_sizes)
    if not sizes or any(
        isinstance(size, bool) or not hasattr(size, "__index__") or int(size) < 1 for size in sizes
    ):
        raise UserInputError(f"batch_sizes must be positive integers, got {sizes!r}")
    return tuple(sorted({int(size) for size in sizes}))


def _check_tolerances(rtol: float, atol: float, batch_sizes: Sequence[int]) -> list[int]:
    """The one validation of tolerances (reparam.compare) and batch sizes, for every caller."""
    check_tolerance(rtol, "rtol")
    check_tolerance(atol, "atol")
    return list(check_batch_sizes(batch_sizes))


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Any = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
    providers: Sequence[str] | None = None,
    progress: Progress | None = None,
    reference_name: str = "",
) -> VerifyReport:
    """Compare the ONNX graph at ``path`` with ``model`` under onnxruntime.

    Args:
        model: the reference, normally the training-time (unfused) model; run in eval mode
            (its training flags are restored afterwards). Its inputs are cast to its own
            floating dtype, so an fp16 graph is checked against an fp32 model.
        path: the ``.onnx`` file.
        inputs: a tensor/array, a sequence of them in graph order (sequences of tensors
            count as their items, as for ``export_onnx``), or a dict by graph input name.
            Without them, standard-normal inputs of the graph's shapes are drawn (symbolic
            spatial axes take the export example's sizes, recorded in the metadata).
        rtol, atol: an output passes when max abs error ≤ atol or max abs error / max
            |reference| ≤ rtol.
        batch_sizes: when the graph's batch axis is dynamic, also check random inputs of
            these batch sizes (with the per-sample shape of ``inputs`` when given).
        seed: for the random inputs.
        providers: ORT execution providers; default the CPU one, whose float32 convolutions
            are exact to rounding (a GPU provider may use TF32 and differ by ~1e-3).
        progress: called with a short line before each slow step.
        reference_name: what ``model`` is, for the report's summary.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False on any mismatch.

    Raises:
        UserInputError: missing or corrupt file, bad tolerances or batch sizes, inputs that
            do not fit the graph or the model.
        MissingCustomOpError: a graph with custom operators without onnxruntime-extensions.
    """
    from reparam.runtime import OnnxModel

    started = time.perf_counter()
    sizes = _check_tolerances(rtol, atol, batch_sizes)
    say = progress or (lambda line: None)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    say("verify: loading the graph into onnxruntime")
    sessions = {
        level: OnnxModel(path, providers=providers, optimization=level) for level in OPTIMIZATIONS
    }
    first = sessions[OPTIMIZATIONS[0]]
    report = VerifyReport(
        Path(path), rtol, atol, first.providers, first.output_names, reference=reference_name
    )
    dynamic_batch = bool(first.inputs) and all(
        spec.shape and not isinstance(spec.shape[0], int) for spec in first.inputs
    )
    compare_sessions(
        model, sessions, report, inputs, batch_sizes=sizes, seed=seed,
        dynamic_batch=dynamic_batch, runtime="onnxruntime", say=say,
    )  # fmt: skip
    report.seconds = time.perf_counter() - started
    return report


def compare_sessions(
    model: nn.Module,
    sessions: dict[str, Any],
    report: VerifyReport,
    inputs: Any,
    *,
    batch_sizes: Sequence[int],
    seed: int,
    dynamic_batch: bool,
    runtime: str,
    say: Progress,
) -> None:
    """Add to ``report`` the comparison of each session (``{level: session}``, one graph)
    with ``model``: on ``inputs`` when given, and, when the batch axis is dynamic, at every
    other batch size of ``batch_sizes`` (random inputs of the given per-sample shape, or of
    the graph's); on random inputs of the graph's shapes when neither applies. Every runtime
    :mod:`reparam.runtime.verify_runtimes` checks goes through here, so all are judged alike.
    """
    first = next(iter(sessions.values()))
    given: list[np.ndarray] | None = None
    per_sample = None
    if inputs is not None:
        feeds = (
            first.feeds(dict(inputs))
            if isinstance(inputs, Mapping)
            else first.feeds(*_as_arrays(inputs))
        )
        given = list(feeds.values())
        per_sample = [array.shape[1:] for array in given]

    rebuild = _rebuild(first)
    with eval_mode_of(model):
        if given is not None:
            say(f"verify: inputs {_shapes(given)}")
            reference = _reference(model, given, rebuild)
            for level, session in sessions.items():
                report.cases.append(_compare(session, level, given, reference))
        if dynamic_batch:
            done = {given[0].shape[0]} if given is not None else set()
            batches = [b for b in batch_sizes if b not in done]
            if batches:
                _check_batches(
                    model, sessions, batches, per_sample, seed, rebuild, report, say, runtime
                )
        elif given is None:
            arrays = list(first.random_inputs(seed=seed).values())
            say(f"verify: inputs {_shapes(arrays)}")
            reference = _reference(model, arrays, rebuild)
            for level, session in sessions.items():
                report.cases.append(_compare(session, level, arrays, reference))


def _check_batches(
    model: nn.Module,
    sessions: dict[str, Any],
    batches: list[int],
    per_sample: list[tuple[int, ...]] | None,
    seed: int,
    rebuild: Callable[[list[torch.Tensor]], tuple[tuple, dict]],
    report: VerifyReport,
    say: Progress,
    runtime: str,
) -> None:
    """Every batch size from one draw at the largest: leading slices of inputs and reference."""
    first = next(iter(sessions.values()))
    largest = max(batches)
    shapes = (
        [(largest, *shape) for shape in per_sample]
        if per_sample is not None
        else first.concrete_shapes(largest)
    )
    check_allocation(shapes, [np.float64] * len(shapes), "the random verification input")
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal(shape).astype(spec.dtype)
        for spec, shape in zip(first.inputs, shapes, strict=True)
    ]
    say(f"verify: PyTorch reference at batch {largest}")
    full = _reference(model, arrays, rebuild)
    sliceable = all(t.dim() and t.shape[0] == largest for t in _tensors(full))
    for batch in batches:
        say(f"verify: {runtime} at batch {batch}")
        part = [array[:batch] for array in arrays]
        reference = _slice(full, batch) if sliceable else _reference(model, part, rebuild)
        for level, session in sessions.items():
            case = _compare(session, level, part, reference)
            if sliceable and batch != largest and not case.ok(report.rtol, report.atol):
                # the model may mix samples: judge against the model at this batch
                case = _compare(session, level, part, _reference(model, part, rebuild))
            report.cases.append(case)


def _tensors(outputs: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _slice(outputs: Any, batch: int) -> Any:
    return pytree.tree_map(
        lambda leaf: leaf[:batch] if isinstance(leaf, torch.Tensor) else leaf, outputs
    )


def _shapes(arrays: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, array.shape)) for array in arrays)


class eval_mode_of:
    """Eval mode inside the block; every submodule's training flag restored after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, training in self.flags:
            module.training = training


def _as_arrays(inputs: Any) -> list[Any]:
    """Graph-order arrays from a tensor/array, or a sequence of them and of sequences."""
    if isinstance(inputs, torch.Tensor | np.ndarray):
        return [inputs]
    flat: list[Any] = []
    for item in inputs:
        flat.extend(item if isinstance(item, list | tuple) else [item])
    return flat


def _rebuild(session: Any) -> Callable[[list[torch.Tensor]], tuple[tuple, dict]]:
    """How graph inputs become the model's ``(args, kwargs)``, from the file's metadata."""
    tree_text = session.metadata.get("reparam.input_tree")
    tree = InputTree.from_json(tree_text) if tree_text else None
    if tree is not None and sum(slot is not None for slot in tree.slots) == len(session.inputs):
        return tree.rebuild
    raw = session.metadata.get("reparam.input_structure")  # files from older versions
    try:
        structure = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        structure = None
    if not isinstance(structure, list) or not all(
        entry is None or (isinstance(entry, int) and entry > 0) for entry in structure
    ):
        structure = [None] * len(session.inputs)
    return lambda flat: (tuple(unflatten_inputs(flat, structure)), {})


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _reference(
    model: nn.Module,
    arrays: list[np.ndarray],
    rebuild: Callable[[list[torch.Tensor]], tuple[tuple, dict]],
) -> Any:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = _model_dtype(model)
    tensors = []
    for array in arrays:
        tensor = torch.from_numpy(array).to(device)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # an fp16 graph's inputs, for an fp32 model
        tensors.append(tensor)
    args, kwargs = rebuild(tensors)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        raise UserInputError(
            f"the PyTorch model does not run on input shape(s) {_shapes(arrays)}: "
            f"{summarize(error)}"
        ) from None


def _compare(session: Any, level: str, arrays: list[np.ndarray], reference: Any) -> VerifyCase:
    shapes = [tuple(array.shape) for array in arrays]
    try:
        outputs = session.run(*arrays)
    except UserInputError as error:
        return VerifyCase(level, shapes, [], str(error))
    candidate = [torch.from_numpy(value) for value in outputs.values()]
    try:
        diffs = compare_outputs(reference, candidate)
    except ValueError as error:  # different output count or shape
        return VerifyCase(level, shapes, [], str(error))
    named = [
        OutputDiff(name, d.shape, d.max_abs, d.max_rel, d.cosine)
        for name, d in zip(outputs, diffs, strict=True)
    ]
    return VerifyCase(level, shapes, named)
