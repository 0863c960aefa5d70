"""A small YOLOv5-style detector whose backbone uses the plug-in blocks and whose neck is ASFF.

Backbone (stride 32 overall): YOLOv5 Convs for downsampling, with HetConv (stride 4 stage),
an OctaveConv chain (stride 8), Involution (stride 16) and DRConv (stride 32) as the
plug-ins users put into YOLOv5. Neck: one ASFF per level fusing the three scales. Head: a
1x1 conv per level predicting ``anchors × (5 + classes)`` values per cell, as in YOLOv5.
"""

from __future__ import annotations

from torch import Tensor, nn

from reparam.blocks.asff import ASFF
from reparam.blocks.conv import Conv
from reparam.blocks.drconv import DRConv2d
from reparam.blocks.hetconv import HetConv
from reparam.blocks.involution import Involution
from reparam.blocks.octave import OctaveConvBN
from reparam.models.registry import register_model

__all__ = ["TinyYOLO", "yolo_asff_tiny"]


class TinyYOLO(nn.Module):
    """Three-scale detector: outputs (P3, P4, P5), each (B, anchors·(5 + classes), H/s, W/s)."""

    def __init__(self, num_classes: int = 3, anchors: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = Conv(3, w, 3, 2)  # /2
        self.stage2 = nn.Sequential(  # /4
            Conv(w, 2 * w, 3, 2), HetConv(2 * w, 2 * w, 4), nn.SiLU()
        )
        self.down3 = Conv(2 * w, 4 * w, 3, 2)  # /8
        self.octave = nn.Sequential(
            OctaveConvBN(4 * w, 4 * w, 3, alpha_in=0, alpha_out=0.5, activation=nn.SiLU),
            OctaveConvBN(4 * w, 4 * w, 3, alpha_in=0.5, alpha_out=0, activation=nn.SiLU),
        )
        self.stage4 = nn.Sequential(  # /16
            Conv(4 * w, 8 * w, 3, 2), Involution(8 * w, 3, group_channels=16), nn.SiLU()
        )
        self.down5 = Conv(8 * w, 8 * w, 3, 2)  # /32
        self.dynamic = DRConv2d(8 * w, 8 * w, 3, region_num=4, padding=1)
        channels = (8 * w, 8 * w, 4 * w)  # levels 0 (P5), 1 (P4), 2 (P3)
        self.neck = nn.ModuleList(ASFF(level, channels=channels) for level in range(3))
        outputs = anchors * (5 + num_classes)
        self.heads = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in reversed(channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.octave(self.down3(self.stage2(self.stem(x))))
        p4 = self.stage4(p3)
        p5 = self.dynamic(self.down5(p4))
        scales = [p3, p4, p5]  # ASFF takes (x2, x1, x0): largest map first
        fused = [asff(scales) for asff in self.neck]  # levels 0, 1, 2 → P5, P4, P3
        return tuple(head(f) for head, f in zip(self.heads, reversed(fused), strict=True))


@register_model("yolo_asff_tiny", (1, 3, 128, 128))
def yolo_asff_tiny(num_classes: int = 3, width: int = 16) -> TinyYOLO:
    """YOLOv5-style detector: HetConv/OctaveConv/Involution/DRConv backbone, ASFF neck."""
    return TinyYOLO(num_classes=num_classes, width=width)
