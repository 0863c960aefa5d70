"""Training-time blocks with exact deploy forms; importing this registers their fusers."""

from reparam.blocks.acb import ACBlock
from reparam.blocks.base import ReparamBlock

__all__ = ["ACBlock", "ReparamBlock"]
