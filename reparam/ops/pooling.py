"""Adaptive average pooling to (n_h, n_w), exact for every input size and export-safe.

``nn.AdaptiveAvgPool2d`` averages, for output row i of n over an input of length L, the
window [floor(i·L/n), ceil((i+1)·L/n)). That is a linear map along each axis, so

    y = P_h · x · P_wᵀ,   P[i, l] = 1 / (end_i − start_i) if start_i <= l < end_i else 0,

with start_i = floor(i·L/n) and end_i = ceil((i+1)·L/n). The matrices are built at run time
from the tensor's size with ``arange`` and integer arithmetic, so a ``torch.export``-based
ONNX export with dynamic H/W computes them from the actual input: the exporter otherwise
turns ``AdaptiveAvgPool2d((k, k))`` into an ``AveragePool`` sized for the example input,
silently wrong at every other size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AdaptiveAvgPool2dExact", "adaptive_avg_pool2d_exact", "pooling_matrix"]


def pooling_matrix(length, n: int, like: Tensor) -> Tensor:
    """The (n, length) averaging matrix of adaptive pooling, in ``like``'s dtype and device.

    Args:
        length: the input length L (an int, or a symbolic size while exporting).
        n: the output length.
        like: a tensor whose dtype and device the matrix takes.
    """
    rows = torch.arange(n, device=like.device)
    positions = torch.arange(length, device=like.device)
    start = torch.div(rows * length, n, rounding_mode="floor")
    end = torch.div((rows + 1) * length + (n - 1), n, rounding_mode="floor")
    inside = (positions.unsqueeze(0) >= start.unsqueeze(1)) & (
        positions.unsqueeze(0) < end.unsqueeze(1)
    )
    counts = (end - start).to(like.dtype).unsqueeze(1)
    return inside.to(like.dtype) / counts


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def adaptive_avg_pool2d_exact(x: Tensor, output_size: int | tuple[int, int]) -> Tensor:
    """Same result as ``F.adaptive_avg_pool2d(x, output_size)`` as P_h · x · P_wᵀ.

    Works on (..., H, W) inputs of any size, also smaller than the output.
    """
    out_h, out_w = _pair(output_size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    rows = pooling_matrix(x.shape[-2], out_h, x)
    cols = pooling_matrix(x.shape[-1], out_w, x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class AdaptiveAvgPool2dExact(nn.Module):
    """Drop-in for ``nn.AdaptiveAvgPool2d(output_size)`` that exports exactly with dynamic H/W.

    Has no parameters or buffers, so it can replace ``nn.AdaptiveAvgPool2d`` inside a
    ``nn.Sequential`` without changing state-dict keys.
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        if min(self.output_size) < 1:
            raise ValueError(f"output_size must be positive, got {output_size}")

    def forward(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool2d_exact(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
