"""Diverse Branch Block (Ding et al., CVPR 2021).

Training form: the sum of four branches, then an optional nonlinearity,

    y = BN_o(W_o ⋆ x)                                   KxK            (dbb_origin)
      + BN_1(W_1 ⋆ x)                                   1x1            (dbb_1x1)
      + BN_2(W_2 ⋆ padb(BN_m(W_m ⋆ x)))                 1x1 → KxK      (dbb_1x1_kxk)
      + BN_a(avg_K(padb(BN_c(W_c ⋆ x))))                1x1 → avg-pool (dbb_avg)

All four are linear in x, so the deploy form is one KxK conv
(https://arxiv.org/abs/2103.13425, Section 3, transforms I–VI): the 1x1 branch is centred
in the KxK kernel, the 1x1 → KxK pair merges with
:func:`~reparam.fusion.merge_1x1_kxk`, the average pool becomes the kernel of
:func:`~reparam.fusion.avgpool_kernel` and merges with its 1x1 the same way.

Border padding: the fused conv zero-pads its *input*, and the 1x1 conv-BN maps a zero
input pixel to its BN-folded bias β − μγ/σ, not to zero. So the intermediate of the two
sequential branches is padded with that value (``padb``, :class:`BNAndPadLayer`) and the
KxK conv / pool after it has no padding of its own; zero padding there gives errors around
0.1 at the border.

Padding, dilation: any padding p ≥ 0 and dilation d work exactly. The 1x1 branch is padded
p − d·(K//2), or its input cropped when that is negative (as ACBlock does); the KxK conv of
the 1x1 → KxK branch is dilated; the average pool averages the K×K taps spaced by d (a
fixed depthwise conv; ``nn.AvgPool2d`` when d = 1 and p ≤ K//2). The published code asserts
p == K//2 and ignores dilation.

Depthwise case (groups == out_channels), as published: no 1x1 branch, and the average pool
reads the input directly (zero padding, ``count_include_pad=True``), so it needs
in_channels == out_channels; the 1x1 → KxK branch defaults to 2·in_channels internal
channels.

State-dict keys follow the published ``diversebranchblock.py``: dbb_origin.{conv,bn},
dbb_1x1.{conv,bn}, dbb_1x1_kxk.{idconv1 or conv1, bn1.bn, conv2, bn2},
dbb_avg.{conv, bn.bn, avgbn}; dbb_reparam in deploy form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.blocks.base import (
    ReparamBlock,
    check_branch_geometry,
    conv_bn_branch,
    crop_border,
    resolve_padding,
)
from reparam.errors import BlockConfigError
from reparam.fusion import (
    add_branches,
    avgpool_kernel,
    centre_kernel,
    centred_padding,
    identity_kernel,
    merge_1x1_kxk,
)
from reparam.module_fusion import conv_bn_kernel, fold_bn_module

__all__ = ["BNAndPadLayer", "DilatedAvgPool2d", "DiverseBranchBlock", "IdentityBasedConv1x1"]


class IdentityBasedConv1x1(nn.Conv2d):
    """A CxC 1x1 conv whose kernel is ``weight`` + identity, ``weight`` initialised to zero.

    The identity is a non-persistent buffer (it follows ``.to()`` and is not saved), so the
    state dict holds only ``weight``, as in the published code.
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, groups=groups, bias=False)
        self.register_buffer(
            "id_tensor", identity_kernel(channels, 1, groups=groups), persistent=False
        )
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> Tensor:
        return self.weight + self.id_tensor.to(self.weight.dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.conv2d(input, self.get_actual_kernel(), None, groups=self.groups)


class BNAndPadLayer(nn.Module):
    """BatchNorm, then padding by ``pad_pixels`` with the value BN gives a zero input.

    The pad value is β − μγ/σ from the running statistics (detached, as published): what
    the preceding 1x1 conv-BN outputs at a zero-padded input pixel in eval mode.
    """

    def __init__(
        self,
        pad_pixels: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
        self.pad_pixels = pad_pixels

    def pad_values(self) -> Tensor:
        """β − μγ/σ per channel: the eval-mode BN of a zero input."""
        bn = self.bn
        zero = bn.running_mean.new_zeros(1, bn.num_features)
        with torch.no_grad():
            return F.batch_norm(
                zero, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )[0]

    def forward(self, input: Tensor) -> Tensor:
        output = self.bn(input)
        pad = self.pad_pixels
        if pad <= 0:
            return output
        values = self.pad_values().to(output.dtype).reshape(1, -1, 1, 1)
        padded = F.pad(output, [pad] * 4)
        # 1 on the border, 0 inside: interior pixels get + 0·value and stay exact.
        border = F.pad(output.new_zeros(1, 1, *output.shape[-2:]), [pad] * 4, value=1.0)
        return padded + border * values


class DilatedAvgPool2d(nn.Module):
    """K×K average pooling over taps spaced by ``dilation``, zero padding counted.

    A fixed depthwise conv with kernel 1/K² (:func:`~reparam.fusion.avgpool_kernel`); with
    dilation 1 it equals ``nn.AvgPool2d(K, stride, padding, count_include_pad=True)``, which
    allows no dilation and no padding above K//2.
    """

    def __init__(self, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.dilation = padding, dilation

    def forward(self, input: Tensor) -> Tensor:
        channels = input.shape[1]
        kernel = avgpool_kernel(
            channels, self.kernel_size, groups=channels, dtype=input.dtype, device=input.device
        )
        return F.conv2d(
            input,
            kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=channels,
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}"
        )


def _avg_pool(kernel_size: int, stride: int, padding: int, dilation: int) -> nn.Module:
    if dilation == 1 and padding <= kernel_size // 2:
        return nn.AvgPool2d(kernel_size, stride=stride, padding=padding, count_include_pad=True)
    return DilatedAvgPool2d(kernel_size, stride=stride, padding=padding, dilation=dilation)


class DiverseBranchBlock(ReparamBlock):
    """KxK, 1x1, 1x1→KxK and 1x1→avg-pool branches with BNs, summed; fuses into one KxK conv.

    Args:
        in_channels, out_channels: channel counts (divisible by ``groups``).
        kernel_size: odd K.
        stride, dilation, groups: as for ``nn.Conv2d``, shared by all branches.
        padding: the KxK conv's padding; None means dilation·(K//2).
        deploy: build the fused conv directly (to load fused checkpoints).
        internal_channels_1x1_3x3: channels between the 1x1 and the KxK of the 1x1→KxK
            branch; None means in_channels, or 2·in_channels when groups == out_channels.
            Equal to in_channels, the 1x1 is identity-initialised (``idconv1``).
        nonlinear: module applied after the sum (None: identity), kept when fused.
        single_init: initialise the γ of every BN after a branch to 0 except dbb_origin's.
    """

    deploy_conv_name = "dbb_reparam"
    branch_names = ("dbb_origin", "dbb_1x1", "dbb_avg", "dbb_1x1_kxk", "crop_1x1")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        deploy: bool = False,
        internal_channels_1x1_3x3: int | None = None,
        nonlinear: nn.Module | None = None,
        single_init: bool = False,
    ) -> None:
        super().__init__()
        check_branch_geometry(
            "DiverseBranchBlock", in_channels, out_channels, kernel_size, groups,
            "its 1x1 branch aligns on the centre tap",
        )  # fmt: skip
        depthwise = groups == out_channels
        if depthwise and in_channels != out_channels:
            raise BlockConfigError(
                f"with groups == out_channels ({groups}) the average-pool branch pools the "
                f"input directly, so in_channels ({in_channels}) must equal out_channels"
            )
        padding = resolve_padding(padding, kernel_size, dilation)
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = 2 * in_channels if depthwise else in_channels
        if internal_channels_1x1_3x3 % groups:
            raise BlockConfigError(
                f"internal_channels_1x1_3x3 ({internal_channels_1x1_3x3}) must be divisible by "
                f"groups ({groups})"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear

        if deploy:
            self.dbb_reparam = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=True,
            )  # fmt: skip
            return

        self.dbb_origin = conv_bn_branch(
            in_channels, out_channels, kernel_size,
            stride=stride, padding=padding, dilation=dilation, groups=groups,
        )  # fmt: skip

        self.dbb_avg = nn.Sequential()
        self.crop_1x1 = 0
        if not depthwise:
            self.dbb_avg.add_module(
                "conv", nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
            )
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, out_channels))
            self.dbb_avg.add_module("avg", _avg_pool(kernel_size, stride, 0, dilation))
            padding_1x1 = centred_padding(padding, kernel_size, 1, dilation)
            self.crop_1x1 = max(0, -padding_1x1)
            self.dbb_1x1 = conv_bn_branch(
                in_channels, out_channels, 1,
                stride=stride, padding=max(0, padding_1x1), groups=groups,
            )  # fmt: skip
        else:
            self.dbb_avg.add_module("avg", _avg_pool(kernel_size, stride, padding, dilation))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        internal = internal_channels_1x1_3x3
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1", nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False)
            )
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module(
            "conv2",
            nn.Conv2d(
                internal, out_channels, kernel_size,
                stride=stride, dilation=dilation, groups=groups, bias=False,
            ),
        )  # fmt: skip
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

        if single_init:
            self.single_init()

    def forward(self, inputs: Tensor) -> Tensor:
        if self.deploy:
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(crop_border(inputs, self.crop_1x1))
        out = out + self.dbb_avg(inputs)
        out = out + self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    def _fold_branches(self) -> tuple[Tensor, Tensor]:
        size, groups = self.kernel_size, self.groups
        weight = self.dbb_origin.conv.weight
        branches = [conv_bn_kernel(self.dbb_origin.conv, self.dbb_origin.bn)]

        if hasattr(self, "dbb_1x1"):
            kernel_1x1, bias_1x1 = conv_bn_kernel(self.dbb_1x1.conv, self.dbb_1x1.bn)
            branches.append((centre_kernel(kernel_1x1, size), bias_1x1))

        seq = self.dbb_1x1_kxk
        if hasattr(seq, "idconv1"):
            first = fold_bn_module(seq.idconv1.get_actual_kernel().detach(), None, seq.bn1.bn)
        else:
            first = conv_bn_kernel(seq.conv1, seq.bn1.bn)
        second = conv_bn_kernel(seq.conv2, seq.bn2)
        branches.append(merge_1x1_kxk(*first, *second, groups=groups))

        avg = self.dbb_avg
        avg_groups = self.out_channels if not hasattr(avg, "conv") else groups
        pool = avgpool_kernel(
            self.out_channels, size, groups=avg_groups, dtype=weight.dtype, device=weight.device
        )
        pooled = fold_bn_module(pool, None, avg.avgbn)
        if hasattr(avg, "conv"):
            pooled = merge_1x1_kxk(*conv_bn_kernel(avg.conv, avg.bn.bn), *pooled, groups=groups)
        branches.append(pooled)

        return add_branches(*branches)

    def init_gamma(self, gamma_value: float) -> None:
        """Set the γ of the last BN of every branch to ``gamma_value``."""
        if self.deploy:
            return
        bns = [self.dbb_origin.bn, self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2]
        if hasattr(self, "dbb_1x1"):
            bns.append(self.dbb_1x1.bn)
        for bn in bns:
            nn.init.constant_(bn.weight, gamma_value)

    def single_init(self) -> None:
        """γ = 0 for every branch but dbb_origin (γ = 1): the block starts as a plain conv."""
        self.init_gamma(0.0)
        if not self.deploy:
            nn.init.constant_(self.dbb_origin.bn.weight, 1.0)
