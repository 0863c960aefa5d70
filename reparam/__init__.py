"""reparam: fuse, export and verify PyTorch CNNs built from multi-branch and dynamic blocks.

The public names below load on first use (PEP 562), so ``import reparam`` and the CLI's
``--version``/``--help`` do not pay for importing torch. Any torch-side name also loads
:mod:`reparam.builtins`, which registers the block fuser, the torch.fx leaf blocks and the
adoption of users' copies of published blocks (``fuse`` registers them itself as well, so
nothing depends on what was imported first).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reparam._version import __version__
from reparam.errors import (
    BlockConfigError,
    ExportError,
    FusionError,
    MissingCustomOpError,
    ReparamError,
    UnsafeInputError,
    UserInputError,
)

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from reparam import blocks
    from reparam.checkpoint import load, save_fused
    from reparam.convert import FuseReport, fuse, fuse_with_report
    from reparam.expansion import ExpandReport, expand, expand_with_report
    from reparam.expansion_checkpoint import load_expanded, save_expanded
    from reparam.export import ExportReport, VerifyReport, export_onnx, verify_onnx
    from reparam.fusers import (
        FuseOutcome,
        get_fuser,
        list_fusers,
        override_fuser,
        register_fuser,
        unregister_fuser,
    )
    from reparam.quantize import QuantizeReport, quantize_onnx

_LAZY = {
    "blocks": "reparam.blocks",
    "load": "reparam.checkpoint",
    "save_fused": "reparam.checkpoint",
    "FuseReport": "reparam.convert",
    "fuse": "reparam.convert",
    "fuse_with_report": "reparam.convert",
    "ExpandReport": "reparam.expansion",
    "expand": "reparam.expansion",
    "expand_with_report": "reparam.expansion",
    "load_expanded": "reparam.expansion_checkpoint",
    "save_expanded": "reparam.expansion_checkpoint",
    "FuseOutcome": "reparam.fusers",
    "get_fuser": "reparam.fusers",
    "list_fusers": "reparam.fusers",
    "override_fuser": "reparam.fusers",
    "register_fuser": "reparam.fusers",
    "unregister_fuser": "reparam.fusers",
    "ExportReport": "reparam.export",
    "VerifyReport": "reparam.export",
    "export_onnx": "reparam.export",
    "verify_onnx": "reparam.export",
    "QuantizeReport": "reparam.quantize",
    "quantize_onnx": "reparam.quantize",
}

__all__ = [
    "BlockConfigError",
    "ExpandReport",
    "ExportError",
    "ExportReport",
    "FuseOutcome",
    "FuseReport",
    "FusionError",
    "MissingCustomOpError",
    "QuantizeReport",
    "ReparamError",
    "UnsafeInputError",
    "UserInputError",
    "VerifyReport",
    "__version__",
    "blocks",
    "expand",
    "expand_with_report",
    "export_onnx",
    "fuse",
    "fuse_with_report",
    "get_fuser",
    "list_fusers",
    "load",
    "load_expanded",
    "override_fuser",
    "quantize_onnx",
    "register_fuser",
    "save_expanded",
    "save_fused",
    "unregister_fuser",
    "verify_onnx",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reparam' has no attribute {name!r}")
    # list_fusers() and get_fuser() answer for the bundled blocks too
    importlib.import_module("reparam.builtins").register_builtins()
    module = importlib.import_module(_LAZY[name])
    value = module if name == "blocks" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
