"""MobileOne's block (Vasu et al., CVPR 2023).

Training form: y = ReLU(SE(Σ_i BN_i(W_i ⋆ x) + BN_s(W_s ⋆ x) + BN_id(x))) with N
over-parameterised KxK conv-BN branches W_i, a 1x1 "scale" conv-BN W_s (when K > 1), a BN
skip branch where the shapes allow it, and an optional squeeze-excitation SE. The branches
are linear, so the deploy form is one KxK conv (https://arxiv.org/abs/2206.04040, Sec. 3.1):

    W = Σ_i W_i' + centre(W_s') + centre(I'),   b = Σ_i b_i' + b_s' + b_id'

SE and ReLU act on the sum and stay after the fused conv.

Alignment: the 1x1 scale branch is padded p − d·(K//2), or its input cropped when that is
negative; the skip branch exists only when in_channels == out_channels, stride == 1 and
p == d·(K//2). The published code pads the scale branch with 0 and builds the KxK branches
without dilation, so it is exact only for p == K//2 and dilation 1; here dilation is kept.
Low-precision models are fused in float32 and rounded once.

State-dict keys follow apple/ml-mobileone: rbr_conv.<i>.{conv,bn}, rbr_scale.{conv,bn},
rbr_skip, se.{reduce,expand}; reparam_conv in deploy form. The deploy flag is called
``inference_mode`` there; here it is the same attribute as ``deploy``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reparam.blocks.base import (
    ReparamBlock,
    check_branch_geometry,
    conv_bn_branch,
    crop_border,
    resolve_padding,
)
from reparam.errors import BlockConfigError
from reparam.fusion import add_branches, centre_kernel, centred_padding
from reparam.module_fusion import conv_bn_kernel, identity_bn_kernel

__all__ = ["MobileOneBlock", "MobileOneSE"]


class MobileOneSE(nn.Module):
    """Squeeze-excitation as in MobileOne: x·sigmoid(expand(ReLU(reduce(mean_hw(x))))).

    ``max(1, int(C·rd_ratio))`` hidden channels (the published code has 0 below 16 channels).
    """

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = max(1, int(in_channels * rd_ratio))
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, kernel_size=1, bias=True)

    def forward(self, inputs: Tensor) -> Tensor:
        scale = self.expand(torch.relu(self.reduce(inputs.mean((2, 3), keepdim=True))))
        return inputs * torch.sigmoid(scale)


class MobileOneBlock(ReparamBlock):
    """N KxK conv-BN + 1x1 conv-BN + BN skip, summed, then SE (optional) and ReLU.

    Fuses into one KxK conv followed by the SE and the ReLU.

    Args:
        in_channels, out_channels: channel counts (divisible by ``groups``).
        kernel_size: odd K; with K = 1 there is no separate scale branch (as published).
        stride, dilation, groups: as for ``nn.Conv2d``, shared by all branches.
        padding: the KxK convs' padding; None means dilation·(K//2).
        groups: as for ``nn.Conv2d``; MobileOne uses groups == in_channels (depthwise).
        num_conv_branches: number N ≥ 0 of parallel KxK conv-BN branches.
        inference_mode: build the fused conv directly (to load fused checkpoints); the
            same flag as ``deploy``.
        use_se: squeeze-excitation on the summed branches, before the ReLU.
    """

    deploy_conv_name = "reparam_conv"
    branch_names = ("rbr_conv", "rbr_scale", "rbr_skip", "crop_scale")
    deploy_flag = "inference_mode"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
        inference_mode: bool = False,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        check_branch_geometry(
            "MobileOneBlock", in_channels, out_channels, kernel_size, groups,
            "its 1x1 and skip branches align on the centre tap",
        )  # fmt: skip
        if num_conv_branches < 0:
            raise BlockConfigError(f"num_conv_branches must be >= 0, got {num_conv_branches}")
        padding = resolve_padding(padding, kernel_size, dilation)
        same = padding == dilation * (kernel_size // 2)
        has_skip = in_channels == out_channels and stride == 1 and same
        if num_conv_branches == 0 and kernel_size == 1 and not has_skip:
            raise BlockConfigError(
                "MobileOneBlock with num_conv_branches=0 and kernel_size=1 has no branch left "
                "(the scale branch needs kernel_size > 1, the skip branch in_channels == "
                "out_channels, stride 1 and 'same' padding)"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.num_conv_branches = num_conv_branches
        self.deploy = inference_mode

        self.se = MobileOneSE(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()

        if inference_mode:
            self.reparam_conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=True,
            )  # fmt: skip
            return

        self.rbr_skip = nn.BatchNorm2d(in_channels) if has_skip else None
        self.rbr_conv = nn.ModuleList(
            self._conv_bn(kernel_size, padding, dilation) for _ in range(num_conv_branches)
        )
        self.rbr_scale = None
        self.crop_scale = 0
        if kernel_size > 1:
            padding_1x1 = centred_padding(padding, kernel_size, 1, dilation)
            self.crop_scale = max(0, -padding_1x1)
            self.rbr_scale = self._conv_bn(1, max(0, padding_1x1), 1)

    @property
    def inference_mode(self) -> bool:
        """The MobileOne name of ``deploy``."""
        return self.deploy

    @inference_mode.setter
    def inference_mode(self, value: bool) -> None:
        self.deploy = value

    def _conv_bn(self, kernel_size: int, padding: int, dilation: int) -> nn.Sequential:
        return conv_bn_branch(
            self.in_channels, self.out_channels, kernel_size,
            stride=self.stride, padding=padding, dilation=dilation, groups=self.groups,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.activation(self.se(self.reparam_conv(x)))
        outputs = [branch(x) for branch in self.rbr_conv]
        if self.rbr_scale is not None:
            outputs.append(self.rbr_scale(crop_border(x, self.crop_scale)))
        if self.rbr_skip is not None:
            outputs.append(self.rbr_skip(x))
        out = outputs[0]
        for branch_out in outputs[1:]:
            out = out + branch_out
        return self.activation(self.se(out))

    def _fold_branches(self) -> tuple[Tensor, Tensor]:
        size = self.kernel_size
        branches = [conv_bn_kernel(branch.conv, branch.bn) for branch in self.rbr_conv]
        if self.rbr_scale is not None:
            kernel, bias = conv_bn_kernel(self.rbr_scale.conv, self.rbr_scale.bn)
            branches.append((centre_kernel(kernel, size), bias))
        if self.rbr_skip is not None:
            device = self.rbr_skip.running_mean.device
            branches.append(
                identity_bn_kernel(
                    self.rbr_skip, size, groups=self.groups,
                    dtype=self.parameter_dtype(), device=device,
                )
            )  # fmt: skip
        return add_branches(*branches)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, num_conv_branches={self.num_conv_branches}, "
            f"inference_mode={self.deploy}"
        )
