"""Involution (Li et al., CVPR 2021), computed by shift-and-accumulate in cache-sized chunks.

A 1x1 "reduce" conv (C → C/r, BN, activation) and a 1x1 "span" conv (C/r → K²·G) generate,
for every output pixel, one KxK kernel per group of ``group_channels`` channels (G groups);
average pooling precedes them when stride > 1. The output is

    y[b, g·gc + c, u, v] = Σ_{i,j} w[b, g, i·K + j, u, v] · x_pad[b, g·gc + c, s·u + i, s·v + j]

with x_pad the input zero-padded by (K − 1)/2. This module holds the block: its parameters,
state-dict layouts and fusing. The op formulations, their autograd and their scheduling
between threads are in :mod:`reparam.ops.involution_kernels`.

Layouts (``layout=``):

- ``"mmcv"`` (default), keys of ``involution_naive.py`` in
  https://github.com/d-li14/involution: ``conv1.conv`` + ``conv1.bn`` (ReLU after),
  ``conv2.conv`` (with bias);
- ``"yolov5"``, the Involution of https://github.com/ultralytics/yolov5/pull/2435:
  ``cv1`` a YOLOv5 ``Conv`` (``cv1.conv`` + ``cv1.bn``, SiLU after), ``cv2`` an
  ``nn.Conv2d`` with bias; group channels 16 and reduction 4 by default, as there.

The deploy form folds the reduce conv's BN into its conv, which then has a bias;
``Involution(..., deploy=True)`` builds that layout directly.

Stride: the published code pools with ``AvgPool2d(s, s)`` (output floor(H/s)) but unfolds
with stride s and padding (K − 1)/2 (output ceil(H/s)), so it fails whenever s does not
divide H. The pool here uses ``ceil_mode=True``: identical when s divides H, and the last
window averages the pixels that exist otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.blocks.base import ReparamBlock
from reparam.blocks.conv import Conv
from reparam.errors import BlockConfigError, UserInputError
from reparam.module_fusion import fold_bn_into_conv
from reparam.ops.involution_kernels import (
    involution,
    involution_from_features,
    involution_inference,
    involution_shift,
    involution_unfold,
    whole_tensor_form,
)
from reparam.ops.threads import call_single_threaded

# torch.fx.symbolic_trace records a call of involution (its checks and paths branch on
# sizes and data, which a symbolic trace cannot follow); the traced module runs it as is.
torch.fx.wrap("involution")

__all__ = [
    "LAYOUTS",
    "Involution",
    "involution",
    "involution_from_features",
    "involution_shift",
    "involution_unfold",
]

LAYOUTS = ("mmcv", "yolov5")


class _CeilAvgPool2d(nn.Module):
    """``AvgPool2d(s, s, ceil_mode=True)``: partial last windows average the pixels present.

    Computed as the pooled zero-padded input divided by the pooled ones, so ``torch.export``
    needs no guard on H and W (ceil-mode pooling's shape rule adds one it cannot prove).
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        # Pad to s·ceil(L/s), written as s·((L − 1)//s + 1): the same expression as the
        # involution's output size, so symbolic shapes match without a guard.
        pad_h = s * ((x.shape[2] - 1) // s + 1) - x.shape[2]
        pad_w = s * ((x.shape[3] - 1) // s + 1) - x.shape[3]
        traced = torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy)
        if not traced and pad_h == 0 and pad_w == 0:
            return F.avg_pool2d(x, s, s)
        sums = F.avg_pool2d(F.pad(x, (0, pad_w, 0, pad_h)), s, s)
        ones = x.new_ones((1, 1, x.shape[2], x.shape[3]))
        counts = F.avg_pool2d(F.pad(ones, (0, pad_w, 0, pad_h)), s, s)
        return sums / counts

    def extra_repr(self) -> str:
        return f"stride={self.stride}, ceil_mode=True"


class _ConvModule(nn.Module):
    """mmcv's ConvModule layout: ``conv``, optional ``bn``, optional ReLU (``activate``)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool) -> None:
        super().__init__()
        self.conv = conv
        if bn is not None:
            self.bn = bn
        # In place, as mmcv's ConvModule: one activation-sized tensor less at the peak.
        self.activate = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class Involution(ReparamBlock):
    """Involution in the mmcv or the YOLOv5 layout; chunked shift-and-accumulate forward.

    Args:
        channels: C, divisible by ``group_channels``.
        kernel_size: odd K.
        stride: s; average pooling (ceil mode) precedes the kernel generator when s > 1.
        group_channels: channels that share one generated kernel (16 in the paper).
        reduction_ratio: the reduce conv has ``channels // reduction_ratio`` outputs.
        deploy: build the deploy form directly (the reduce conv's BN folded into its conv).
        layout: ``"mmcv"`` (``conv1``/``conv2``, ReLU) or ``"yolov5"`` (``cv1`` a YOLOv5
            ``Conv`` with SiLU, ``cv2``); see the module docstring.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        deploy: bool = False,
        layout: str = "mmcv",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise BlockConfigError(f"Involution: layout must be one of {LAYOUTS}, got {layout!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise BlockConfigError(
                f"Involution needs an odd kernel_size (the kernel is centred on each output "
                f"pixel with padding (K-1)/2), got {kernel_size}"
            )
        if group_channels < 1 or channels < 1 or channels % group_channels:
            raise BlockConfigError(
                f"Involution: channels ({channels}) must be a positive multiple of "
                f"group_channels ({group_channels})"
            )
        if stride < 1:
            raise BlockConfigError(f"Involution: stride must be >= 1, got {stride}")
        if reduction_ratio < 1 or channels // reduction_ratio < 1:
            raise BlockConfigError(
                f"Involution: reduction_ratio ({reduction_ratio}) must be >= 1 and leave at "
                f"least one channel out of {channels}"
            )
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.reduction_ratio = reduction_ratio
        self.deploy = deploy
        self.layout = layout
        reduced = channels // reduction_ratio
        span = kernel_size * kernel_size * self.groups
        if layout == "yolov5":
            self.cv1 = Conv(channels, reduced, 1, deploy=deploy)
            self.cv2 = nn.Conv2d(reduced, span, 1)
            self.fuse_detail = "cv1.bn folded into cv1.conv"
        else:
            bn = None if deploy else nn.BatchNorm2d(reduced)
            self.conv1 = _ConvModule(nn.Conv2d(channels, reduced, 1, bias=deploy), bn, relu=True)
            self.conv2 = _ConvModule(nn.Conv2d(reduced, span, 1), None, relu=False)
            self.fuse_detail = "conv1.bn folded into conv1.conv"
        if stride > 1:
            self.avgpool = _CeilAvgPool2d(stride)

    def _reduce(self, x: Tensor) -> Tensor:
        """Pool (stride > 1), then the reduce conv with its BN and activation."""
        x = self.avgpool(x) if self.stride > 1 else x
        return self.cv1(x) if self.layout == "yolov5" else self.conv1(x)

    def _span(self) -> nn.Conv2d:
        return self.cv2 if self.layout == "yolov5" else self.conv2.conv

    def kernels(self, x: Tensor) -> Tensor:
        """The generated per-pixel kernels (B, G·K², ceil(H/s), ceil(W/s))."""
        return self._span()(self._reduce(x))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: one involution node
            weight = self.kernels(x)
            return involution(x, weight, self.kernel_size, self.stride, self.group_channels)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise UserInputError(
                f"Involution expects (B, {self.channels}, H, W) input, got {tuple(x.shape)}"
            )
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if needs_grad or whole_tensor_form():
            weight = self.kernels(x)
            return involution(x, weight, self.kernel_size, self.stride, self.group_channels)
        return self._forward_inference(x)

    def _forward_inference(self, x: Tensor) -> Tensor:
        """The reduce conv (with its BN and activation) on the whole batch, as one module
        call: a BN in training mode needs the batch's statistics and updates its running
        ones once, and hooks see the batch. Then the samples are shared out between threads,
        each generating its kernels chunk by chunk and accumulating the taps (one thread
        meeting per call, not per op); a batch too small to share out splits each sample's
        groups instead."""
        span = self._span()
        # One intra-op thread: three medium ops whose barriers would stall beside a busy
        # process (measured: the forward went from 37 to 78 ms there with them threaded).
        features = call_single_threaded(lambda: self._reduce(x), x.device)
        return involution_inference(
            x, features, span.weight, span.bias, self.kernel_size, self.stride,
            self.group_channels,
        )  # fmt: skip

    def forward_unfold(self, x: Tensor) -> Tensor:
        """The published (unfold) formulation of :meth:`forward`, for tests and benchmarks."""
        weight = self.kernels(x)
        return involution_unfold(x, weight, self.kernel_size, self.stride, self.group_channels)

    def _reparameterize(self) -> None:
        if self.layout == "yolov5":
            self.cv1.switch_to_deploy()
            return
        fold_bn_into_conv(self.conv1.conv, self.conv1.bn)
        del self.conv1.bn

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"group_channels={self.group_channels}, deploy={self.deploy}, layout={self.layout!r}"
        )
