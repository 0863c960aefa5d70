"""Module-level wrappers around :mod:`reparam.fusion`: read parameters off layers, build convs.

The tensor math lives in :mod:`reparam.fusion`; this module only moves tensors between
``nn.Module`` objects and those functions, and checks the preconditions that make a fold
exact (eval mode, running statistics present).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from reparam.errors import FusionError
from reparam.fusion import fold_batchnorm, fold_linear_batchnorm, identity_kernel

__all__ = [
    "conv_bn_kernel",
    "fold_bn_into_conv",
    "fold_bn_into_linear",
    "fold_bn_module",
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
    # Built on the meta device (no memory, no random init: the weights are replaced at once;
    # random init of large kernels was about a sixth of a model-wide fuse's time), then given
    # fresh Parameters holding copies of kernel and bias. torch.nn.utils.skip_init does the
    # same but its to_empty() imports sympy on first use (0.6 s).
    with torch.device("meta"):
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
            dtype=kernel.dtype,
        )
    conv.weight = nn.Parameter(kernel.detach().clone())
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def _replace_parameter(module: nn.Module, name: str, value: Tensor, requires_grad: bool) -> None:
    """Give ``module`` a new Parameter ``name`` instead of writing into the old one.

    Writing in place would also change every other module sharing that Parameter (tied
    weights), so each folded layer gets its own tensor; the trainable flag is kept.
    """
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))


def fold_bn_into_conv(conv: nn.Module, bn: _BatchNorm) -> None:
    """Fold ``bn`` into ``conv`` (adds a bias parameter when the conv had none).

    The conv gets new weight and bias Parameters (never written through: a weight shared
    with another conv stays as it was), each keeping the old parameter's ``requires_grad``.
    """
    kernel, bias = conv_bn_kernel(conv, bn)
    trainable = conv.weight.requires_grad
    _replace_parameter(conv, "weight", kernel, trainable)
    old_bias = conv.bias
    _replace_parameter(
        conv, "bias", bias, old_bias.requires_grad if old_bias is not None else trainable
    )


def fold_bn_into_linear(linear: nn.Linear, bn: _BatchNorm) -> None:
    """Fold a BatchNorm1d applied to a Linear's (N, O) output into the Linear.

    W' = W·γ/σ per output feature, b' = β + (b − μ)·γ/σ (:func:`fold_linear_batchnorm`);
    new Parameters as in :func:`fold_bn_into_conv`.
    """
    check_foldable(bn)
    weight, bias = fold_linear_batchnorm(
        linear.weight.detach(),
        linear.bias.detach() if linear.bias is not None else None,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight.detach() if bn.affine else None,
        bn.bias.detach() if bn.affine else None,
    )
    trainable = linear.weight.requires_grad
    old_bias = linear.bias
    _replace_parameter(linear, "weight", weight, trainable)
    _replace_parameter(
        linear, "bias", bias, old_bias.requires_grad if old_bias is not None else trainable
    )
