"""User models for the expand tests, written as users write them (not reparam's blocks).

pytest's "prepend" import mode puts ``tests/`` on ``sys.path``, so the CLI tests name these
as ``MODULE:callable``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["MODULE", "YoloConv", "coverage_net", "linear_net", "untraceable_net", "yolo_net"]

MODULE = __name__


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    return d * (k - 1) // 2 if p is None else p


class YoloConv(nn.Module):
    """YOLOv5's ``Conv``: Conv2d(bias=False) → BatchNorm2d → SiLU, keys conv/bn/act."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p=None, g: int = 1, d: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = YoloConv(c, c, 1)
        self.cv2 = YoloConv(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = YoloConv(c, c // 2, 1)
        self.cv2 = YoloConv(c, c // 2, 1)
        self.m = nn.Sequential(Bottleneck(c // 2))
        self.cv3 = YoloConv(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class YoloNet(nn.Module):
    """A small YOLOv5-style backbone and head: a 6x6 stem, stride-2 3x3 convs, C3, a
    depthwise and a dilated conv, and a 1x1 detection conv with bias and no BatchNorm."""

    example_input_shapes: ClassVar[list] = [(1, 3, 32, 32)]

    def __init__(self, width: int = 8, num_outputs: int = 7) -> None:
        super().__init__()
        w = width
        self.stem = YoloConv(3, w, 6, 2, 2)
        self.down = YoloConv(w, 2 * w, 3, 2)
        self.c3 = C3(2 * w)
        self.dw = YoloConv(2 * w, 2 * w, 3, 1, g=2 * w)
        self.dilated = YoloConv(2 * w, 2 * w, 3, 1, d=2)
        self.detect = nn.Conv2d(2 * w, num_outputs, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.detect(self.dilated(self.dw(self.c3(self.down(self.stem(x))))))


def yolo_net(width: int = 8) -> YoloNet:
    return YoloNet(width)


class CoverageNet(nn.Module):
    """One conv of each kind expand must take or refuse, in a Sequential."""

    example_input_shapes: ClassVar[list] = [(1, 4, 16, 16)]

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1, bias=True), nn.ReLU(),  # no BN, bias: expanded
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),  # no BN, no bias: left alone
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(8),  # bias + BN
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), nn.BatchNorm2d(8),  # depthwise
            nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(16),  # x2 mult.
            nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),  # 1x1
            nn.Conv2d(16, 16, 2, padding=1, bias=False), nn.BatchNorm2d(16),  # even kernel
            nn.Conv2d(16, 16, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(16),
            nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect", bias=False),
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 16, 3, padding=0, bias=False), nn.BatchNorm2d(16),  # valid padding
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def coverage_net() -> CoverageNet:
    return CoverageNet()


class UntraceableNet(nn.Module):
    """Conv-BN pairs outside a Sequential, behind data-dependent control flow (no fx)."""

    example_input_shapes: ClassVar[list] = [(1, 3, 16, 16)]

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        if y.sum() > 0:  # data-dependent: torch.fx cannot trace this
            y = y * 1.0
        return self.bn2(self.conv2(y))


def untraceable_net() -> UntraceableNet:
    return UntraceableNet()


class LinearNet(nn.Module):
    """Nothing a family can expand: a Linear layer only."""

    example_input_shapes: ClassVar[list] = [(2, 6)]

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def linear_net() -> LinearNet:
    return LinearNet()
