"""Turn an existing network into a training-time ACNet: Conv-BN pairs become ACBlocks.

Each square, odd KxK ``Conv2d`` (K > 1) whose output feeds only a ``BatchNorm2d`` is replaced
by an :class:`~reparam.blocks.ACBlock` whose square branch *is* that conv and BatchNorm
(weights, statistics and eps copied), and the BatchNorm by ``nn.Identity``. The new Kx1 and
1xK branches start with BN γ = 0 and β = 0, so the converted network computes exactly what
the original did until training moves them (the zero-γ start ACNet-style fine-tuning uses).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from reparam.blocks.acb import ACBlock
from reparam.convert import find_conv_bn_pairs, replace_module

__all__ = ["convert_to_acblocks"]


def _single(value: int | tuple[int, ...] | str) -> int | None:
    """The int a symmetric conv argument holds, or None for asymmetric/str values."""
    if isinstance(value, str):
        return None
    if isinstance(value, int):
        return value
    return value[0] if all(v == value[0] for v in value) else None


def _as_acblock(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> ACBlock | None:
    kernel, stride = _single(conv.kernel_size), _single(conv.stride)
    padding, dilation = _single(conv.padding), _single(conv.dilation)
    if None in (kernel, stride, padding, dilation) or kernel < 3 or kernel % 2 == 0:
        return None
    block = ACBlock(
        conv.in_channels,
        conv.out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        use_affine=bn.affine,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    block.square_conv.load_state_dict(conv.state_dict())
    for branch_bn in (block.square_bn, block.ver_bn, block.hor_bn):
        branch_bn.eps, branch_bn.momentum = bn.eps, bn.momentum
    block.square_bn.load_state_dict(bn.state_dict())
    with torch.no_grad():
        for branch_bn in (block.ver_bn, block.hor_bn):
            if branch_bn.affine:
                branch_bn.weight.zero_()
                branch_bn.bias.zero_()
    return block


def convert_to_acblocks(
    model: nn.Module, *, inplace: bool = False, trace: bool = True
) -> tuple[nn.Module, int]:
    """Replace every eligible Conv2d→BatchNorm2d pair of ``model`` with an ACBlock.

    Args:
        model: a network with Conv2d→BatchNorm2d pairs (in ``nn.Sequential`` or, with
            ``trace``, anywhere ``torch.fx`` can see them).
        inplace: modify ``model`` instead of a deep copy.
        trace: also find pairs by tracing the model with ``torch.fx``.

    Returns:
        The converted model (its outputs equal the original's) and how many pairs converted.
    """
    target = model if inplace else copy.deepcopy(model)
    pairs, _ = find_conv_bn_pairs(target, trace=trace)
    converted = 0
    for pair in pairs:
        conv, bn = target.get_submodule(pair.conv), target.get_submodule(pair.bn)
        if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
            continue
        block = _as_acblock(conv, bn)
        if block is None:
            continue
        replace_module(target, pair.conv, block.train(conv.training))
        replace_module(target, pair.bn, nn.Identity())
        converted += 1
    return target, converted
