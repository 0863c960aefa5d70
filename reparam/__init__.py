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
from reparam.export import ExportError, ExportReport, VerifyReport, export_onnx, verify_onnx

__all__ = [
    "ExportError",
    "ExportReport",
    "FuseOutcome",
    "FuseReport",
    "FusionError",
    "ReparamError",
    "UserInputError",
    "VerifyReport",
    "__version__",
    "blocks",
    "export_onnx",
    "fuse",
    "fuse_with_report",
    "get_fuser",
    "list_fusers",
    "load",
    "register_fuser",
    "save_fused",
    "verify_onnx",
]
