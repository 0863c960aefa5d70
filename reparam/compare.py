"""Numeric comparison of model outputs, shared by the tests, ``reparam fuse`` and ``verify``.

For a reference output r and a candidate c, each output tensor is summarised by
max|c − r|, the relative error max|c − r| / max|r| (one scale per tensor, so outputs near
zero do not blow it up), and the cosine similarity of the flattened tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OutputDiff", "compare_outputs", "flatten_outputs"]


@dataclass(frozen=True)
class OutputDiff:
    """How far one candidate output is from its reference."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """True when max_abs ≤ atol + rtol·max|reference|, i.e. the error is within tolerance."""
        return self.max_abs <= atol or self.max_rel <= rtol


def flatten_outputs(outputs: object, prefix: str = "output") -> list[tuple[str, Tensor]]:
    """Named tensors of a model output that may be a tensor, tuple, list or dict of them."""
    if isinstance(outputs, Tensor):
        return [(prefix, outputs)]
    if isinstance(outputs, Mapping):
        items: Iterable = outputs.items()
    elif isinstance(outputs, list | tuple):
        items = enumerate(outputs)
    else:
        raise TypeError(f"cannot compare an output of type {type(outputs).__name__}")
    flat: list[tuple[str, Tensor]] = []
    for key, value in items:
        flat.extend(flatten_outputs(value, f"{prefix}.{key}"))
    return flat


def compare_outputs(reference: object, candidate: object) -> list[OutputDiff]:
    """One :class:`OutputDiff` per output tensor; arithmetic in float64 on the CPU."""
    refs, cands = flatten_outputs(reference), flatten_outputs(candidate)
    if len(refs) != len(cands):
        raise ValueError(f"reference has {len(refs)} outputs, candidate has {len(cands)}")
    diffs = []
    for (name, ref), (_, cand) in zip(refs, cands, strict=True):
        ref64 = torch.as_tensor(ref).detach().to("cpu", torch.float64)
        cand64 = torch.as_tensor(cand).detach().to("cpu", torch.float64)
        if ref64.shape != cand64.shape:
            raise ValueError(
                f"{name}: reference shape {tuple(ref64.shape)} != candidate {tuple(cand64.shape)}"
            )
        error = (cand64 - ref64).abs()
        max_abs = error.max().item() if error.numel() else 0.0
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        norms = ref64.norm() * cand64.norm()
        cosine = (ref64.flatten() @ cand64.flatten() / norms).item() if norms > 0 else 1.0
        diffs.append(OutputDiff(name, tuple(ref64.shape), max_abs, max_rel, cosine))
    return diffs
