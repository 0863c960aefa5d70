"""RepVGG's block (Ding et al., CVPR 2021).

Training form: y = ReLU(SE(BN_d(W_d ⋆ x) + BN_1(W_1 ⋆ x) + BN_id(x))) with a KxK kernel W_d, a
1x1 kernel W_1, an identity branch where the shapes allow it, and an optional
squeeze-excitation SE. The three branches are linear, so the deploy form is one KxK conv
(https://arxiv.org/abs/2101.03697, Sec. 3.3):

    W = W_d' + centre(W_1') + centre(I'),   b = b_d' + b_1' + b_id'

where ' marks BN-folded kernels and I is the identity kernel (built in the weight's dtype
and on its device). SE and ReLU act on the sum, so they stay after the fused conv.

Alignment: with padding p and dilation d the KxK conv reads its centre tap at offset
d·(K//2) − p, so the 1x1 branch is padded p − d·(K//2); when that is negative the 1x1
branch's input is cropped by d·(K//2) − p instead, as ACBlock does. The identity branch
exists only when in_channels == out_channels, stride == 1 and p == d·(K//2) (otherwise the
output has another shape than the input). Dilation is kept in the fused conv; the published
code drops it.

Low-precision models (bfloat16, float16) are fused in float32 and rounded once, so the
deploy conv keeps the model's dtype.

State-dict keys follow the published ``repvgg.py``: rbr_dense.{conv,bn}, rbr_1x1.{conv,bn},
rbr_identity (a BatchNorm2d, absent when the shapes do not allow it), se.{down,up} with
``use_se``; rbr_reparam in deploy form.
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
from reparam.fusion import add_branches, centre_kernel, centred_padding
from reparam.module_fusion import conv_bn_kernel, identity_bn_kernel

__all__ = ["SE_POOLS", "RepVGGBlock", "SEBlock"]


SE_POOLS = ("global", "window")


class SEBlock(nn.Module):
    """Squeeze-excitation as in RepVGG: x·sigmoid(up(ReLU(down(pool(x))))).

    ``pool="global"`` (default) averages over both spatial axes, whatever their sizes.
    ``pool="window"`` is the published block's ``avg_pool2d(x, kernel_size=W)``: W×W windows
    at stride W, the same on square maps; on an H×W map with W < H ≤ 2W−1 it averages the
    first W rows only (13×10: rows 0–9), and other shapes give torch's errors or a
    non-broadcastable scale, exactly as published. Adoption picks it for pasted copies.
    """

    def __init__(self, input_channels: int, internal_neurons: int, pool: str = "global") -> None:
        super().__init__()
        if pool not in SE_POOLS:
            raise BlockConfigError(f"SE pool must be one of {SE_POOLS}, got {pool!r}")
        self.down = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, bias=True)
        self.input_channels = input_channels
        self.pool = pool

    def forward(self, inputs: Tensor) -> Tensor:
        if self.pool == "window":
            pooled = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        else:
            pooled = inputs.mean((2, 3), keepdim=True)
        scale = self.up(torch.relu(self.down(pooled)))
        return inputs * torch.sigmoid(scale)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}" if self.pool != "global" else ""


class RepVGGBlock(ReparamBlock):
    """KxK conv-BN + 1x1 conv-BN + BN identity, summed, then SE (optional) and ReLU.

    Fuses into one KxK conv followed by the SE and the ReLU.

    Args:
        in_channels, out_channels: channel counts (divisible by ``groups``).
        kernel_size: odd K.
        stride, dilation, groups: as for ``nn.Conv2d``, shared by all branches.
        padding: the KxK conv's padding; None means dilation·(K//2) ("same" at stride 1).
            A smaller padding crops the 1x1 branch's input and drops the identity branch.
        deploy: build the fused conv directly (to load fused checkpoints).
        use_se: squeeze-excitation on the summed branches, before the ReLU, with
            max(1, out_channels // 16) hidden channels (the published code has
            out_channels // 16, which is 0 below 16 channels).
        se_pool: ``"global"`` (mean over H and W) or ``"window"`` (the published
            ``avg_pool2d(kernel_size=W)``, set when a pasted copy is adopted); see
            :class:`SEBlock`.
        use_identity: build the identity BN branch where the shapes allow it (False for
            layouts that make it optional, e.g. ultralytics' RepConv with ``bn=False``).
    """

    deploy_conv_name = "rbr_reparam"
    branch_names = ("rbr_dense", "rbr_1x1", "rbr_identity", "crop_1x1")

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
        use_se: bool = False,
        se_pool: str = "global",
        use_identity: bool = True,
    ) -> None:
        super().__init__()
        check_branch_geometry(
            "RepVGGBlock", in_channels, out_channels, kernel_size, groups,
            "its 1x1 and identity branches align on the centre tap",
        )  # fmt: skip
        padding = resolve_padding(padding, kernel_size, dilation)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.deploy = deploy

        self.nonlinearity = nn.ReLU()
        if se_pool not in SE_POOLS:
            raise BlockConfigError(
                f"RepVGGBlock: se_pool must be one of {SE_POOLS}, got {se_pool!r}"
            )
        self.se = (
            SEBlock(out_channels, max(1, out_channels // 16), pool=se_pool)
            if use_se
            else nn.Identity()
        )

        if deploy:
            self.rbr_reparam = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=True,
            )  # fmt: skip
            return

        same = padding == dilation * (kernel_size // 2)
        has_identity = use_identity and in_channels == out_channels and stride == 1 and same
        self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
        shared = dict(stride=stride, dilation=dilation, groups=groups)
        self.rbr_dense = conv_bn_branch(
            in_channels, out_channels, kernel_size, padding=padding, **shared
        )
        padding_1x1 = centred_padding(padding, kernel_size, 1, dilation)
        self.crop_1x1 = max(0, -padding_1x1)
        self.rbr_1x1 = conv_bn_branch(
            in_channels, out_channels, 1, padding=max(0, padding_1x1), **shared
        )

    def forward(self, inputs: Tensor) -> Tensor:
        if self.deploy:
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        out = self.rbr_dense(inputs) + self.rbr_1x1(crop_border(inputs, self.crop_1x1))
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(inputs)
        return self.nonlinearity(self.se(out))

    def _fold_branches(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        dense = conv_bn_kernel(self.rbr_dense.conv, self.rbr_dense.bn)
        kernel_1x1, bias_1x1 = conv_bn_kernel(self.rbr_1x1.conv, self.rbr_1x1.bn)
        branches = [dense, (centre_kernel(kernel_1x1, size), bias_1x1)]
        if self.rbr_identity is not None:
            weight = self.rbr_dense.conv.weight
            branches.append(
                identity_bn_kernel(
                    self.rbr_identity,
                    self.kernel_size,
                    groups=self.groups,
                    dtype=weight.dtype,
                    device=weight.device,
                )
            )
        return add_branches(*branches)
