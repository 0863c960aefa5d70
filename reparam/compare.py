"""Numeric comparison of model outputs, shared by the tests, ``reparam fuse`` and ``verify``.

For a reference output r and a candidate c, each output tensor is summarised by
max|c − r|, the relative error max|c − r| / max|r| (one scale per tensor, so outputs near
zero do not blow it up), and the cosine similarity of the flattened tensors.

Non-finite values count as infinitely wrong. NaN counts so even where the reference holds NaN
at the same place: a model whose weights are all NaN must not pass a check as "max rel 0,
cosine 1" against a copy of itself. Only an infinity matched by the same infinity at the
same place is left out of the errors (an overflow both sides agree on). A NaN difference
must never pass a ``max_rel <= rtol`` check by comparing false.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from reparam.errors import UserInputError

__all__ = ["OutputDiff", "check_tolerance", "compare_outputs", "flatten_outputs"]


def check_tolerance(value: float, name: str = "rtol") -> float:
    """``value`` as a float if it is a finite number ≥ 0; otherwise UserInputError.

    A NaN tolerance would make every comparison false and so disable the check.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise UserInputError(f"{name} must be finite and >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class OutputDiff:
    """How far one candidate output is from its reference."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """True when max_abs ≤ atol or max_rel ≤ rtol; always False for a non-finite error.

        Raises:
            UserInputError: a tolerance is negative, NaN or infinite.
        """
        rtol, atol = check_tolerance(rtol, "rtol"), check_tolerance(atol, "atol")
        if not (math.isfinite(self.max_abs) and math.isfinite(self.max_rel)):
            return False
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
        diffs.append(_diff(name, ref64, cand64))
    return diffs


def _diff(name: str, ref: Tensor, cand: Tensor) -> OutputDiff:
    """Errors over the finite entries; NaN anywhere, or an infinity the other side does not
    hold at the same place, makes them infinite."""
    shape = tuple(ref.shape)
    same_special = ref.isinf() & (ref == cand)
    finite = ref.isfinite() & cand.isfinite()
    if not bool((finite | same_special).all()):
        return OutputDiff(name, shape, math.inf, math.inf, math.nan)
    ref, cand = ref[finite], cand[finite]  # flattened: the shape reported is the output's
    error = (cand - ref).abs()
    max_abs = error.max().item() if error.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    norms = ref.norm() * cand.norm()
    # Both all-zero (or empty) agree exactly; all-zero against non-zero does not.
    fallback = 1.0 if max_abs == 0 else 0.0
    cosine = (ref @ cand / norms).item() if norms > 0 else fallback
    return OutputDiff(name, shape, max_abs, max_rel, cosine)
