"""Module-level wrappers around :mod:`reparam.fusion`: read parameters off layers, build convs.

The tensor math lives in :mod:`reparam.fusion`; this module only moves tensors between
``nn.Module`` objects and those functions, and checks the preconditions that make a fold
exact (eval mode, running statistics present).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from reparam.errors import FusionError
from reparam.fusion import fold_batchnorm, identity_kernel

__all__ = [
    "conv_bn_kernel",
    "fold_bn_into_conv",
    "fold_bn_module",
    "fuse_conv_bn_eval",
    "identity_bn_kernel",
    "make_conv",
]


def check_foldable(bn: _BatchNorm, where: str = "") -> None:
    """Refuse a BatchNorm whose eval output is not a fixed affine map."""
    if bn.running_mean is None or bn.running_var is None:
        location = f" at '{where}'" if where else ""
        raise FusionError(
            f"{type(bn).__name__}{location} has no running statistics "
            "(track_running_stats=False): it normalises with batch statistics even in eval "
            "mode, so it cannot be folded into a conv"
        )


def fold_bn_module(
    kernel: Tensor,
    bias: Tensor | None,
    bn: _BatchNorm,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """:func:`~reparam.fusion.fold_batchnorm` with the statistics and affine of ``bn``."""
    check_foldable(bn)
    return fold_batchnorm(
        kernel,
        bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight.detach() if bn.affine else None,
        bn.bias.detach() if bn.affine else None,
        transposed=transposed,
        groups=groups,
    )


def conv_bn_kernel(conv: nn.Module, bn: _BatchNorm | None) -> tuple[Tensor, Tensor]:
    """The ``(kernel, bias)`` of ``bn(conv(x))`` in eval mode; ``bn=None`` means conv alone."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    if bn is None:
        return weight, bias if bias is not None else weight.new_zeros(weight.shape[0])
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    return fold_bn_module(weight, bias, bn, transposed=transposed, groups=conv.groups)


def identity_bn_kernel(
    bn: _BatchNorm,
    kernel_size: int,
    *,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """A BatchNorm skip branch, BN(x), as the ``(kernel, bias)`` of a KxK conv (K odd)."""
    identity = identity_kernel(
        bn.num_features, kernel_size, groups=groups, dtype=dtype, device=device
    )
    return fold_bn_module(identity, None, bn)


def make_conv(
    kernel: Tensor,
    bias: Tensor | None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> nn.Conv2d:
    """A ``nn.Conv2d`` holding ``kernel``/``bias``, in their dtype and on their device.

    Keyword arguments throughout: a published fuse routine passed padding into the stride
    slot positionally.
    """
    out_channels, in_per_group, kh, kw = kernel.shape
    conv = nn.Conv2d(
        in_channels=in_per_group * groups,
        out_channels=out_channels,
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
        padding_mode=padding_mode,
        device=kernel.device,
        dtype=kernel.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def fold_bn_into_conv(conv: nn.Module, bn: _BatchNorm) -> None:
    """Fold ``bn`` into ``conv`` in place (adds a bias parameter when the conv had none)."""
    kernel, bias = conv_bn_kernel(conv, bn)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias)
        else:
            conv.bias.copy_(bias)


def fuse_conv_bn_eval(conv: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A new conv equal to ``bn(conv(x))`` in eval mode; the inputs are left untouched."""
    if conv.training or bn.training:
        raise FusionError("fuse_conv_bn_eval needs both modules in eval mode (call .eval())")
    fused = copy.deepcopy(conv)
    fold_bn_into_conv(fused, bn)
    return fused
