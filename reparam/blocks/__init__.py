"""Training-time blocks with exact deploy forms; importing this registers their fusers."""

from reparam.blocks.acb import ACBlock
from reparam.blocks.asff import ASFF
from reparam.blocks.base import ReparamBlock
from reparam.blocks.conv import Conv, autopad
from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.drconv import DRConv2d
from reparam.blocks.hetconv import HetConv
from reparam.blocks.involution import Involution
from reparam.blocks.mobileone import MobileOneBlock
from reparam.blocks.octave import OctaveConv, OctaveConvBN
from reparam.blocks.repvgg import RepVGGBlock
from reparam.blocks.t2t import T2TModule
from reparam.fusers import register_leaf_module

# Data-dependent forwards: torch.fx must treat them as leaves, so tracing a model that holds
# them still finds the Conv→BatchNorm pairs around them.
for _dynamic in (ASFF, DRConv2d, Involution, T2TModule):
    register_leaf_module(_dynamic)
del _dynamic

# Adoption of users' copies of published blocks runs before every fuse; importing the module
# registers it (it builds the blocks above, so it is loaded after them).
from reparam import adopt as _adopt  # noqa: E402, F401

__all__ = [
    "ASFF",
    "ACBlock",
    "Conv",
    "DRConv2d",
    "DiverseBranchBlock",
    "HetConv",
    "Involution",
    "MobileOneBlock",
    "OctaveConv",
    "OctaveConvBN",
    "RepVGGBlock",
    "ReparamBlock",
    "T2TModule",
    "autopad",
]
