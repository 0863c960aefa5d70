"""ACNet's asymmetric convolution block (Ding et al., ICCV 2019).

Training form: y = BN_s(W_s ⋆ x) + BN_v(W_v ⋆ x) + BN_h(W_h ⋆ x) with a KxK kernel W_s, a Kx1
kernel W_v and a 1xK kernel W_h. Because convolution is additive, the deploy form is one KxK
conv: W = W_s' + centre(W_v') + centre(W_h'), b = b_s' + b_v' + b_h', where ' marks the
BN-folded kernels (https://arxiv.org/abs/1908.03930, eqs. 3–5).

Alignment: with padding p and dilation d the KxK conv reads its centre column at offset
d·(K//2) − p, so the Kx1 branch is padded (p, p − d·(K//2)) and the 1xK branch
(p − d·(K//2), p). When that is negative (p < d·(K//2)) the branch's input is cropped by
d·(K//2) − p instead, as ACNet does (its own code forgets the dilation factor).

State-dict keys follow ACNet's ``acb.py``: square_conv, square_bn, ver_conv, ver_bn,
hor_conv, hor_bn in training form; fused_conv in deploy form.
"""

from __future__ import annotations

from torch import Tensor, nn

from reparam.blocks.base import ReparamBlock, check_branch_geometry, resolve_padding
from reparam.errors import BlockConfigError
from reparam.fusion import add_branches, centre_kernel, centred_padding
from reparam.module_fusion import conv_bn_kernel

__all__ = ["ACBlock"]


class ACBlock(ReparamBlock):
    """KxK conv-BN + Kx1 conv-BN + 1xK conv-BN, summed; fuses into one KxK conv.

    Args:
        in_channels, out_channels: channel counts (divisible by ``groups``).
        kernel_size: odd K.
        stride, dilation, groups: as for ``nn.Conv2d``, shared by all branches.
        padding: the KxK conv's padding; None means dilation·(K//2) ("same" at stride 1).
        padding_mode: as for ``nn.Conv2d``.
        deploy: build the fused conv directly (to load fused checkpoints).
        use_affine: BatchNorm ``affine`` flag (ACNet's option).
        bias: give the branch convs a bias (ACNet has none; some copies do).
        reduce_gamma: initialise every BN weight to 1/3 (ACNet's option).
        gamma_init: initialise every BN weight to this value.
    """

    deploy_conv_name = "fused_conv"
    branch_names = ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn", "crop")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_affine: bool = True,
        bias: bool = False,
        reduce_gamma: bool = False,
        gamma_init: float | None = None,
    ) -> None:
        super().__init__()
        check_branch_geometry(
            "ACBlock", in_channels, out_channels, kernel_size, groups,
            "its Kx1 and 1xK branches align on the centre tap",
        )  # fmt: skip
        if reduce_gamma and gamma_init is not None:
            raise BlockConfigError("give reduce_gamma or gamma_init, not both")
        padding = resolve_padding(padding, kernel_size, dilation)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups, self.padding_mode = dilation, groups, padding_mode
        self.deploy = deploy
        shared = dict(stride=stride, dilation=dilation, groups=groups, padding_mode=padding_mode)

        if deploy:
            self.fused_conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, padding=padding, bias=True, **shared
            )
            return

        self.square_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, bias=bias, **shared
        )
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        side = centred_padding(padding, kernel_size, 1, dilation)
        self.crop = max(0, -side)
        self.ver_conv = nn.Conv2d(
            in_channels, out_channels, (kernel_size, 1), padding=(padding, max(side, 0)),
            bias=bias, **shared,
        )  # fmt: skip
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_conv = nn.Conv2d(
            in_channels, out_channels, (1, kernel_size), padding=(max(side, 0), padding),
            bias=bias, **shared,
        )  # fmt: skip
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        if use_affine and (reduce_gamma or gamma_init is not None):
            gamma = 1.0 / 3 if reduce_gamma else gamma_init
            for bn in (self.square_bn, self.ver_bn, self.hor_bn):
                nn.init.constant_(bn.weight, gamma)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.fused_conv(x)
        square = self.square_bn(self.square_conv(x))
        if self.crop > 0:
            ver_input = x[:, :, :, self.crop : -self.crop]
            hor_input = x[:, :, self.crop : -self.crop, :]
        else:
            ver_input = hor_input = x
        vertical = self.ver_bn(self.ver_conv(ver_input))
        horizontal = self.hor_bn(self.hor_conv(hor_input))
        return square + vertical + horizontal

    def _fold_branches(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        square = conv_bn_kernel(self.square_conv, self.square_bn)
        ver_kernel, ver_bias = conv_bn_kernel(self.ver_conv, self.ver_bn)
        hor_kernel, hor_bias = conv_bn_kernel(self.hor_conv, self.hor_bn)
        return add_branches(
            square,
            (centre_kernel(ver_kernel, size), ver_bias),
            (centre_kernel(hor_kernel, size), hor_bias),
        )
