"""MobileOne (Vasu et al., CVPR 2023) and Diverse-Branch-Block (Ding et al., CVPR 2021) nets.

MobileOne: module names and state-dict keys are those of apple/ml-mobileone
(https://github.com/apple/ml-mobileone/blob/main/mobileone.py), so its unfused checkpoints
(``mobileone_s0_unfused.pth.tar``) load strictly into ``mobileone_s0()`` and its fused ones
(``mobileone_s0.pth.tar``) into ``mobileone_s0(inference_mode=True)``:

    stage0                       a 3x3 stride-2 block, 3 → min(64, 64·w₁) channels, 1 branch
    stage1.0 … stage4.N          pairs of a depthwise 3x3 block (stride 2 in the first pair
                                 of a stage) and a pointwise 1x1 block, 64·w₁, 128·w₂,
                                 256·w₃ and 512·w₄ channels, 2/8/10/1 pairs
    gap, linear                  global average pooling and the classifier

Every block after the stem has k over-parameterised KxK branches (k = 4 in S0, 1 otherwise).
S4 adds squeeze-excitation to both blocks of the last 5 pairs of stage 3 and of every pair
of stage 4 (``num_se_blocks``). After fusion it is a MobileNet-v1-style stack of depthwise
and pointwise convs with ReLUs. As published, there is no dropout before the classifier.

DBB ResNet: the ACNet ResNet of :mod:`reparam.models.resnet` with every 3x3 conv of the
residual blocks a DiverseBranchBlock (KxK, 1x1, 1x1→KxK and 1x1→avg-pool branches), as in
the DBB paper's ResNet-18. Difference: the stem's 7x7 conv and the 1x1 shortcut convs stay
Conv-BN (the paper converts every conv).
"""

from __future__ import annotations

from torch import nn

from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.mobileone import MobileOneBlock
from reparam.models.registry import register_model
from reparam.models.resnet import ResNet
from reparam.models.staged import StagedClassifier

__all__ = [
    "MobileOne",
    "dbb_resnet18",
    "dbb_tiny",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "mobileone_tiny",
    "mobileone_widths",
]


def mobileone_widths(multipliers: tuple[float, float, float, float]) -> tuple[int, ...]:
    """stage0..stage4 widths: min(64, 64·w₁), 64·w₁, 128·w₂, 256·w₃, 512·w₄ (truncated)."""
    w1, w2, w3, w4 = multipliers
    return (min(64, int(64 * w1)), int(64 * w1), int(128 * w2), int(256 * w3), int(512 * w4))


class MobileOne(StagedClassifier):
    """stage0 (one block), stages 1–4 of depthwise + pointwise pairs, pooling, a classifier.

    Args:
        num_blocks: depthwise/pointwise pairs in stages 1–4 (four numbers).
        widths: output channels of stage0..stage4 (five numbers).
        num_conv_branches: KxK conv-BN branches of every block after the stem (whose one
            branch is as published).
        num_se_blocks: pairs with squeeze-excitation at the end of stages 1–4 (both blocks
            of a pair get it).
        num_classes: classifier outputs.
        in_channels: input channels.
        inference_mode: build every block in its fused form (to load fused checkpoints).
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_conv_branches: int = 1,
        num_se_blocks: tuple[int, ...] = (0, 0, 0, 0),
        num_classes: int = 1000,
        in_channels: int = 3,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(widths) != 5 or len(num_se_blocks) != 4:
            raise ValueError(
                f"MobileOne needs 4 stage depths, 5 widths and 4 SE counts, got "
                f"{num_blocks}, {widths} and {num_se_blocks}"
            )
        mode = dict(inference_mode=inference_mode)
        self.stage0 = MobileOneBlock(in_channels, widths[0], 3, stride=2, padding=1, **mode)
        channels = widths[0]
        stages = zip(num_blocks, widths[1:], num_se_blocks, strict=True)
        for stage, (depth, width, se_blocks) in enumerate(stages, 1):
            if se_blocks > depth:
                raise ValueError(f"stage {stage}: {se_blocks} SE blocks but only {depth} pairs")
            blocks = []
            for index in range(depth):
                shared = dict(
                    num_conv_branches=num_conv_branches,
                    use_se=index >= depth - se_blocks,
                    **mode,
                )
                stride = 2 if index == 0 else 1
                blocks.append(
                    MobileOneBlock(channels, channels, 3, stride, 1, groups=channels, **shared)
                )
                blocks.append(MobileOneBlock(channels, width, 1, 1, 0, **shared))
                channels = width
            self.add_module(f"stage{stage}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)


# The published variants: width multipliers, conv branches, SE.
VARIANTS: dict[str, tuple[tuple[float, float, float, float], int, bool]] = {
    "s0": ((0.75, 1.0, 1.0, 2.0), 4, False),
    "s1": ((1.5, 1.5, 2.0, 2.5), 1, False),
    "s2": ((1.5, 2.0, 2.5, 4.0), 1, False),
    "s3": ((2.0, 2.5, 3.0, 4.0), 1, False),
    "s4": ((3.0, 3.5, 3.5, 4.0), 1, True),
}
NUM_BLOCKS = (2, 8, 10, 1)


def _build(variant: str, num_classes: int, inference_mode: bool) -> MobileOne:
    multipliers, branches, use_se = VARIANTS[variant]
    # With SE: the second half of stage 3 and all of stage 4, as published.
    se_blocks = (0, 0, NUM_BLOCKS[2] // 2, NUM_BLOCKS[3]) if use_se else (0, 0, 0, 0)
    return MobileOne(
        NUM_BLOCKS,
        mobileone_widths(multipliers),
        num_conv_branches=branches,
        num_se_blocks=se_blocks,
        num_classes=num_classes,
        inference_mode=inference_mode,
    )


@register_model("mobileone_s0", (1, 3, 224, 224))
def mobileone_s0(num_classes: int = 1000, inference_mode: bool = False) -> MobileOne:
    """MobileOne-S0: widths 48/48/128/256/1024, 2/8/10/1 pairs, k = 4 branches."""
    return _build("s0", num_classes, inference_mode)


@register_model("mobileone_s1", (1, 3, 224, 224))
def mobileone_s1(num_classes: int = 1000, inference_mode: bool = False) -> MobileOne:
    """MobileOne-S1: widths 64/96/192/512/1280, 2/8/10/1 pairs, k = 1."""
    return _build("s1", num_classes, inference_mode)


@register_model("mobileone_s2", (1, 3, 224, 224))
def mobileone_s2(num_classes: int = 1000, inference_mode: bool = False) -> MobileOne:
    """MobileOne-S2: widths 64/96/256/640/2048, 2/8/10/1 pairs, k = 1."""
    return _build("s2", num_classes, inference_mode)


@register_model("mobileone_s3", (1, 3, 224, 224))
def mobileone_s3(num_classes: int = 1000, inference_mode: bool = False) -> MobileOne:
    """MobileOne-S3: widths 64/128/320/768/2048, 2/8/10/1 pairs, k = 1."""
    return _build("s3", num_classes, inference_mode)


@register_model("mobileone_s4", (1, 3, 224, 224))
def mobileone_s4(num_classes: int = 1000, inference_mode: bool = False) -> MobileOne:
    """MobileOne-S4: widths 64/192/448/896/2048, 2/8/10/1 pairs, k = 1, SE in stages 3–4."""
    return _build("s4", num_classes, inference_mode)


@register_model("mobileone_tiny", (1, 3, 32, 32))
def mobileone_tiny(
    num_classes: int = 10, width: int = 8, inference_mode: bool = False
) -> MobileOne:
    """A small MobileOne (k = 2 branches, SE in the last stage) for 32² inputs."""
    return MobileOne(
        (1, 2, 1, 1),
        (width, width, 2 * width, 4 * width, 4 * width),
        num_conv_branches=2,
        num_se_blocks=(0, 0, 0, 1),
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
