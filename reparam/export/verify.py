"""Check an ONNX file against the PyTorch model it came from, under onnxruntime.

The reference is the training-time model in eval mode — not the fused one — so one check
covers fusion and export together. The graph runs twice per input set: with ORT's graph
optimisations disabled (so ORT's own Conv+BN fusion cannot hide a bug, REFERENCE.md §4) and
with the defaults users run. Each output is compared with :func:`reparam.compare.compare_outputs`
(max abs error, max abs error / max |reference|, cosine similarity). A graph with a dynamic
batch is checked at several batch sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reparam.compare import OutputDiff, compare_outputs
from reparam.errors import UserInputError
from reparam.export.onnx_export import unflatten_inputs

__all__ = ["VerifyCase", "VerifyReport", "verify_onnx"]

DEFAULT_BATCH_SIZES = (1, 2, 3)
OPTIMIZATIONS = ("disable", "all")


@dataclass
class VerifyCase:
    """One comparison: an input set under one ORT optimisation level."""

    optimization: str
    input_shapes: list[tuple[int, ...]]
    diffs: list[OutputDiff]
    error: str = ""

    def ok(self, rtol: float, atol: float) -> bool:
        return not self.error and all(d.within(rtol, atol) for d in self.diffs)


@dataclass
class VerifyReport:
    """All comparisons of :func:`verify_onnx`; ``ok`` when every one is within tolerance.

    An output is within tolerance when max abs error ≤ atol or max abs error / max
    |reference| ≤ rtol (:meth:`reparam.compare.OutputDiff.within`).
    """

    path: Path
    rtol: float
    atol: float
    providers: list[str]
    output_names: list[str]
    cases: list[VerifyCase] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(case.ok(self.rtol, self.atol) for case in self.cases)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({case.input_shapes[0][0] for case in self.cases if case.input_shapes[0]})

    def worst(self) -> list[OutputDiff]:
        """Per output: the largest errors and the smallest cosine over all cases."""
        worst: dict[str, OutputDiff] = {}
        for case in self.cases:
            for diff in case.diffs:
                old = worst.get(diff.name)
                if old is None:
                    worst[diff.name] = diff
                    continue
                worst[diff.name] = OutputDiff(
                    diff.name,
                    old.shape,
                    max(old.max_abs, diff.max_abs),
                    max(old.max_rel, diff.max_rel),
                    min(old.cosine, diff.cosine),
                )
        return list(worst.values())

    def failures(self) -> list[str]:
        """One line per case or output beyond tolerance, with its numbers."""
        lines = []
        for case in self.cases:
            where = f"ORT optimizations {case.optimization}, inputs {_shapes(case.input_shapes)}"
            if case.error:
                lines.append(f"{where}: {case.error}")
            for diff in case.diffs:
                if not diff.within(self.rtol, self.atol):
                    lines.append(
                        f"{where}: output '{diff.name}' max abs {diff.max_abs:.3g} "
                        f"(atol {self.atol:g}), max rel {diff.max_rel:.3g} (rtol {self.rtol:g}), "
                        f"cosine {diff.cosine:.9f}"
                    )
        return lines

    def failure_summary(self) -> str:
        """A one-line account of the worst failure, for error messages."""
        failures = self.failures()
        if not failures:
            return "within tolerance"
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"ONNX output differs from the PyTorch model: {failures[0]}{more}"


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join("x".join(map(str, shape)) for shape in shapes)


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
) -> VerifyReport:
    """Compare the ONNX graph at ``path`` with ``model`` under onnxruntime.

    Args:
        model: the reference, normally the training-time (unfused) model; run in eval mode
            (its training flags are restored afterwards).
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

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False on any mismatch.

    Raises:
        UserInputError: missing or corrupt file, inputs that do not fit the graph or the
            model, or missing onnxruntime-extensions for a graph with custom operators.
    """
    from reparam.runtime import OnnxModel

    providers = list(providers) if providers else ["CPUExecutionProvider"]
    sessions = {
        level: OnnxModel(path, providers=providers, optimization=level) for level in OPTIMIZATIONS
    }
    first = sessions[OPTIMIZATIONS[0]]
    report = VerifyReport(Path(path), rtol, atol, first.providers, first.output_names)
    dynamic_batch = bool(first.inputs) and all(
        spec.shape and not isinstance(spec.shape[0], int) for spec in first.inputs
    )

    input_sets: list[list[np.ndarray]] = []
    if inputs is not None:
        given = (
            first.feeds(dict(inputs))
            if isinstance(inputs, Mapping)
            else first.feeds(*_as_arrays(inputs))
        )
        input_sets.append(list(given.values()))
        per_sample = [array.shape[1:] for array in given.values()]
    else:
        per_sample = None
    if dynamic_batch:
        rng = np.random.default_rng(seed)
        done = {arrays[0].shape[0] for arrays in input_sets}
        for batch in batch_sizes:
            if batch in done:
                continue
            shapes = (
                [(batch, *shape) for shape in per_sample]
                if per_sample is not None
                else first.concrete_shapes(batch)
            )
            input_sets.append(
                [
                    rng.standard_normal(shape).astype(spec.dtype)
                    for spec, shape in zip(first.inputs, shapes, strict=True)
                ]
            )
    elif not input_sets:
        input_sets.append(list(first.random_inputs(seed=seed).values()))

    structure = _structure(first)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for arrays in input_sets:
            reference = _reference(model, arrays, structure)
            for level, session in sessions.items():
                report.cases.append(_compare(session, level, arrays, reference))
    finally:
        for module, training in flags:
            module.training = training
    return report


def _as_arrays(inputs: Any) -> list[Any]:
    """Graph-order arrays from a tensor/array, or a sequence of them and of sequences."""
    if isinstance(inputs, torch.Tensor | np.ndarray):
        return [inputs]
    flat: list[Any] = []
    for item in inputs:
        flat.extend(item if isinstance(item, list | tuple) else [item])
    return flat


def _structure(session: Any) -> list[int | None]:
    raw = session.metadata.get("reparam.input_structure")
    try:
        structure = json.loads(raw) if raw else None
    except ValueError:
        structure = None
    if not isinstance(structure, list):
        return [None] * len(session.inputs)
    return structure


def _reference(model: nn.Module, arrays: list[np.ndarray], structure: list[int | None]) -> Any:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tensors = [torch.from_numpy(array).to(device) for array in arrays]
    try:
        with torch.no_grad():
            return model(*unflatten_inputs(tensors, structure))
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"the PyTorch model does not run on input shape(s) "
            f"{_shapes([a.shape for a in arrays])}: {first}"
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
