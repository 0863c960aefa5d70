"""Training-time blocks with exact deploy forms; importing this registers their fusers."""

from reparam.blocks.acb import ACBlock
from reparam.blocks.base import ReparamBlock
from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.mobileone import MobileOneBlock
from reparam.blocks.repvgg import RepVGGBlock

__all__ = ["ACBlock", "DiverseBranchBlock", "MobileOneBlock", "RepVGGBlock", "ReparamBlock"]
