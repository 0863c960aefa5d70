"""QARepVGG's block (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach",
AAAI 2023, https://arxiv.org/abs/2212.01593), as YOLOv6 ships it (``QARepVGGBlock`` in
https://github.com/meituan/YOLOv6, ``yolov6/layers/common.py``).

Training form: a KxK conv with BN, a 1x1 conv *without* BN (no bias) and an identity
*without* BN (where the shapes allow it), summed, then one BatchNorm on the sum, then ReLU:

    y = ReLU(BN_post(BN_d(W_d ⋆ x) + W_1 ⋆ x + x))

Keeping the 1x1 and identity branches free of BN is what makes the fused kernel quantize
well (the paper's Sec. 4); the BN after the sum restores training stability. All three
branches and the post-sum BN are linear, so the deploy form is one KxK conv:

    K = W_d' + centre(W_1) + centre(I),      b = b_d'
    W = K·s,   bias = β + (b − μ)·s,   s = γ/√(v + ε)   (BN_post's statistics)

where ' marks the BN_d-folded kernel. YOLOv6's 1x1 conv has no bias, so b is the dense
branch's folded bias alone (the published ``get_equivalent_kernel_bias`` returns that
``bias3x3``; its ``_fuse_extra_bn_tensor`` folds BN_post by subtracting b from μ, the same
formula); with ``bias_1x1=True`` (copies that add one) b also holds the 1x1 bias.
YOLOv6's own ``switch_to_deploy`` keeps BN_post after the fused conv for quantization-aware
training; here it is folded too (one conv), and a YOLOv6 deploy checkpoint
(``rbr_reparam`` + ``bn``) loads into the deploy form by folding ``bn`` on load.

Alignment follows :class:`~reparam.blocks.RepVGGBlock`: the 1x1 branch is padded
p − d·(K//2) (cropped when negative) and the identity exists only when in_channels ==
out_channels, stride == 1 and p == d·(K//2).

State-dict keys follow YOLOv6: rbr_dense.{conv,bn}, rbr_1x1 (a bare conv: ``rbr_1x1.weight``),
rbr_identity (an ``nn.Identity``, no keys), bn (the post-sum BN); rbr_reparam deployed.
"""

from __future__ import annotations

from torch import Tensor, nn

from reparam.blocks.base import (
    ReparamBlock,
    check_branch_geometry,
    conv_bn_branch,
    crop_border,
    resolve_padding,
)
from reparam.fusion import add_branches, centre_kernel, centred_padding, identity_kernel
from reparam.module_fusion import conv_bn_kernel, fold_bn_module

__all__ = ["QARepVGGBlock"]


class QARepVGGBlock(ReparamBlock):
    """KxK conv-BN + bare 1x1 conv + bare identity, summed, then BatchNorm and ReLU.

    Fuses into one KxK conv followed by the ReLU.

    Args:
        in_channels, out_channels: channel counts (divisible by ``groups``).
        kernel_size: odd K.
        stride, dilation, groups: as for ``nn.Conv2d``, shared by all branches.
        padding: the KxK conv's padding; None means dilation·(K//2) ("same" at stride 1).
        deploy: build the fused conv directly (to load fused checkpoints).
        bias_1x1: give the 1x1 conv a bias (YOLOv6's has none; some copies add one). It is
            added to b before BN_post is folded.
    """

    deploy_conv_name = "rbr_reparam"
    branch_names = ("rbr_dense", "rbr_1x1", "rbr_identity", "bn", "crop_1x1")

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
        bias_1x1: bool = False,
    ) -> None:
        super().__init__()
        check_branch_geometry(
            "QARepVGGBlock", in_channels, out_channels, kernel_size, groups,
            "its 1x1 and identity branches align on the centre tap",
        )  # fmt: skip
        padding = resolve_padding(padding, kernel_size, dilation)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.deploy = deploy
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()  # YOLOv6 has the attribute (SE is not implemented there)

        if deploy:
            self.rbr_reparam = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=True,
            )  # fmt: skip
            return

        shared = dict(stride=stride, dilation=dilation, groups=groups)
        self.rbr_dense = conv_bn_branch(
            in_channels, out_channels, kernel_size, padding=padding, **shared
        )
        padding_1x1 = centred_padding(padding, kernel_size, 1, dilation)
        self.crop_1x1 = max(0, -padding_1x1)
        self.rbr_1x1 = nn.Conv2d(
            in_channels, out_channels, 1, padding=max(0, padding_1x1), bias=bias_1x1, **shared
        )
        same = padding == dilation * (kernel_size // 2)
        has_identity = in_channels == out_channels and stride == 1 and same
        self.rbr_identity = nn.Identity() if has_identity else None
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.deploy:
            return self.nonlinearity(self.rbr_reparam(inputs))
        out = self.rbr_dense(inputs) + self.rbr_1x1(crop_border(inputs, self.crop_1x1))
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(out))

    def _fold_branches(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        dense_kernel, dense_bias = conv_bn_kernel(self.rbr_dense.conv, self.rbr_dense.bn)
        one, one_bias = conv_bn_kernel(self.rbr_1x1, None)  # bias 0 unless bias_1x1
        # The identity carries no bias (a zero bias keeps add_branches' shapes).
        branches = [(dense_kernel, dense_bias), (centre_kernel(one, size), one_bias)]
        if self.rbr_identity is not None:
            identity = identity_kernel(
                self.in_channels,
                self.kernel_size,
                groups=self.groups,
                dtype=dense_kernel.dtype,
                device=dense_kernel.device,
            )
            branches.append((identity, dense_bias * 0))
        kernel, bias = add_branches(*branches)
        return fold_bn_module(kernel, bias, self.bn)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # YOLOv6's switch_to_deploy keeps the post-sum BN after rbr_reparam (for QAT): fold
        # it into rbr_reparam here, so its deploy checkpoints load into the one-conv form.
        bn_keys = [key for key in state_dict if key.startswith(f"{prefix}bn.")]
        weight_key = f"{prefix}{self.deploy_conv_name}.weight"
        if self.deploy and bn_keys and weight_key in state_dict:
            self._fold_saved_bn(state_dict, prefix, bn_keys)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fold_saved_bn(self, state_dict, prefix: str, bn_keys: list[str]) -> None:
        saved = nn.BatchNorm2d(self.out_channels)
        values = {key[len(f"{prefix}bn.") :]: state_dict.pop(key) for key in bn_keys}
        saved.load_state_dict(values, strict=False)
        weight_key = f"{prefix}{self.deploy_conv_name}.weight"
        bias_key = f"{prefix}{self.deploy_conv_name}.bias"
        kernel, bias = fold_bn_module(state_dict[weight_key], state_dict.get(bias_key), saved)
        state_dict[weight_key], state_dict[bias_key] = kernel, bias
