"""Helpers for equivalence checks: realistic BatchNorm statistics and a fused-vs-original check.

Freshly built BatchNorms have mean 0, variance 1, γ = 1, β = 0: folding them is almost the
identity and hides formula bugs. :func:`randomize_batchnorm` gives every BN running
statistics and affine parameters of a trained network, with γ ≈ 1 (a tiny γ shrinks outputs
and hides errors too).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from reparam.compare import OutputDiff, compare_outputs
from reparam.convert import fuse

__all__ = ["assert_fuses_exactly", "randomize_batchnorm"]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's μ ~ U(−1, 1), v ~ U(0.5, 1.5), γ ~ U(0.5, 1.5), β ~ U(−0.5, 0.5).

    Modifies ``model`` in place and returns it. Deterministic for a given seed.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
        tensor.copy_((low + (high - low) * values).to(tensor.dtype))

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            if module.running_mean is not None:
                uniform(module.running_mean, -1.0, 1.0)
                uniform(module.running_var, 0.5, 1.5)
            if module.affine:
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.5, 0.5)
    return model


def assert_fuses_exactly(
    model: nn.Module, *inputs: torch.Tensor, rtol: float, **fuse_kwargs
) -> tuple[nn.Module, list[OutputDiff]]:
    """Fuse ``model`` and assert every output is within ``rtol`` (max|Δ| / max|ref|).

    The reference is ``model`` in eval mode. Returns the fused model and the differences.
    """
    model.eval()
    with torch.no_grad():
        reference = model(*inputs)
        fused = fuse(model, **fuse_kwargs)
        candidate = fused(*inputs)
    diffs = compare_outputs(reference, candidate)
    for diff in diffs:
        assert diff.max_rel <= rtol, (
            f"{diff.name}: max error / max |output| = {diff.max_rel:.3g} > {rtol:.1g} "
            f"(max abs {diff.max_abs:.3g})"
        )
    return fused, diffs
