"""Users' own copies of the published blocks, written for the adoption tests.

Each class reproduces the attribute names and the forward function of a published block as
users paste it into their code (no published code is copied): ACNet's ACBlock
(https://github.com/DingXiaoH/ACNet), RepVGG's block (https://github.com/DingXiaoH/RepVGG),
DBB (https://github.com/DingXiaoH/DiverseBranchBlock), MobileOne
(https://github.com/apple/ml-mobileone), Involution in mmcv's ConvModule layout
(https://github.com/d-li14/involution), the DRConv2d and ASFFV5 classes YOLOv5 users paste,
and YOLOv5's Conv. A few deliberately different copies must be left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters (γ ≈ 1) in every BatchNorm, and small
    random weights in zero-initialised convs, so equivalence checks mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                if module.affine:
                    module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                    module.bias.copy_(0.2 * torch.randn(n, generator=generator))
            elif isinstance(module, IdConv1x1):
                module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=generator))
    return model


class UserConv(nn.Module):
    """YOLOv5's Conv: conv (no bias), bn, act (SiLU)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (
            nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        )

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


# ----------------------------------------------------------------------------- ACNet


class UserACBlock(nn.Module):
    """ACNet's ACBlock: square/ver/hor conv + BN, summed; input cropped when padding < K//2."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.deploy = False
        conv = dict(stride=stride, dilation=dilation, groups=groups, bias=False)
        self.square_conv = nn.Conv2d(
            c_in, c_out, (kernel_size, kernel_size), padding=padding, **conv
        )
        self.square_bn = nn.BatchNorm2d(c_out)
        if padding - kernel_size // 2 >= 0:
            self.crop = 0
            hor_padding = [padding - kernel_size // 2, padding]
            ver_padding = [padding, padding - kernel_size // 2]
        else:
            self.crop = kernel_size // 2 - padding
            hor_padding, ver_padding = [0, padding], [padding, 0]
        self.ver_conv = nn.Conv2d(c_in, c_out, (kernel_size, 1), padding=ver_padding, **conv)
        self.hor_conv = nn.Conv2d(c_in, c_out, (1, kernel_size), padding=hor_padding, **conv)
        self.ver_bn = nn.BatchNorm2d(c_out)
        self.hor_bn = nn.BatchNorm2d(c_out)

    def branch_scales(self):
        return 1.0, 1.0, 1.0

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        if self.crop > 0:
            ver_input = x[:, :, :, self.crop : -self.crop]
            hor_input = x[:, :, self.crop : -self.crop, :]
        else:
            ver_input = hor_input = x
        vertical = self.ver_bn(self.ver_conv(ver_input))
        horizontal = self.hor_bn(self.hor_conv(hor_input))
        a, b, c = self.branch_scales()
        return a * square + b * vertical + c * horizontal


class UserACBlockHalfHorizontal(UserACBlock):
    """A copy that differs: the horizontal branch counts half."""

    def branch_scales(self):
        return 1.0, 1.0, 0.5


# ----------------------------------------------------------------------------- RepVGG


def conv_bn(c_in, c_out, kernel_size, stride, padding, groups=1, dilation=1):
    branch = nn.Sequential()
    branch.add_module(
        "conv",
        nn.Conv2d(c_in, c_out, kernel_size, stride, padding, dilation, groups, bias=False),
    )
    branch.add_module("bn", nn.BatchNorm2d(c_out))
    return branch


class UserSE(nn.Module):
    """RepVGG's SE: avg-pool over a W×W window, down, ReLU, up, sigmoid."""

    def __init__(self, channels, internal):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)

    def forward(self, x):
        scale = F.avg_pool2d(x, kernel_size=x.size(3))
        return x * torch.sigmoid(self.up(F.relu(self.down(scale))))


class UserRepVGGBlock(nn.Module):
    """RepVGG's block: nonlinearity(se(dense + 1x1 + identity BN))."""

    def __init__(self, c_in, c_out, kernel_size=3, stride=1, padding=1, groups=1, use_se=False,
                 act=None, se_ratio=16):  # fmt: skip
        super().__init__()
        self.nonlinearity = nn.ReLU() if act is None else act
        self.se = UserSE(c_out, c_out // se_ratio) if use_se else nn.Identity()
        same = c_in == c_out and stride == 1
        self.rbr_identity = nn.BatchNorm2d(c_in) if same else None
        self.rbr_dense = conv_bn(c_in, c_out, kernel_size, stride, padding, groups)
        self.rbr_1x1 = conv_bn(c_in, c_out, 1, stride, padding - kernel_size // 2, groups)

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))


class UserRepVGGActPerBranch(UserRepVGGBlock):
    """A copy that differs: the activation is applied to each branch before the sum."""

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.nonlinearity(self.rbr_identity(x))
        act = self.nonlinearity
        return act(self.rbr_dense(x)) + act(self.rbr_1x1(x)) + id_out


# ----------------------------------------------------------------------------- DBB


class IdConv1x1(nn.Conv2d):
    """DBB's identity-based 1x1 conv: kernel = weight + I, the identity a plain attribute."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        identity = torch.zeros(channels, per_group, 1, 1)
        for i in range(channels):
            identity[i, i % per_group, 0, 0] = 1
        self.id_tensor = identity
        nn.init.zeros_(self.weight)

    def forward(self, x):
        kernel = self.weight + self.id_tensor.to(self.weight.device, self.weight.dtype)
        return F.conv2d(x, kernel, None, groups=self.groups)


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BN, then pad with the BN of zero (β − μγ/σ) written in place."""

    def __init__(self, pad_pixels, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x):
        out = self.bn(x)
        p = self.pad_pixels
        if p > 0:
            bn = self.bn
            values = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
                bn.running_var + bn.eps
            )
            out = F.pad(out, [p] * 4)
            values = values.view(1, -1, 1, 1)
            out[:, :, :p, :] = values
            out[:, :, -p:, :] = values
            out[:, :, :, :p] = values
            out[:, :, :, -p:] = values
        return out


class UserDBB(nn.Module):
    """DBB: KxK, 1x1, 1x1→KxK and 1x1→avg branches with BNs, summed, then nonlinear."""

    def __init__(self, c_in, c_out, kernel_size=3, stride=1, padding=1, groups=1,
                 internal=None, nonlinear=None):  # fmt: skip
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.dbb_origin = conv_bn(c_in, c_out, kernel_size, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < c_out:
            self.dbb_avg.add_module("conv", nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPad(padding, c_out))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = conv_bn(c_in, c_out, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(c_out))
        internal = (c_in if groups < c_out else 2 * c_in) if internal is None else internal
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == c_in:
            self.dbb_1x1_kxk.add_module("idconv1", IdConv1x1(c_in, groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1", nn.Conv2d(c_in, internal, 1, groups=groups, bias=False)
            )
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(padding, internal))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal, c_out, kernel_size, stride, 0, groups=groups, bias=False)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(x)
        out += self.dbb_avg(x)
        out += self.dbb_1x1_kxk(x)
        return self.nonlinear(out)


# ----------------------------------------------------------------------------- MobileOne


class UserMobileOneBlock(nn.Module):
    """MobileOne's block: activation(se(scale + skip + Σ conv branches))."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, groups=1,
                 num_conv_branches=1):  # fmt: skip
        super().__init__()
        self.inference_mode = False
        self.kernel_size, self.num_conv_branches = kernel_size, num_conv_branches
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(c_in) if c_out == c_in and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(c_in, c_out, kernel_size, stride, padding, groups)
            for _ in range(num_conv_branches)
        )
        self.rbr_scale = conv_bn(c_in, c_out, 1, stride, 0, groups) if kernel_size > 1 else None

    def forward(self, x):
        identity_out = 0 if self.rbr_skip is None else self.rbr_skip(x)
        scale_out = 0 if self.rbr_scale is None else self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return self.activation(self.se(out))


# ----------------------------------------------------------------------------- Involution


class ConvModuleLike(nn.Module):
    """mmcv's ConvModule keys: conv, optional bn, optional activate (ReLU)."""

    def __init__(self, c_in, c_out, bn=True, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=not bn)
        if bn:
            self.bn = nn.BatchNorm2d(c_out)
        self.activate = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class UserInvolution(nn.Module):
    """Involution in mmcv's layout, computed with unfold."""

    def __init__(self, channels, kernel_size, stride):
        super().__init__()
        self.kernel_size, self.stride, self.channels = kernel_size, stride, channels
        self.group_channels = 16
        self.groups = channels // self.group_channels
        self.conv1 = ConvModuleLike(channels, channels // 4)
        self.conv2 = ConvModuleLike(
            channels // 4, kernel_size**2 * self.groups, bn=False, relu=False
        )
        if stride > 1:
            self.avgpool = nn.AvgPool2d(stride, stride)
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        weight = self.conv2(self.conv1(x if self.stride == 1 else self.avgpool(x)))
        b, _, h, w = weight.shape
        k2 = self.kernel_size**2
        weight = weight.view(b, self.groups, k2, h, w).unsqueeze(2)
        out = self.unfold(x).view(b, self.groups, self.group_channels, k2, h, w)
        return (weight * out).sum(dim=3).view(b, self.channels, h, w)


class UserInvolutionV5(nn.Module):
    """Involution in the YOLOv5 layout: cv1 = Conv (conv, bn, SiLU), cv2 = Conv2d with bias."""

    def __init__(self, ch, k, s):
        super().__init__()
        self.gch, self.nk, self.stride, self.c1 = 16, k * k, s, ch
        self.groups = ch // self.gch
        self.cv1 = UserConv(ch, ch // 4, 1)
        self.cv2 = nn.Conv2d(ch // 4, k * k * self.groups, 1)
        if s > 1:
            self.avgpool = nn.AvgPool2d(s, s)
        self.unfold = nn.Unfold(k, 1, (k - 1) // 2, s)

    def forward(self, x):
        weight = self.cv2(self.cv1(x if self.stride == 1 else self.avgpool(x)))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.groups, 1, self.nk, h, w)
        x = self.unfold(x).view(b, self.groups, self.gch, self.nk, h, w)
        return (weight * x).sum(3).view(b, self.c1, h, w)


# ----------------------------------------------------------------------------- DRConv


class UserDRConv2d(nn.Module):
    """DRConv2d as YOLOv5 users paste it: per-sample kernels by a grouped conv, then the
    output of the region whose guide value is largest."""

    def __init__(self, c_in, c_out, kernel_size, region_num=8, **kwargs):
        super().__init__()
        self.region_num = region_num
        self.conv_kernel = nn.Sequential(
            nn.AdaptiveAvgPool2d((kernel_size, kernel_size)),
            nn.Conv2d(c_in, region_num * region_num, kernel_size=1),
            nn.Sigmoid(),
            nn.Conv2d(region_num * region_num, region_num * c_in * c_out, 1, groups=region_num),
        )
        self.conv_guide = nn.Conv2d(c_in, region_num, kernel_size=kernel_size, **kwargs)
        self.kwargs = kwargs

    def forward(self, x):
        kernel = self.conv_kernel(x)
        b, c = x.shape[:2]
        kernel = kernel.view(-1, c, kernel.size(2), kernel.size(3))
        out = F.conv2d(x.view(1, -1, x.size(2), x.size(3)), kernel, groups=b, **self.kwargs)
        out = out.view(b, self.region_num, -1, out.size(2), out.size(3))
        guide = self.conv_guide(x)
        mask = torch.zeros_like(guide).scatter_(1, guide.argmax(dim=1, keepdim=True), 1)
        return torch.sum(out * mask.unsqueeze(2), dim=1)


# ----------------------------------------------------------------------------- ASFF


class UserASFF(nn.Module):
    """YOLOv5's ASFFV5 with the level widths given (the published 1024/512/256 · m)."""

    def __init__(self, level, dims=(64, 32, 16), rfb=False, vis=False):
        super().__init__()
        self.level, self.dim, self.vis = level, list(dims), vis
        self.inter_dim = inter = dims[level]
        if level == 0:
            self.stride_level_1 = UserConv(dims[1], inter, 3, 2)
            self.stride_level_2 = UserConv(dims[2], inter, 3, 2)
        elif level == 1:
            self.compress_level_0 = UserConv(dims[0], inter, 1, 1)
            self.stride_level_2 = UserConv(dims[2], inter, 3, 2)
        else:
            self.compress_level_0 = UserConv(dims[0], inter, 1, 1)
            self.compress_level_1 = UserConv(dims[1], inter, 1, 1)
        self.expand = UserConv(inter, dims[level], 3, 1)
        compress_c = 8 if rfb else 16
        self.weight_level_0 = UserConv(inter, compress_c, 1, 1)
        self.weight_level_1 = UserConv(inter, compress_c, 1, 1)
        self.weight_level_2 = UserConv(inter, compress_c, 1, 1)
        self.weight_levels = UserConv(compress_c * 3, 3, 1, 1)

    def forward(self, x):
        x0, x1, x2 = x[2], x[1], x[0]
        if self.level == 0:
            r0 = x0
            r1 = self.stride_level_1(x1)
            r2 = self.stride_level_2(F.max_pool2d(x2, 3, stride=2, padding=1))
        elif self.level == 1:
            r0 = F.interpolate(self.compress_level_0(x0), scale_factor=2, mode="nearest")
            r1, r2 = x1, self.stride_level_2(x2)
        else:
            r0 = F.interpolate(self.compress_level_0(x0), scale_factor=4, mode="nearest")
            r1 = F.interpolate(self.compress_level_1(x1), scale_factor=2, mode="nearest")
            r2 = x2
        weights = torch.cat(
            (self.weight_level_0(r0), self.weight_level_1(r1), self.weight_level_2(r2)), 1
        )
        weights = F.softmax(self.weight_levels(weights), dim=1)
        fused = r0 * weights[:, 0:1] + r1 * weights[:, 1:2] + r2 * weights[:, 2:]
        out = self.expand(fused)
        return (out, weights, fused.sum(dim=1)) if self.vis else out


# ----------------------------------------------------------------------------- look-alikes


class UserTwoBranch(nn.Module):
    """Unknown names, but a sum of two conv-BN branches of one input."""

    def __init__(self, c):
        super().__init__()
        self.left = conv_bn(c, c, 3, 1, 1)
        self.right = conv_bn(c, c, 1, 1, 0)

    def forward(self, x):
        return self.left(x) + self.right(x)


class UserResidual(nn.Module):
    """A ResNet basic block: not a linear multi-branch block."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = conv_bn(c, c, 1, 1, 0)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.downsample(x))


class UserOwnDeploy(nn.Module):
    """A block with its own switch_to_deploy and a layout reparam does not know."""

    def __init__(self, c):
        super().__init__()
        self.main = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.main(x)

    def switch_to_deploy(self):
        pass


class UserPartialACBlock(nn.Module):
    """ACNet's square and vertical branches only: part of a layout."""

    def __init__(self, c):
        super().__init__()
        self.square_conv, self.square_bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.ver_conv, self.ver_bn = nn.Conv2d(c, c, (3, 1), padding=(1, 0)), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.square_bn(self.square_conv(x)) + self.ver_bn(self.ver_conv(x))


class UserRepVGGWithBrokenDeploy(UserRepVGGBlock):
    """A RepVGG copy whose own switch_to_deploy cannot be trusted (as published code that
    drops dilation or mishandles bfloat16): adoption must win over it."""

    def switch_to_deploy(self):
        raise AssertionError("the copy's own switch_to_deploy must not be called")
