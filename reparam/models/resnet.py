"""ResNet-18 with a pluggable 3x3 conv: plain Conv-BN (the baseline) or ACNet's ACBlock."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from reparam.blocks.acb import ACBlock
from reparam.models.registry import register_model

__all__ = ["ResNet", "acnet_resnet18", "acnet_tiny", "resnet18"]

ConvFactory = Callable[[int, int, int], nn.Module]
"""(in_channels, out_channels, stride) -> a 3x3 conv followed by its normalisation."""


def conv_bn(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def acblock(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return ACBlock(in_channels, out_channels, 3, stride=stride)


class BasicBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)), the ResNet-18/34 residual block."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv: ConvFactory):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, stride)
        self.conv2 = conv(out_channels, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks; ``conv`` decides what every 3x3 conv in the blocks is."""

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        conv: ConvFactory = conv_bn,
        imagenet_stem: bool = True,
    ):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
            )
        stages, channels = [], widths[0]
        for index, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, conv))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register_model("resnet18", (1, 3, 224, 224))
def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 with plain Conv-BN 3x3 convs (the baseline an ACNet fuses down to)."""
    return ResNet(num_classes=num_classes)


@register_model("acnet_resnet18", (1, 3, 224, 224))
def acnet_resnet18(num_classes: int = 1000) -> ResNet:
    """ACNet ResNet-18: every 3x3 conv in the residual blocks is an ACBlock."""
    return ResNet(num_classes=num_classes, conv=acblock)


@register_model("acnet_tiny", (1, 3, 32, 32))
def acnet_tiny(num_classes: int = 10, width: int = 16) -> ResNet:
    """A small CIFAR-style ACNet ResNet (2 stages of ACBlocks), quick to fuse and test."""
    return ResNet(
        layers=(1, 1),
        widths=(width, 2 * width),
        num_classes=num_classes,
        conv=acblock,
        imagenet_stem=False,
    )
