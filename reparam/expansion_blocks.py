"""One plain conv (with its BatchNorm) as a family's training-time block, same function.

For a conv W with bias b (0 if none) followed by a BatchNorm (μ, σ² + ε, γ, β) the block's
main branch gets W and the BatchNorm with μ' = μ − b, so that

    BN_main(W ⋆ x) = γ·(W ⋆ x + b − μ)/σ + β          (the original, exactly)

A conv with a bias and no BatchNorm gets a main BatchNorm that is the identity map in eval
mode: μ = 0, σ² = 1, γ = √(1 + ε), β = b. Every branch the family adds ends in a BatchNorm
whose γ and β start at 0, so it outputs exactly 0:

    y = BN_main(W ⋆ x) + Σ_added 0·x̂ + 0 = the original output.

Training mode: a BatchNorm with γ = β = 0 still outputs 0 with batch statistics, so for a
conv that had a BatchNorm the block also matches the original in training mode at step 0;
for a conv without one the main BatchNorm normalises with batch statistics in training.
Gradients at step 0: γ and β of the added BatchNorms get non-zero gradients, the added
branches' conv weights get zero (their output is multiplied by γ = 0) until γ moves.

Each builder returns the block and its main conv/BatchNorm; a configuration the family
cannot express raises :class:`~reparam.errors.BlockConfigError` (the caller reports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from reparam.blocks.acb import ACBlock
from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.mobileone import MobileOneBlock
from reparam.blocks.qarepvgg import QARepVGGBlock
from reparam.blocks.repvgg import RepVGGBlock
from reparam.errors import BlockConfigError
from reparam.fusion import identity_kernel

__all__ = ["FAMILIES", "Geometry", "build_block", "conv_geometry"]

FAMILIES = ("acnet", "repvgg", "dbb", "mobileone", "qarepvgg")


@dataclass(frozen=True)
class Geometry:
    """A square, symmetric Conv2d's geometry, as the blocks take it."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    groups: int
    padding_mode: str


def _single(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and value and all(v == value[0] for v in value):
        return value[0]
    return None


def conv_geometry(conv: nn.Conv2d) -> tuple[Geometry | None, str | None]:
    """The conv's geometry as one int per argument, or why the blocks cannot express it."""
    kh, kw = conv.kernel_size
    if kh != kw:
        return None, f"kernel {kh}x{kw} is not square"
    if kh % 2 == 0:
        return None, f"even kernel size {kh}: no centre tap for the added branches to align on"
    stride, dilation = _single(conv.stride), _single(conv.dilation)
    if stride is None:
        return None, f"stride {conv.stride} differs between height and width"
    if dilation is None:
        return None, f"dilation {conv.dilation} differs between height and width"
    padding = conv.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = dilation * (kh // 2)
    else:
        padding = _single(padding)
        if padding is None:
            return None, f"padding {conv.padding} differs between height and width"
    return Geometry(
        conv.in_channels, conv.out_channels, kh, stride, padding, dilation, conv.groups,
        conv.padding_mode,
    ), None  # fmt: skip


@dataclass
class _Built:
    block: nn.Module
    main_conv: nn.Conv2d
    main_bn: _BatchNorm
    added: list[_BatchNorm]
    """The BatchNorms ending each added branch: γ = β = 0."""
    finish: Callable[[], None] | None = None
    """Run after the main branch is loaded (QARepVGG's bare branches)."""


def _zeros_only(family: str, geometry: Geometry) -> None:
    if geometry.padding_mode != "zeros":
        raise BlockConfigError(
            f"padding_mode='{geometry.padding_mode}': the {family} block pads with zeros only"
        )


def _acnet(g: Geometry, options: dict) -> _Built:
    if g.kernel_size == 1:
        raise BlockConfigError(
            "a 1x1 conv cannot become an ACBlock (its Kx1 and 1xK branches need K > 1)"
        )
    block = ACBlock(
        g.in_channels, g.out_channels, g.kernel_size, stride=g.stride, padding=g.padding,
        dilation=g.dilation, groups=g.groups, padding_mode=g.padding_mode,
    )  # fmt: skip
    return _Built(block, block.square_conv, block.square_bn, [block.ver_bn, block.hor_bn])


def _repvgg(g: Geometry, options: dict) -> _Built:
    _zeros_only("repvgg", g)
    block = RepVGGBlock(
        g.in_channels, g.out_channels, g.kernel_size, stride=g.stride, padding=g.padding,
        dilation=g.dilation, groups=g.groups,
    )  # fmt: skip
    block.nonlinearity = nn.Identity()  # the plain conv's activation stays where it was
    added = [block.rbr_1x1.bn]
    if block.rbr_identity is not None:
        added.append(block.rbr_identity)
    return _Built(block, block.rbr_dense.conv, block.rbr_dense.bn, added)


def _dbb(g: Geometry, options: dict) -> _Built:
    _zeros_only("dbb", g)
    block = DiverseBranchBlock(
        g.in_channels, g.out_channels, g.kernel_size, stride=g.stride, padding=g.padding,
        dilation=g.dilation, groups=g.groups,
    )  # fmt: skip
    added = [block.dbb_avg.avgbn, block.dbb_1x1_kxk.bn2]
    if hasattr(block, "dbb_1x1"):
        added.append(block.dbb_1x1.bn)
    return _Built(block, block.dbb_origin.conv, block.dbb_origin.bn, added)


def _mobileone(g: Geometry, options: dict) -> _Built:
    _zeros_only("mobileone", g)
    block = MobileOneBlock(
        g.in_channels, g.out_channels, g.kernel_size, stride=g.stride, padding=g.padding,
        dilation=g.dilation, groups=g.groups,
        num_conv_branches=max(1, int(options.get("num_conv_branches", 2))),
    )  # fmt: skip
    block.activation = nn.Identity()
    added = [branch.bn for branch in block.rbr_conv[1:]]
    if block.rbr_scale is not None:
        added.append(block.rbr_scale.bn)
    if block.rbr_skip is not None:
        added.append(block.rbr_skip)
    return _Built(block, block.rbr_conv[0].conv, block.rbr_conv[0].bn, added)


def _qarepvgg(g: Geometry, options: dict) -> _Built:
    """QARepVGG's 1x1 and identity branches have no BN to start at zero, and its BN acts on
    the sum: y = BN_post(BN_d(W_d ⋆ x) + W_1 ⋆ x + x). So the original BN (or the identity
    BN) becomes BN_post, BN_d the eval-mode identity (μ = 0, σ² = 1, γ = √(1 + ε), β = 0),
    W_1 = 0 and W_d = W − centre(I) where the identity branch exists: the sum is W ⋆ x.
    W_1 gets gradients from the first step. In training mode BN_d normalises with batch
    statistics, so a QARepVGG expansion matches the original in eval mode only."""
    _zeros_only("qarepvgg", g)
    block = QARepVGGBlock(
        g.in_channels, g.out_channels, g.kernel_size, stride=g.stride, padding=g.padding,
        dilation=g.dilation, groups=g.groups,
    )  # fmt: skip
    block.nonlinearity = nn.Identity()

    def finish() -> None:
        dense, dense_bn = block.rbr_dense.conv, block.rbr_dense.bn
        dense_bn.eps, dense_bn.momentum = block.bn.eps, block.bn.momentum
        _identity_bn(dense_bn)
        block.rbr_1x1.weight.zero_()
        if block.rbr_identity is not None:
            identity = identity_kernel(
                g.in_channels, g.kernel_size, groups=g.groups, dtype=torch.float64,
                device=dense.weight.device,
            )  # fmt: skip
            dense.weight.copy_(dense.weight.to(torch.float64) - identity)

    return _Built(block, block.rbr_dense.conv, block.bn, [], finish)


_BUILDERS: dict[str, Callable[[Geometry, dict], _Built]] = {
    "acnet": _acnet,
    "repvgg": _repvgg,
    "dbb": _dbb,
    "mobileone": _mobileone,
    "qarepvgg": _qarepvgg,
}


@torch.no_grad()
def build_block(
    family: str, geometry: Geometry, conv: nn.Conv2d, bn: _BatchNorm | None, options: dict
) -> nn.Module:
    """The ``family`` block computing what ``bn(conv(x))`` (or ``conv(x)``) computes.

    Raises:
        BlockConfigError: the family cannot express this conv (the message says why).
    """
    built = _BUILDERS[family](geometry, options)
    block = built.block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    _load_main(conv, bn, built.main_conv, built.main_bn)
    for added in built.added:
        added.eps = built.main_bn.eps
        added.momentum = built.main_bn.momentum
        added.weight.zero_()
        added.bias.zero_()
    if built.finish is not None:
        built.finish()
    if not conv.weight.requires_grad:  # a frozen conv stays frozen, added branches included
        block.requires_grad_(False)
    return block.train(conv.training)


def _load_main(conv: nn.Conv2d, bn: _BatchNorm | None, main_conv: nn.Conv2d, main_bn) -> None:
    """W into the main conv; the BatchNorm (or an eval-mode identity) into the main BN, with
    the conv's bias b moved into the running mean (μ − b) or, without a BN, into β."""
    main_conv.weight.copy_(conv.weight)
    bias = conv.bias.detach() if conv.bias is not None else None
    if bn is None:
        _identity_bn(main_bn)
        if bias is not None:
            main_bn.bias.copy_(bias)
        return
    main_bn.eps, main_bn.momentum = bn.eps, bn.momentum
    mean = bn.running_mean.to(torch.float64)
    if bias is not None:
        mean = mean - bias.to(torch.float64)
    main_bn.running_mean.copy_(mean)
    main_bn.running_var.copy_(bn.running_var)
    if bn.num_batches_tracked is not None:
        main_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
    if bn.affine:
        main_bn.weight.copy_(bn.weight)
        main_bn.bias.copy_(bn.bias)
    else:  # an affine-free BN is γ = 1, β = 0; the main branch becomes trainable there
        main_bn.weight.fill_(1.0)
        main_bn.bias.zero_()


def _identity_bn(bn: _BatchNorm) -> None:
    """Make ``bn`` the identity map in eval mode: μ = 0, σ² = 1, γ = √(1 + ε), β = 0."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.fill_(math.sqrt(1.0 + bn.eps))  # γ/√(σ² + ε) = 1
    bn.bias.zero_()
