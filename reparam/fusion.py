"""Fusion identities: pure tensor functions that return ``(kernel, bias)``.

Every function here is exact in eval mode (to float rounding) and keeps the dtype and
device of its inputs. Arithmetic runs in at least float32, so bfloat16/float16 models are
fused in float32 and only rounded once, at the end.

Notation: a conv kernel ``W`` has shape (O, I/g, kh, kw) and bias ``b`` (O,); a BatchNorm has
running mean μ, running variance v, eps ε, weight γ and bias β; σ = sqrt(v + ε).

Identities (ACNet, https://arxiv.org/abs/1908.03930; RepVGG, https://arxiv.org/abs/2101.03697;
DBB, https://arxiv.org/abs/2103.13425):

- BN into conv:          W' = W·γ/σ (per output channel),  b' = β + (b − μ)·γ/σ
- BN1d into Linear:      W' = diag(γ/σ)·W,  b' = β + (b − μ)·γ/σ  (W of shape (O, I))
- parallel branches:     W = Σ W_i,  b = Σ b_i  (same stride and output alignment)
- small kernel in KxK:   zero-pad the kernel around its centre; the branch's conv padding
                         must be p − d·(K//2 − k//2) (see :func:`centred_padding`)
- identity:              W[c, c mod (I/g), K//2, K//2] = 1
- grouped → dense:       W_dense[o, g·cig:(g+1)·cig] = W_g[o] for o in group g
- 1x1 then KxK:          W = conv2d(W2, W1ᵀ) per group,  b = Σ_chw W2[o,c,h,w]·b1[c] + b2
- average pooling:       W[c, c mod (C/g)] = 1/K²  (count_include_pad=True only)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reparam.errors import FusionError

__all__ = [
    "add_branches",
    "avgpool_kernel",
    "centre_kernel",
    "centred_padding",
    "fold_batchnorm",
    "fold_linear_batchnorm",
    "grouped_to_dense",
    "identity_kernel",
    "merge_1x1_kxk",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fusion arithmetic runs in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _fit(tensor: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """``tensor`` (computed in at least float32) cast to ``dtype``, refusing values that are
    not finite or that ``dtype`` cannot hold: a kernel silently rounded to inf or NaN would
    change every output it touches."""
    if tensor.is_floating_point() and tensor.numel():
        low, high = (float(v) for v in torch.aminmax(tensor))  # one pass; NaN propagates
        largest = torch.finfo(dtype).max
        if not (math.isfinite(low) and math.isfinite(high)):
            raise FusionError(f"the folded {what} is not finite (inf or NaN)")
        if max(-low, high) > largest:
            raise FusionError(
                f"the folded {what} reaches {max(-low, high):.4g}, beyond the largest "
                f"{dtype} ({largest:.4g})"
            )
    return tensor.to(dtype)


def _check_variance(variance: Tensor, eps: float) -> None:
    """Refuse v + ε ≤ 0, naming the cause: σ = sqrt(v + ε) would be NaN (negative) or 0
    (division by zero). A negative running_var is corrupt statistics, not a zero variance."""
    if not variance.numel():
        return
    smallest = float(variance.min())
    if smallest < 0:
        channel = int(variance.argmin())
        raise FusionError(
            f"running_var is negative ({smallest:.4g} at channel {channel}): a variance cannot "
            "be below 0, so the BatchNorm's statistics are corrupt; recompute them "
            "(e.g. re-run the training-mode forward on data) or reload the checkpoint"
        )
    if smallest + eps <= 0:
        channel = int(variance.argmin())
        raise FusionError(
            f"running_var + eps is 0 at channel {channel} (running_var 0 with eps={eps:g}): "
            "the BatchNorm divides by zero; give it a positive eps"
        )


def fold_batchnorm(
    kernel: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias.

    W' = W·γ/σ per output channel and b' = β + (b − μ)·γ/σ with σ = sqrt(v + ε).
    The conv's own bias ``b`` is included (a missing bias counts as zero); ``gamma=None`` and
    ``beta=None`` mean an ``affine=False`` BatchNorm (γ = 1, β = 0).

    Args:
        kernel: conv weight, (O, I/g, kh, kw); for a transposed conv (I, O/g, kh, kw).
        bias: conv bias (O,) or None.
        running_mean, running_var, eps: the BatchNorm's running statistics.
        gamma, beta: the BatchNorm's affine parameters, or None when ``affine=False``.
        transposed: the kernel belongs to a ConvTranspose; the scale then goes on axis 1 of
            each group's slice.
        groups: the conv's groups (only used when ``transposed``).

    Returns:
        The folded ``(kernel, bias)`` in the kernel's dtype and device.

    Raises:
        FusionError: a running variance is negative (corrupt statistics) or v + ε is 0, or
            the folded values are not finite or do not fit the kernel's dtype (e.g. above
            65504 for float16). The arithmetic runs in at least float32, so the check sees
            the true values before rounding.
    """
    out_dtype, device = kernel.dtype, kernel.device
    dtype = _compute_dtype(out_dtype)
    named = {"the conv's weight": kernel, "the conv's bias": bias, "running_mean": running_mean,
             "running_var": running_var, "the BatchNorm's weight": gamma,
             "the BatchNorm's bias": beta}  # fmt: skip
    for what, value in named.items():  # blame the input, not the fold (NaN in, NaN out)
        if value is not None and value.numel() and not bool(torch.isfinite(value).all()):
            raise FusionError(
                f"{what} holds inf or NaN already (the weights given, not the fold): "
                "load finite weights"
            )
    mean = running_mean.to(device, dtype)
    variance = running_var.to(device, dtype)
    _check_variance(variance, eps)
    std = torch.sqrt(variance + eps)
    scale = (gamma.to(device, dtype) if gamma is not None else torch.ones_like(mean)) / std
    shift = beta.to(device, dtype) if beta is not None else torch.zeros_like(mean)
    conv_bias = bias.to(device, dtype) if bias is not None else torch.zeros_like(mean)

    weight = kernel.to(dtype)
    if transposed:
        in_channels, out_per_group = weight.shape[:2]
        grouped = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
        scale_view = scale.reshape(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        weight = (grouped * scale_view).reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_bias = shift + (conv_bias - mean) * scale
    return _fit(weight, out_dtype, "kernel"), _fit(fused_bias, out_dtype, "bias")


def fold_linear_batchnorm(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm1d that follows a Linear layer (2-D input) into it.

    BN(Wx + b) = γ·(Wx + b − μ)/σ + β = (diag(γ/σ)·W)·x + β + (b − μ)·γ/σ, so
    W' = W·γ/σ per row (output feature) and b' = β + (b − μ)·γ/σ: the conv identity with a
    kernel of no spatial dimensions. Valid only when the BatchNorm normalises the Linear's
    output features, i.e. the Linear's output is (N, O).

    Returns:
        The folded ``(weight, bias)`` in the weight's dtype and device.
    """
    return fold_batchnorm(weight, bias, running_mean, running_var, eps, gamma, beta)


def centre_kernel(kernel: Tensor, size: int | Sequence[int]) -> Tensor:
    """Zero-pad a (…, kh, kw) kernel so that it sits centred in a (KH, KW) kernel.

    Both the kernel and the target must have odd sizes: an even kernel has no centre tap to
    align with. The conv that used the small kernel must have had padding
    :func:`centred_padding` for the result to be exact.
    """
    kh, kw = kernel.shape[-2:]
    target_h, target_w = (size, size) if isinstance(size, int) else tuple(size)
    for name, small, big in (("height", kh, target_h), ("width", kw, target_w)):
        if small % 2 == 0 or big % 2 == 0:
            raise FusionError(
                f"cannot centre a {kh}x{kw} kernel in {target_h}x{target_w}: "
                f"kernel {name} must be odd on both sides to have a centre tap"
            )
        if small > big:
            raise FusionError(f"cannot centre a {kh}x{kw} kernel in a smaller {big}-wide kernel")
    pad_h, pad_w = (target_h - kh) // 2, (target_w - kw) // 2
    # F.pad takes the last dimension first: (W_left, W_right, H_top, H_bottom).
    return F.pad(kernel, (pad_w, pad_w, pad_h, pad_h))


def centred_padding(padding: int, kernel_size: int, branch_kernel_size: int, dilation: int) -> int:
    """Padding a branch with a smaller odd kernel needs so its centre tap aligns with a KxK.

    A KxK conv with padding p and dilation d reads the input at offset d·(K//2) − p from each
    output position's anchor; a k-wide branch must read its centre there too, which gives
    p_branch = p − d·(K//2 − k//2). A negative value means the branch input must be cropped.
    """
    return padding - dilation * (kernel_size // 2 - branch_kernel_size // 2)


def add_branches(*branches: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Sum parallel ``(kernel, bias)`` branches: W = Σ W_i, b = Σ b_i.

    Valid only when every branch has the same stride and output-pixel alignment, which the
    caller guarantees by centring smaller kernels first.
    """
    if not branches:
        raise FusionError("add_branches needs at least one branch")
    shape = branches[0][0].shape
    for kernel, _ in branches[1:]:
        if kernel.shape != shape:
            raise FusionError(
                f"cannot add kernels of shapes {tuple(shape)} and {tuple(kernel.shape)}"
            )
    kernel, bias = branches[0][0].clone(), branches[0][1].clone()
    for other_kernel, other_bias in branches[1:]:
        kernel += other_kernel
        bias += other_bias
    return kernel, bias


def identity_kernel(
    channels: int,
    kernel_size: int = 1,
    *,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The kernel of a conv that returns its input: K[c, c mod (C/g), K//2, K//2] = 1.

    The conv must have C input and output channels, stride 1 and padding d·(K//2).
    """
    if kernel_size % 2 == 0:
        raise FusionError(f"an identity needs an odd kernel size for a centre, got {kernel_size}")
    if channels % groups:
        raise FusionError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    index = torch.arange(channels, device=kernel.device)
    kernel[index, index % per_group, kernel_size // 2, kernel_size // 2] = 1
    return kernel


def grouped_to_dense(kernel: Tensor, groups: int) -> Tensor:
    """Expand a grouped kernel (O, I/g, kh, kw) into the dense block-diagonal (O, I, kh, kw).

    W_dense[o, g·cig:(g+1)·cig] = W[o] for every output channel o of group g (cig = I/g).
    """
    out_channels, in_per_group = kernel.shape[:2]
    if out_channels % groups:
        raise FusionError(f"output channels ({out_channels}) not divisible by groups ({groups})")
    out_per_group = out_channels // groups
    dense = kernel.new_zeros(out_channels, in_per_group * groups, *kernel.shape[2:])
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = kernel[rows]
    return dense


def merge_1x1_kxk(
    kernel_1x1: Tensor,
    bias_1x1: Tensor,
    kernel_kxk: Tensor,
    bias_kxk: Tensor,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Merge a 1x1 conv followed by a KxK conv into one KxK conv (DBB's transIII).

    Per group: W = conv2d(W2, W1.permute(1, 0, 2, 3)) and b = Σ_{c,h,w} W2[o,c,h,w]·b1[c] + b2.

    Exact only if the 1x1 has stride 1 and no padding, and the intermediate feature map is
    padded with b1 (the 1x1 branch's BN-folded bias β − μγ/σ), not with zeros, before the
    KxK conv: the fused conv zero-pads the *input*, and a 1x1 conv maps zero input to b1.

    Args:
        kernel_1x1: (M, I/g, 1, 1), bias_1x1: (M,).
        kernel_kxk: (O, M/g, K, K), bias_kxk: (O,).
        groups: shared by both convs.
    """
    if kernel_1x1.shape[-2:] != (1, 1):
        raise FusionError(f"first kernel must be 1x1, got {tuple(kernel_1x1.shape[-2:])}")
    out_dtype = kernel_kxk.dtype
    dtype = _compute_dtype(out_dtype)
    k1, b1 = kernel_1x1.to(dtype), bias_1x1.to(dtype)
    k2, b2 = kernel_kxk.to(dtype), bias_kxk.to(dtype)
    mid, out = k1.shape[0], k2.shape[0]
    if k2.shape[1] * groups != mid:
        raise FusionError(
            f"KxK kernel expects {k2.shape[1] * groups} input channels, the 1x1 gives {mid}"
        )
    mid_g, out_g = mid // groups, out // groups
    kernels = []
    for g in range(groups):
        k1_g = k1[g * mid_g : (g + 1) * mid_g].permute(1, 0, 2, 3)  # (I/g, M/g, 1, 1)
        kernels.append(F.conv2d(k2[g * out_g : (g + 1) * out_g], k1_g))  # (O/g, I/g, K, K)
    kernel = torch.cat(kernels)
    # Each group's KxK only sees that group's slice of b1.
    b1_per_input = b1.reshape(groups, 1, mid_g, 1, 1).expand(groups, out_g, mid_g, 1, 1)
    per_group = k2.reshape(groups, out_g, mid_g, *k2.shape[2:]) * b1_per_input
    bias = b2 + per_group.sum((2, 3, 4)).reshape(out)
    return kernel.to(out_dtype), bias.to(out_dtype)


def avgpool_kernel(
    channels: int,
    kernel_size: int,
    *,
    groups: int = 1,
    padding: int = 0,
    count_include_pad: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Average pooling as a conv kernel: W[c, c mod (C/g)] = 1/K², zero elsewhere.

    Exact only with ``count_include_pad=True`` when there is padding: otherwise border pixels
    divide by fewer than K² taps and no fixed kernel reproduces them.
    """
    if padding > 0 and not count_include_pad:
        raise FusionError(
            "average pooling with padding and count_include_pad=False divides border pixels by "
            "fewer taps; it is not a convolution (use count_include_pad=True)"
        )
    if channels % groups:
        raise FusionError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    index = torch.arange(channels, device=kernel.device)
    kernel[index, index % per_group] = 1.0 / kernel_size**2
    return kernel
