"""RepVGG networks (Ding et al., CVPR 2021): a plain stack of RepVGGBlocks.

Five stages; the first block of each stage has stride 2, so a 224² input ends at 7². Stage
widths are min(64, 64a), 64a, 128a, 256a, 512b; RepVGG-A0 has a = 0.75, b = 2.5 and depths
1, 2, 4, 14, 1. After fusion every block is one 3x3 conv and a ReLU: a VGG-style network.

Differences from the published models: no grouped convs (RepVGG-A0 has none), and the head
is global average pooling and a linear layer, as published.
"""

from __future__ import annotations

from torch import Tensor, nn

from reparam.blocks.repvgg import RepVGGBlock
from reparam.models.registry import register_model

__all__ = ["RepVGG", "repvgg_a0", "repvgg_tiny"]


class RepVGG(nn.Module):
    """Stages of RepVGGBlocks (the first of each with stride 2), pooling and a classifier.

    Args:
        depths: blocks per stage.
        widths: output channels per stage (same length as ``depths``).
        num_classes: classifier outputs.
        in_channels: input channels.
        deploy: build every block in its fused form (to load fused checkpoints).
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 1000,
        in_channels: int = 3,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        stages, channels = [], in_channels
        for depth, width in zip(depths, widths, strict=True):
            blocks = []
            for index in range(depth):
                stride = 2 if index == 0 else 1
                blocks.append(RepVGGBlock(channels, width, 3, stride=stride, deploy=deploy))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(x)).flatten(1))


@register_model("repvgg_a0", (1, 3, 224, 224))
def repvgg_a0(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-A0: widths 48/48/96/192/1280, depths 1/2/4/14/1, for 224² ImageNet inputs."""
    a, b = 0.75, 2.5
    widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return RepVGG((1, 2, 4, 14, 1), widths, num_classes=num_classes, deploy=deploy)


@register_model("repvgg_tiny", (1, 3, 32, 32))
def repvgg_tiny(num_classes: int = 10, width: int = 8, deploy: bool = False) -> RepVGG:
    """A small RepVGG (4 stages, 5 blocks) for 32² inputs, quick to fuse and test."""
    widths = (width, width, 2 * width, 4 * width)
    return RepVGG((1, 1, 2, 1), widths, num_classes=num_classes, deploy=deploy)
