"""The YOLO family's reparameterized blocks as users have them, written for the adoption tests.

Each class reproduces the attribute names, state-dict keys and forward of a published block
(no published code is copied): YOLOv6's RepVGGBlock and QARepVGGBlock
(https://github.com/meituan/YOLOv6, yolov6/layers/common.py), YOLOv7's RepConv
(https://github.com/WongKinYiu/yolov7, models/common.py) and ultralytics' RepConv with its
Conv (https://github.com/ultralytics/ultralytics, ultralytics/nn/modules/conv.py). Plus copies
whose forward depends on the input (issue 19): they must never be adopted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from fixtures_foreign import UserRepVGGBlock, conv_bn
except ImportError:  # run from the repository root without tests/ on sys.path
    from tests.fixtures_foreign import UserRepVGGBlock, conv_bn

# ----------------------------------------------------------------------------- YOLOv6


class YOLOv6RepVGGBlock(nn.Module):
    """YOLOv6's RepVGGBlock: RepVGG's keys (conv_bn branches named conv/bn), ReLU, no SE."""

    def __init__(self, c_in, c_out, kernel_size=3, stride=1, padding=1, groups=1):
        super().__init__()
        self.deploy, self.groups = False, groups
        self.in_channels, self.out_channels = c_in, c_out
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.rbr_dense = conv_bn(c_in, c_out, kernel_size, stride, padding, groups)
        self.rbr_1x1 = conv_bn(c_in, c_out, 1, stride, padding - kernel_size // 2, groups)

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))


class YOLOv6QARepVGGBlock(YOLOv6RepVGGBlock):
    """YOLOv6's QARepVGGBlock: rbr_1x1 a bare conv (padding 0), rbr_identity an Identity,
    one BatchNorm ``bn`` after the sum: nonlinearity(bn(se(dense + 1x1 + id)))."""

    def __init__(self, c_in, c_out, kernel_size=3, stride=1, padding=1, groups=1):
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups)
        self.bn = nn.BatchNorm2d(c_out)
        self.rbr_1x1 = nn.Conv2d(c_in, c_out, 1, stride=stride, groups=groups, bias=False)
        self.rbr_identity = nn.Identity() if c_in == c_out and stride == 1 else None

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)))


# ----------------------------------------------------------------------------- YOLOv7


class YOLOv7RepConv(nn.Module):
    """YOLOv7's RepConv(c1, c2, k=3, s, p=None, g, act=True): branches are Sequential(conv,
    bn) (keys .0/.1), identity BN where c1 == c2 and s == 1, act SiLU."""

    def __init__(self, c1, c2, k=3, s=1, g=1, act=True):
        super().__init__()
        self.deploy, self.groups = False, g
        self.in_channels, self.out_channels = c1, c2
        self.act = (
            nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        )
        self.rbr_identity = nn.BatchNorm2d(c1) if c1 == c2 and s == 1 else None
        self.rbr_dense = nn.Sequential(
            nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(c2)
        )
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False),
                                     nn.BatchNorm2d(c2))  # fmt: skip

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


# ----------------------------------------------------------------------------- ultralytics


class UltralyticsConv(nn.Module):
    """ultralytics' Conv: conv (no bias, 'same' padding), bn, act (SiLU, or Identity)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        p = k // 2 if p is None else p
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (
            nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        )

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class UltralyticsRepConv(nn.Module):
    """ultralytics' RepConv(c1, c2, k=3, s=1, p=1, g=1, act=True, bn=False): conv1 (KxK Conv
    without act), conv2 (1x1 Conv), bn (identity BN only with bn=True, c1 == c2, s == 1)."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act=True, bn=False):
        super().__init__()
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = (
            nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        )
        self.bn = nn.BatchNorm2d(c1) if bn and c1 == c2 and s == 1 else None
        self.conv1 = UltralyticsConv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = UltralyticsConv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class UltralyticsBottleneck(nn.Module):
    """Not a RepConv: conv1 → conv2 in sequence, with activations (must not be touched)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = UltralyticsConv(c, c, 3)
        self.conv2 = UltralyticsConv(c, c, 1)
        self.bn = None
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


# ----------------------------------------------------------------------------- issue 19


class RepVGGReLU6(UserRepVGGBlock):
    """A copy computing ReLU6 behind an nn.ReLU attribute (equal below 6)."""

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return F.relu6(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))


class RepVGGHalvesLarge(UserRepVGGBlock):
    """A copy that halves its output on inputs wider than ``limit`` px."""

    limit = 16

    def forward(self, x):
        out = super().forward(x)
        return out * 0.5 if x.shape[-1] > self.limit else out


class RepVGGHalvesAt32(RepVGGHalvesLarge):
    """Differs only from 32 px on: the default probes (up to 23 px) agree; the example shows."""

    limit = 31


class RepVGGBatchOne(UserRepVGGBlock):
    """A copy that drops its identity branch at batch 1 (say, a 'fast path')."""

    def forward(self, x):
        if x.shape[0] == 1:
            return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x)))
        return super().forward(x)


class RepVGGTinyThreshold(UserRepVGGBlock):
    """A copy that zeroes outputs below 0.05 in magnitude (only small inputs show it)."""

    def forward(self, x):
        out = super().forward(x)
        return torch.where(out.abs() < 0.05, torch.zeros_like(out), out)
