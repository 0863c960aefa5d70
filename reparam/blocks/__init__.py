"""Training-time blocks with exact deploy forms.

The registrations a fuse relies on (the blocks' fuser, the torch.fx leaf blocks, the adoption
pass) are made by :mod:`reparam.builtins`, which every fuse calls: importing this package is
not needed for them, and it imports nothing above the blocks.
"""

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
from reparam.blocks.qarepvgg import QARepVGGBlock
from reparam.blocks.repvgg import RepVGGBlock
from reparam.blocks.t2t import T2TModule

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
    "QARepVGGBlock",
    "RepVGGBlock",
    "ReparamBlock",
    "T2TModule",
    "autopad",
]
