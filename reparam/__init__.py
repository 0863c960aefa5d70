"""reparam: fuse, export and verify PyTorch CNNs built from multi-branch and dynamic blocks."""

from reparam import blocks
from reparam._version import __version__
from reparam.checkpoint import load, save_fused
from reparam.convert import (
    FuseOutcome,
    FuseReport,
    fuse,
    fuse_with_report,
    get_fuser,
    list_fusers,
    register_fuser,
)
from reparam.errors import FusionError, ReparamError, UserInputError

__all__ = [
    "FuseOutcome",
    "FuseReport",
    "FusionError",
    "ReparamError",
    "UserInputError",
    "__version__",
    "blocks",
    "fuse",
    "fuse_with_report",
    "get_fuser",
    "list_fusers",
    "load",
    "register_fuser",
    "save_fused",
]
