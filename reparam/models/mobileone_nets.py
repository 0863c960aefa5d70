"""MobileOne (Vasu et al., CVPR 2023) and Diverse-Branch-Block (Ding et al., CVPR 2021) nets.

MobileOne: a stem MobileOneBlock (3x3, stride 2), then stages of depthwise 3x3 + pointwise
1x1 MobileOneBlock pairs (the first pair of each stage with stride 2), global average
pooling and a linear classifier. MobileOne-S0 has width multipliers 0.75, 1, 1, 2 (stage
widths 48, 128, 256, 1024 after a 48-channel stem), 2, 8, 10, 1 pairs per stage and
k = 4 over-parameterised conv branches in every block but the stem's (one, as published).
After fusion it is a MobileNet-v1-style stack of depthwise and pointwise convs with ReLUs.
Differences from apple/ml-mobileone: no squeeze-excitation (S0 has none; S4 has some) and no
dropout before the classifier.

DBB ResNet: the ACNet ResNet of :mod:`reparam.models.resnet` with every 3x3 conv of the
residual blocks a DiverseBranchBlock (KxK, 1x1, 1x1→KxK and 1x1→avg-pool branches), as in
the DBB paper's ResNet-18. Difference: the stem's 7x7 conv and the 1x1 shortcut convs stay
Conv-BN (the paper converts every conv).
"""

from __future__ import annotations

from torch import Tensor, nn

from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.mobileone import MobileOneBlock
from reparam.models.registry import register_model
from reparam.models.resnet import ResNet

__all__ = ["MobileOne", "dbb_resnet18", "dbb_tiny", "mobileone_s0", "mobileone_tiny"]


class MobileOne(nn.Module):
    """A stem block, stages of depthwise + pointwise MobileOneBlocks, pooling, a classifier.

    Args:
        depths: depthwise/pointwise pairs per stage.
        widths: output channels per stage (same length as ``depths``).
        stem_width: output channels of the stem block.
        num_conv_branches: KxK conv-BN branches of every block after the stem.
        num_classes: classifier outputs.
        in_channels: input channels.
        inference_mode: build every block in its fused form (to load fused checkpoints).
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        num_conv_branches: int = 4,
        num_classes: int = 1000,
        in_channels: int = 3,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        mode = dict(inference_mode=inference_mode)
        self.stem = MobileOneBlock(in_channels, stem_width, 3, stride=2, **mode)
        stages, channels = [], stem_width
        for depth, width in zip(depths, widths, strict=True):
            blocks = []
            for index in range(depth):
                stride = 2 if index == 0 else 1
                branches = dict(num_conv_branches=num_conv_branches, **mode)
                blocks.append(
                    MobileOneBlock(
                        channels, channels, 3, stride=stride, groups=channels, **branches
                    )
                )
                blocks.append(MobileOneBlock(channels, width, 1, **branches))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register_model("mobileone_s0", (1, 3, 224, 224))
def mobileone_s0(num_classes: int = 1000, inference_mode: bool = False) -> MobileOne:
    """MobileOne-S0: widths 48/128/256/1024, 2/8/10/1 pairs, k = 4 branches, 224² inputs."""
    return MobileOne(
        (2, 8, 10, 1),
        (48, 128, 256, 1024),
        stem_width=48,
        num_conv_branches=4,
        num_classes=num_classes,
        inference_mode=inference_mode,
    )


@register_model("mobileone_tiny", (1, 3, 32, 32))
def mobileone_tiny(
    num_classes: int = 10, width: int = 8, inference_mode: bool = False
) -> MobileOne:
    """A small MobileOne (3 stages, k = 2 branches) for 32² inputs, quick to fuse and test."""
    return MobileOne(
        (1, 2, 1),
        (width, 2 * width, 4 * width),
        stem_width=width,
        num_conv_branches=2,
        num_classes=num_classes,
        inference_mode=inference_mode,
    )


def _dbb(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return DiverseBranchBlock(in_channels, out_channels, 3, stride=stride)


@register_model("dbb_resnet18", (1, 3, 224, 224))
def dbb_resnet18(num_classes: int = 1000) -> ResNet:
    """DBB ResNet-18: every 3x3 conv in the residual blocks is a DiverseBranchBlock."""
    return ResNet(num_classes=num_classes, conv=_dbb)


@register_model("dbb_tiny", (1, 3, 32, 32))
def dbb_tiny(num_classes: int = 10, width: int = 8) -> ResNet:
    """A small CIFAR-style DBB ResNet (2 stages of DiverseBranchBlocks), quick to test."""
    return ResNet(
        layers=(1, 1),
        widths=(width, 2 * width),
        num_classes=num_classes,
        conv=_dbb,
        imagenet_stem=False,
    )
