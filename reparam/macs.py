"""Multiply-adds of one forward pass, counted by torch's FLOP counter.

``torch.utils.flop_counter.FlopCounterMode`` sees every ATen operator a forward dispatches,
so it counts functional convolutions (``F.conv2d`` inside a ``forward``) and matrix
products as well as ``nn.Conv2d`` / ``nn.Linear`` layers; a forward hook on conv modules
misses the former. It reports FLOPs = 2 × multiply-adds for convolutions and matrix
products, and does not count elementwise work (BN, activations, additions, the
shift-and-accumulate of Involution).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from reparam.ops.corr import corr_output_size

__all__ = ["count_macs"]


def _corr_flops(
    x_shape: list[int],
    kernel_shape: list[int],
    groups: int = 1,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    *,
    out_shape: list[int] | None = None,
    **_: object,
) -> int:
    """FLOPs of ``reparam::corr``: a per-sample conv with kernel (B, C_out, C_in/g, kh, kw).

    The custom operator is opaque to the counter (it sees the op, not the grouped conv
    inside), so it needs its own formula.
    """
    batch, _, height, width = x_shape
    _, out_channels, in_per_group, kh, kw = kernel_shape
    if out_shape is not None:
        out_h, out_w = out_shape[2], out_shape[3]
    else:
        out_h = corr_output_size(height, kh, stride, padding, dilation)
        out_w = corr_output_size(width, kw, stride, padding, dilation)
    return 2 * batch * out_channels * out_h * out_w * in_per_group * kh * kw


def count_macs(model: nn.Module, *inputs: Tensor) -> int:
    """Multiply-adds of convolutions and matrix products in one forward pass on ``inputs``.

    Counts for the whole batch: divide by the batch size for a per-image figure.
    """
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.reparam.corr: _corr_flops})
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops() // 2
