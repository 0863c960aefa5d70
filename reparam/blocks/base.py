"""The protocol every reparam block follows, and the fuser that serves all of them.

A block is built in its training form (several branches, BatchNorms) or, with
``deploy=True``, directly in its deploy form, so that fused checkpoints load with strict
keys. ``switch_to_deploy()`` converts the training form in place and deletes the branches;
calling it again does nothing. ``reparameterize()`` is the same method under the name timm
and MobileOne use.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from reparam.convert import FuseOutcome, register_fuser
from reparam.errors import FusionError
from reparam.module_fusion import make_conv

__all__ = ["ReparamBlock", "check_branch_geometry"]


def check_branch_geometry(
    block: str, in_channels: int, out_channels: int, kernel_size: int, groups: int, why: str
) -> None:
    """Refuse what no KxK multi-branch block can fuse: an even kernel (no centre tap for the
    smaller branches to align on, ``why`` says which) or channels not divisible by groups."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise FusionError(f"{block} needs an odd kernel_size ({why}), got {kernel_size}")
    if in_channels % groups or out_channels % groups:
        raise FusionError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
            f"divisible by groups ({groups})"
        )


class ReparamBlock(nn.Module):
    """Base class of the blocks in :mod:`reparam.blocks`.

    Subclasses set ``self.deploy`` in ``__init__`` and implement :meth:`_reparameterize`,
    which builds the deploy form from the training branches (in eval-mode semantics: BN
    running statistics) and deletes the branches. They may set ``self.fuse_detail`` to say
    what they chose, for the fuse report.
    """

    deploy: bool = False
    fuse_detail: str = ""

    def _reparameterize(self) -> None:
        raise NotImplementedError

    def switch_to_deploy(self) -> None:
        """Convert to the deploy form in place; a no-op when already deployed."""
        if self.deploy:
            return
        with torch.no_grad():
            self._reparameterize()
        self.deploy = True

    def reparameterize(self) -> None:
        """Alias of :meth:`switch_to_deploy` (the timm / MobileOne name)."""
        self.switch_to_deploy()

    def _float32_source(self, dtype: torch.dtype) -> ReparamBlock:
        """The block to read branch parameters from when folding: itself, or for bfloat16 /
        float16 weights a float32 copy, so every branch is folded in float32 and the sum is
        rounded to ``dtype`` once."""
        if torch.promote_types(dtype, torch.float32) == dtype:
            return self
        return copy.deepcopy(self).float()

    def _deploy_conv(self, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
        """The single conv of the deploy form, with the block's own conv geometry
        (its ``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode``)."""
        return make_conv(
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=getattr(self, "padding_mode", "zeros"),
        )


@register_fuser(ReparamBlock)
def _fuse_reparam_block(block: ReparamBlock) -> FuseOutcome | None:
    if block.deploy:
        return None
    block.switch_to_deploy()
    return FuseOutcome(block, block.fuse_detail)
