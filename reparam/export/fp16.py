"""Half-precision export: cast a fused model to float16, refusing weights that overflow.

A folded kernel is the conv weight times γ/σ: a BatchNorm with a tiny running variance can
push it past float16's largest value (65504), where the cast gives ``inf`` and the graph
computes garbage. Every floating parameter and buffer is checked before the cast, and the
first that does not fit is named. Inputs and outputs are float16 too, or stay float32 at
the graph's boundary with :class:`Float32Boundary` (one Cast in, one Cast out).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from reparam.errors import ExportError

__all__ = ["FP16_MAX", "Float32Boundary", "to_float16"]

FP16_MAX = float(torch.finfo(torch.float16).max)


def to_float16(model: nn.Module) -> nn.Module:
    """``model`` (a fused copy, changed in place) in float16.

    Raises:
        ExportError: a weight or buffer holds a value beyond ±65504, or one not finite,
            naming the layer.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        peak = tensor.detach().abs().max().item() if tensor.numel() else 0.0
        if not peak <= FP16_MAX:  # also catches NaN
            layer, _, attribute = name.rpartition(".")
            raise ExportError(
                f"layer '{layer or '(model)'}' has a {attribute} value of magnitude {peak:.4g}, "
                f"beyond float16's largest ({FP16_MAX:g}): export in float32 (a BatchNorm "
                "with a large weight or a tiny running variance makes a folded kernel this large)"
            )
    return model.half()


class Float32Boundary(nn.Module):
    """Float32 in and out, float16 inside: casts floating inputs down and outputs up."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> Any:
        half = [t.half() if t.is_floating_point() else t for t in inputs]
        outputs = self.model(*half)
        return pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
            outputs,
        )
