"""YOLOv5's ``Conv`` block: Conv2d (no bias) → BatchNorm2d → SiLU.

Training form: y = act(BN(W ⋆ x)). Deploy form: y = act(W' ⋆ x + b') with the BatchNorm folded
into the conv, W' = W·γ/σ and b' = β − μ·γ/σ.

Attribute names follow ultralytics/yolov5 ``models/common.py`` (conv, bn, act), so YOLOv5
checkpoints load into the training form, and YOLOv5's fused checkpoints (``conv.weight``,
``conv.bias``, no ``bn``) into the deploy form (``deploy=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from reparam.blocks.base import ReparamBlock
from reparam.errors import BlockConfigError
from reparam.module_fusion import conv_bn_kernel, make_conv

__all__ = ["Conv", "autopad"]

IntOrPair = int | Sequence[int]


def autopad(k: IntOrPair, p: IntOrPair | None = None, d: int = 1) -> IntOrPair:
    """YOLOv5's padding rule: ``p`` if given, else "same" padding for odd kernels.

    With dilation d the effective kernel is d·(k − 1) + 1, and the padding is half of it.
    """
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def _activation(act: bool | nn.Module | None) -> nn.Module:
    if act is True:
        return nn.SiLU()  # one per block: YOLOv5 shares a class-level instance
    if act is False or act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    raise BlockConfigError(f"act must be True, False or an nn.Module instance, got {act!r}")


class Conv(ReparamBlock):
    """Conv2d(bias=False) + BatchNorm2d + activation, with YOLOv5's signature and keys.

    Args:
        c1, c2: input and output channels.
        k: kernel size (int or pair).
        s: stride.
        p: padding; None means :func:`autopad` ("same" for odd kernels).
        g: groups.
        d: dilation.
        act: True for SiLU, False for none, or an ``nn.Module`` to apply.
        deploy: build the fused form directly (conv with bias, no BatchNorm), to load fused
            checkpoints with strict keys.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: IntOrPair = 1,
        s: IntOrPair = 1,
        p: IntOrPair | None = None,
        g: int = 1,
        d: int = 1,
        act: bool | nn.Module = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.conv = nn.Conv2d(
            c1, c2, k, stride=s, padding=autopad(k, p, d), groups=g, dilation=d, bias=deploy
        )
        if not deploy:
            self.bn = nn.BatchNorm2d(c2)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.act(self.conv(x))
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        """YOLOv5's name for the forward of the fused form (only valid once deployed)."""
        return self.act(self.conv(x))

    def _reparameterize(self) -> None:
        kernel, bias = conv_bn_kernel(self.conv, self.bn)
        conv = self.conv
        self.conv = make_conv(
            kernel,
            bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )
        del self.bn
