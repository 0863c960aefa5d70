"""RepVGG networks (Ding et al., CVPR 2021): a plain stack of RepVGGBlocks.

Module names and state-dict keys are those of the published ``repvgg.py``
(https://github.com/DingXiaoH/RepVGG/blob/main/repvgg.py), so its training checkpoints
(``RepVGG-A0-train.pth``) load strictly into ``repvgg_a0()`` and its deploy checkpoints
(``RepVGG-A0-deploy.pth``) into ``repvgg_a0(deploy=True)``:

    stage0                       one block, 3 → min(64, 64a) channels, stride 2
    stage1.0 … stage4.N          four stages, the first block of each with stride 2,
                                 64a, 128a, 256a and 512b channels
    gap, linear                  global average pooling and the classifier

With a, b the width multipliers, a 224² input ends at 7². After fusion every block is one
3x3 conv and a ReLU: a VGG-style network. The grouped variants (g2, g4) give the blocks of
layer index 2, 4, …, 26 that many groups, counting stage0 as layer 0 and numbering the
stage blocks from 1 in order (the published ``optional_groupwise_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from reparam.blocks.repvgg import RepVGGBlock
from reparam.models.registry import register_model
from reparam.models.staged import StagedClassifier

__all__ = [
    "RepVGG",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g2",
    "repvgg_b1g4",
    "repvgg_b2",
    "repvgg_b2g2",
    "repvgg_b2g4",
    "repvgg_b3",
    "repvgg_b3g2",
    "repvgg_b3g4",
    "repvgg_tiny",
    "repvgg_widths",
]

# Layer indices that the published g2/g4 variants make grouped (stage0 is layer 0).
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


def repvgg_widths(a: float, b: float) -> tuple[int, ...]:
    """stage0..stage4 widths for width multipliers (a, a, a, b): min(64, 64a), 64a, 128a,
    256a, 512b (each truncated to an int, as published)."""
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


class RepVGG(StagedClassifier):
    """stage0 (one block) and stages 1–4 of RepVGGBlocks, pooling and a linear classifier.

    Args:
        num_blocks: blocks in stages 1–4 (four numbers).
        widths: output channels of stage0..stage4 (five numbers).
        num_classes: classifier outputs.
        groups_map: layer index → groups (layer 0 is stage0, then 1, 2, … in order).
        in_channels: input channels.
        deploy: build every block in its fused form (to load deploy checkpoints).
        use_se: squeeze-excitation in every block (RepVGG-D2se style).
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 1000,
        groups_map: Mapping[int, int] | None = None,
        in_channels: int = 3,
        deploy: bool = False,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(widths) != 5:
            raise ValueError(
                f"RepVGG needs 4 stage depths and 5 widths, got {num_blocks} and {widths}"
            )
        groups_map = dict(groups_map or {})
        block = dict(deploy=deploy, use_se=use_se)
        self.stage0 = RepVGGBlock(in_channels, widths[0], 3, stride=2, padding=1, **block)
        channels, layer = widths[0], 1
        for stage, (depth, width) in enumerate(zip(num_blocks, widths[1:], strict=True), 1):
            blocks = []
            for index in range(depth):
                groups = groups_map.get(layer, 1)
                stride = 2 if index == 0 else 1
                blocks.append(RepVGGBlock(channels, width, 3, stride, 1, groups=groups, **block))
                channels, layer = width, layer + 1
            self.add_module(f"stage{stage}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)


# name: (num_blocks, (a, b), groups) of the published variants.
_A, _B = (2, 4, 14, 1), (4, 6, 16, 1)
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[float, float], int]] = {
    "a0": (_A, (0.75, 2.5), 1),
    "a1": (_A, (1, 2.5), 1),
    "a2": (_A, (1.5, 2.75), 1),
    "b0": (_B, (1, 2.5), 1),
    "b1": (_B, (2, 4), 1),
    "b1g2": (_B, (2, 4), 2),
    "b1g4": (_B, (2, 4), 4),
    "b2": (_B, (2.5, 5), 1),
    "b2g2": (_B, (2.5, 5), 2),
    "b2g4": (_B, (2.5, 5), 4),
    "b3": (_B, (3, 5), 1),
    "b3g2": (_B, (3, 5), 2),
    "b3g4": (_B, (3, 5), 4),
}


def _build(variant: str, num_classes: int, deploy: bool) -> RepVGG:
    num_blocks, (a, b), groups = VARIANTS[variant]
    groups_map = dict.fromkeys(GROUPWISE_LAYERS, groups) if groups > 1 else None
    return RepVGG(num_blocks, repvgg_widths(a, b), num_classes, groups_map, deploy=deploy)


@register_model("repvgg_a0", (1, 3, 224, 224))
def repvgg_a0(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-A0: widths 48/48/96/192/1280, depths 1/2/4/14/1."""
    return _build("a0", num_classes, deploy)


@register_model("repvgg_a1", (1, 3, 224, 224))
def repvgg_a1(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-A1: widths 64/64/128/256/1280, depths 1/2/4/14/1."""
    return _build("a1", num_classes, deploy)


@register_model("repvgg_a2", (1, 3, 224, 224))
def repvgg_a2(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-A2: widths 64/96/192/384/1408, depths 1/2/4/14/1."""
    return _build("a2", num_classes, deploy)


@register_model("repvgg_b0", (1, 3, 224, 224))
def repvgg_b0(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B0: widths 64/64/128/256/1280, depths 1/4/6/16/1."""
    return _build("b0", num_classes, deploy)


@register_model("repvgg_b1", (1, 3, 224, 224))
def repvgg_b1(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B1: widths 64/128/256/512/2048, depths 1/4/6/16/1."""
    return _build("b1", num_classes, deploy)


@register_model("repvgg_b1g2", (1, 3, 224, 224))
def repvgg_b1g2(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B1G2: widths 64/128/256/512/2048, depths 1/4/6/16/1, groups 2 on even layers."""
    return _build("b1g2", num_classes, deploy)


@register_model("repvgg_b1g4", (1, 3, 224, 224))
def repvgg_b1g4(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B1G4: widths 64/128/256/512/2048, depths 1/4/6/16/1, groups 4 on even layers."""
    return _build("b1g4", num_classes, deploy)


@register_model("repvgg_b2", (1, 3, 224, 224))
def repvgg_b2(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B2: widths 64/160/320/640/2560, depths 1/4/6/16/1."""
    return _build("b2", num_classes, deploy)


@register_model("repvgg_b2g2", (1, 3, 224, 224))
def repvgg_b2g2(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B2G2: widths 64/160/320/640/2560, depths 1/4/6/16/1, groups 2 on even layers."""
    return _build("b2g2", num_classes, deploy)


@register_model("repvgg_b2g4", (1, 3, 224, 224))
def repvgg_b2g4(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B2G4: widths 64/160/320/640/2560, depths 1/4/6/16/1, groups 4 on even layers."""
    return _build("b2g4", num_classes, deploy)


@register_model("repvgg_b3", (1, 3, 224, 224))
def repvgg_b3(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B3: widths 64/192/384/768/2560, depths 1/4/6/16/1."""
    return _build("b3", num_classes, deploy)


@register_model("repvgg_b3g2", (1, 3, 224, 224))
def repvgg_b3g2(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B3G2: widths 64/192/384/768/2560, depths 1/4/6/16/1, groups 2 on even layers."""
    return _build("b3g2", num_classes, deploy)


@register_model("repvgg_b3g4", (1, 3, 224, 224))
def repvgg_b3g4(num_classes: int = 1000, deploy: bool = False) -> RepVGG:
    """RepVGG-B3G4: widths 64/192/384/768/2560, depths 1/4/6/16/1, groups 4 on even layers."""
    return _build("b3g4", num_classes, deploy)


@register_model("repvgg_tiny", (1, 3, 32, 32))
def repvgg_tiny(num_classes: int = 10, width: int = 8, deploy: bool = False) -> RepVGG:
    """A small RepVGG (stage0 + 4 stages, 6 blocks, groups 2 on layer 2) for 32² inputs."""
    widths = (width, width, 2 * width, 4 * width, 4 * width)
    return RepVGG((2, 1, 1, 1), widths, num_classes, {2: 2}, deploy=deploy)
