"""Explicit registration of everything reparam's own model-wide fuse relies on.

:func:`register_builtins` puts into the registries of :mod:`reparam.fusers`:

- the fuser of :class:`~reparam.blocks.base.ReparamBlock` (every bundled block's
  ``switch_to_deploy``, found along the MRO);
- the torch.fx leaf blocks (data-dependent forwards fx cannot trace symbolically);
- the adoption of users' copies of published blocks (:func:`reparam.adopt.adopt_foreign_blocks`)
  as a pre-fuse pass.

``fuse``, ``fuse_with_report`` and ``find_conv_bn_pairs`` call it, so what they see does not
depend on what the user happened to import. It runs its work once per process and every step
is idempotent: a registration some module already made by import is not repeated, and a
user's own registrations made afterwards are kept.
"""

from __future__ import annotations

import threading

from reparam.adopt import adopt_foreign_blocks
from reparam.blocks.asff import ASFF
from reparam.blocks.base import ReparamBlock, _fuse_reparam_block
from reparam.blocks.drconv import DRConv2d
from reparam.blocks.involution import Involution
from reparam.blocks.t2t import T2TModule
from reparam.fusers import (
    get_fuser,
    register_fuser,
    register_leaf_module,
    register_pre_fuse_pass,
)

__all__ = ["LEAF_BLOCKS", "register_builtins"]

# Data-dependent forwards: torch.fx must treat them as leaves, so tracing a model that holds
# them still finds the Conv→BatchNorm pairs around them.
LEAF_BLOCKS: tuple[type, ...] = (ASFF, DRConv2d, Involution, T2TModule)

_lock = threading.Lock()
_registered = False


def register_builtins() -> None:
    """Register the built-in fuser, fx leaves and adoption pass (once; cheap afterwards)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        if get_fuser(ReparamBlock) is None:
            register_fuser(ReparamBlock, _fuse_reparam_block)
        for leaf in LEAF_BLOCKS:
            register_leaf_module(leaf)
        register_pre_fuse_pass(adopt_foreign_blocks)
        _registered = True
