"""ASFF: adaptively spatial feature fusion (Liu et al., 2019), the YOLOv5 variant.

Three pyramid levels arrive as ``x = (x2, x1, x0)``: level 0 is ``x[2]`` (most channels,
smallest map, S), level 1 ``x[1]`` (2S), level 2 ``x[0]`` (4S). The block for level ℓ brings
the other two levels to level ℓ's size and width (a 1x1 "compress" Conv plus nearest
upsampling from a coarser level; a stride-2 3x3 Conv, after a 3x3/2 max pooling for two
levels down, from a finer level), then fuses them with per-pixel weights:

    w = softmax(weight_levels(cat(weight_level_0(r0), weight_level_1(r1), weight_level_2(r2))))
    out = expand(w₀·r0 + w₁·r1 + w₂·r2)

Every convolution is a YOLOv5 :class:`~reparam.blocks.conv.Conv` (Conv2d + BN + SiLU), as
in the YOLOv5 port of ASFF (https://github.com/GOATmessi7/ASFF), so fusing folds every
BatchNorm into its conv; nothing else changes.

Channels are int((1024, 512, 256)·multiplier) for levels 0, 1, 2 (the published defaults);
``channels=(c0, c1, c2)`` replaces (1024, 512, 256) for smaller models. State-dict keys follow the
published ASFFV5: compress_level_0/1, stride_level_1/2, expand, weight_level_0/1/2,
weight_levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.blocks.base import ReparamBlock
from reparam.blocks.conv import Conv
from reparam.errors import BlockConfigError

__all__ = ["ASFF"]


class ASFF(ReparamBlock):
    """Adaptively spatial feature fusion of three levels, output at level ``level``.

    Args:
        level: 0, 1 or 2: the level whose size and width the output has.
        multiplier: width multiplier of the channels; YOLOv5 ports use 1 or 0.5.
        rfb: use 8 instead of 16 channels for the fusion weights (ASFF's RFB setting).
        vis: also return the fusion weights and the channel sum of the fused map.
        channels: the level widths (c0, c1, c2) at multiplier 1, instead of the published
            (1024, 512, 256), for smaller models; the level widths are int(c·multiplier).
        act: the activation of every Conv (True: SiLU, as in YOLOv5).
        deploy: build every Conv in its fused form (to load fused checkpoints).

    Input: a sequence (x2, x1, x0) as above. Output: the fused map, or with ``vis``
    (out, weights (N, 3, H, W), fused.sum(1)).
    """

    def __init__(
        self,
        level: int,
        multiplier: float = 1,
        rfb: bool = False,
        vis: bool = False,
        channels: Sequence[int] | None = None,
        act: bool | nn.Module = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if level not in (0, 1, 2):
            raise BlockConfigError(f"ASFF level must be 0, 1 or 2, got {level}")
        base = (1024, 512, 256) if channels is None else tuple(channels)
        if len(base) != 3 or multiplier <= 0:
            raise BlockConfigError(
                f"ASFF needs three channel counts and a positive multiplier, got channels={base}, "
                f"multiplier={multiplier}"
            )
        channels = tuple(int(c * multiplier) for c in base)
        if min(channels) < 1:
            raise BlockConfigError(
                f"channels {base} x multiplier {multiplier} leaves a level empty"
            )
        self.level, self.multiplier, self.rfb, self.vis = level, multiplier, rfb, vis
        self.dim = channels
        self.inter_dim = inter = channels[level]
        self.deploy = deploy

        def conv(c1: int, c2: int, k: int, s: int) -> Conv:
            return Conv(c1, c2, k, s, act=act, deploy=deploy)

        if level == 0:
            self.stride_level_1 = conv(channels[1], inter, 3, 2)
            self.stride_level_2 = conv(channels[2], inter, 3, 2)
        elif level == 1:
            self.compress_level_0 = conv(channels[0], inter, 1, 1)
            self.stride_level_2 = conv(channels[2], inter, 3, 2)
        else:
            self.compress_level_0 = conv(channels[0], inter, 1, 1)
            self.compress_level_1 = conv(channels[1], inter, 1, 1)
        self.expand = conv(inter, channels[level], 3, 1)
        compress_c = 8 if rfb else 16  # RFB halves the weight channels to save memory
        self.weight_level_0 = conv(inter, compress_c, 1, 1)
        self.weight_level_1 = conv(inter, compress_c, 1, 1)
        self.weight_level_2 = conv(inter, compress_c, 1, 1)
        self.weight_levels = conv(compress_c * 3, 3, 1, 1)

    def _resize(self, x_level_0: Tensor, x_level_1: Tensor, x_level_2: Tensor) -> list[Tensor]:
        if self.level == 0:
            level_2 = F.max_pool2d(x_level_2, 3, stride=2, padding=1)
            return [x_level_0, self.stride_level_1(x_level_1), self.stride_level_2(level_2)]
        if self.level == 1:
            level_0 = F.interpolate(self.compress_level_0(x_level_0), scale_factor=2.0)
            return [level_0, x_level_1, self.stride_level_2(x_level_2)]
        level_0 = F.interpolate(self.compress_level_0(x_level_0), scale_factor=4.0)
        level_1 = F.interpolate(self.compress_level_1(x_level_1), scale_factor=2.0)
        return [level_0, level_1, x_level_2]

    def forward(self, x: Sequence[Tensor]) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, torch.fx.Proxy) and (not isinstance(x, Sequence) or len(x) != 3):
            raise TypeError("ASFF takes a sequence of three feature maps (x2, x1, x0)")
        resized = self._resize(x[2], x[1], x[0])
        if not isinstance(resized[0], torch.fx.Proxy) and not torch.jit.is_tracing():
            sizes = [tuple(r.shape[-2:]) for r in resized]
            if sizes[0] != sizes[1] or sizes[0] != sizes[2]:
                shapes = [tuple(t.shape[-2:]) for t in x]
                raise ValueError(
                    f"ASFF level {self.level}: inputs of sizes {shapes} (x[0], x[1], x[2]) "
                    f"resize to {sizes}: x[1] must be twice the size of x[2], and x[0] twice "
                    f"the size of x[1]"
                )
        weights = torch.cat(
            (
                self.weight_level_0(resized[0]),
                self.weight_level_1(resized[1]),
                self.weight_level_2(resized[2]),
            ),
            1,
        )
        weights = F.softmax(self.weight_levels(weights), dim=1)
        fused = (
            resized[0] * weights[:, 0:1]
            + resized[1] * weights[:, 1:2]
            + resized[2] * weights[:, 2:]
        )
        out = self.expand(fused)
        return (out, weights, fused.sum(dim=1)) if self.vis else out

    def _reparameterize(self) -> None:
        convs = [m for m in self.modules() if isinstance(m, Conv)]
        for conv in convs:
            conv.switch_to_deploy()
        self.fuse_detail = f"folded the BatchNorm of {len(convs)} Conv layers"

    def extra_repr(self) -> str:
        return (
            f"level={self.level}, channels={self.dim}, rfb={self.rfb}, vis={self.vis}, "
            f"deploy={self.deploy}"
        )
