"""A small classifier for 8x8 digit images built from training-time blocks (the demo's model)."""

from __future__ import annotations

from torch import Tensor, nn

from reparam.blocks.acb import ACBlock
from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.drconv import DRConv2d
from reparam.blocks.mobileone import MobileOneBlock
from reparam.blocks.repvgg import RepVGGBlock
from reparam.models.registry import register_model

__all__ = ["DigitsNet", "digits_net"]


class DigitsNet(nn.Module):
    """ACBlock → RepVGG → DRConv → DBB (stride 2) → MobileOne → pool → linear.

    Every branchy block fuses into one conv; DRConv stays dynamic (its Corr operator is what
    the ONNX export's two Corr modes are about).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            ACBlock(in_channels, width, 3),
            nn.ReLU(),
            RepVGGBlock(width, width, 3),
            DRConv2d(width, width, 3, region_num=4, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            DiverseBranchBlock(width, 2 * width, 3, stride=2),
            nn.ReLU(),
            MobileOneBlock(2 * width, 2 * width, 3, num_conv_branches=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("digits_net", (1, 1, 8, 8))
def digits_net(num_classes: int = 10, width: int = 16) -> DigitsNet:
    """The demo's digit classifier: ACBlock, RepVGG, DRConv, DBB and MobileOne blocks."""
    return DigitsNet(num_classes=num_classes, width=width)
