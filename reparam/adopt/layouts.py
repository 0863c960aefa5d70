"""The published layouts reparam adopts, and the builders that read a copy's configuration.

Each :class:`Layout` names a published block, the attribute names that identify a user's
copy of it, a builder that reads the copy's submodules (convolution geometry, activation,
SE, branch counts) and returns the matching reparam block (configured, weights not loaded),
and a probe that makes the input(s) the equivalence check runs on. :data:`LAYOUTS` lists
them in matching order; :data:`LAYOUT_ATTRIBUTES` holds the names that mark a module as
(part of) one of them. Block classes are imported from their own modules inside the
builders, because ``reparam.blocks`` imports :mod:`reparam.adopt`.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from torch import nn

from reparam.adopt.parts import (
    Layout,
    Probe,
    activation_of,
    child,
    has_se,
    image_probes,
    kxk_probes,
    probe_generator,
)
from reparam.adopt.parts import (
    geometry as conv_geometry,
)
from reparam.adopt.yolo import YOLO_LAYOUTS
from reparam.errors import FusionError

__all__ = ["LAYOUTS", "LAYOUT_ATTRIBUTES", "Layout", "has_se"]

# --------------------------------------------------------------------------- layouts


def _build_acb(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.acb import ACBlock

    square = child(foreign, "square_conv", nn.Conv2d)
    ver = child(foreign, "ver_conv", nn.Conv2d)
    hor = child(foreign, "hor_conv", nn.Conv2d)
    geometry = conv_geometry(square, "square_conv")
    k = geometry["kernel_size"]
    if tuple(ver.kernel_size) != (k, 1) or tuple(hor.kernel_size) != (1, k):
        raise FusionError(
            f"ver_conv/hor_conv kernels {tuple(ver.kernel_size)}/{tuple(hor.kernel_size)} are "
            f"not ({k}, 1)/(1, {k})"
        )
    square_bn = child(foreign, "square_bn", nn.BatchNorm2d)
    return ACBlock(
        **geometry,
        padding_mode=square.padding_mode,
        use_affine=square_bn.affine,
        bias=square.bias is not None,
    )


def _build_repvgg(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.repvgg import RepVGGBlock

    geometry = conv_geometry(child(foreign, "rbr_dense.conv", nn.Conv2d), "rbr_dense.conv")
    identity = getattr(foreign, "rbr_identity", None) is not None
    act = activation_of(foreign, "nonlinearity")
    # The published SE pools a W×W window, reparam's the whole map by default: try the
    # published pool first, then the global one (a copy may have changed it).
    pools = ("window", "global") if has_se(foreign) else ("global",)
    candidates = []
    for pool in pools:
        block = RepVGGBlock(**geometry, use_se=has_se(foreign), se_pool=pool, use_identity=identity)
        if act is not None:
            block.nonlinearity = copy.deepcopy(act)
        candidates.append(block)
    return candidates


def _build_dbb(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.dbb import DiverseBranchBlock

    geometry = conv_geometry(child(foreign, "dbb_origin.conv", nn.Conv2d), "dbb_origin.conv")
    conv2 = child(foreign, "dbb_1x1_kxk.conv2", nn.Conv2d)
    return DiverseBranchBlock(
        **geometry,
        internal_channels_1x1_3x3=conv2.in_channels,
        nonlinear=activation_of(foreign, "nonlinear"),
    )


def _build_mobileone(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.mobileone import MobileOneBlock

    branches = child(foreign, "rbr_conv", nn.ModuleList)
    scale = getattr(foreign, "rbr_scale", None)
    if len(branches):
        geometry = conv_geometry(child(foreign, "rbr_conv.0.conv", nn.Conv2d), "rbr_conv.0.conv")
    elif isinstance(scale, nn.Module):
        geometry = conv_geometry(child(foreign, "rbr_scale.conv", nn.Conv2d), "rbr_scale.conv")
        geometry["kernel_size"] = int(getattr(foreign, "kernel_size", 1))
        geometry["padding"] = int(getattr(foreign, "padding", geometry["kernel_size"] // 2))
    else:
        raise FusionError("has neither rbr_conv branches nor rbr_scale")
    block = MobileOneBlock(**geometry, num_conv_branches=len(branches), use_se=has_se(foreign))
    act = activation_of(foreign, "activation")
    if act is not None:
        block.activation = act
    return block


def _probe_mobileone(foreign: nn.Module) -> list[Probe]:
    path = "rbr_conv.0.conv" if len(foreign.rbr_conv) else "rbr_scale.conv"
    return kxk_probes(path)(foreign)


def _involution_args(foreign: nn.Module, reduce_path: str, span_path: str) -> dict:
    reduce = child(foreign, reduce_path, nn.Conv2d)
    span = child(foreign, span_path, nn.Conv2d)
    channels = reduce.in_channels
    group_channels = int(getattr(foreign, "group_channels", getattr(foreign, "gch", 16)))
    groups = channels // group_channels if group_channels else 0
    if groups < 1 or span.out_channels % groups:
        raise FusionError(
            f"cannot read the kernel size: {span_path} has {span.out_channels} outputs"
        )
    kernel_size = math.isqrt(span.out_channels // groups)
    if kernel_size * kernel_size * groups != span.out_channels:
        raise FusionError(f"{span_path} outputs ({span.out_channels}) are not K²·groups")
    return {
        "channels": channels,
        "kernel_size": int(getattr(foreign, "kernel_size", kernel_size)),
        "stride": int(getattr(foreign, "stride", 1)),
        "group_channels": group_channels,
        "reduction_ratio": channels // reduce.out_channels,
    }


def _build_involution_mmcv(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.involution import Involution

    return Involution(**_involution_args(foreign, "conv1.conv", "conv2.conv"))


def _involution_has_yolov5_layout() -> bool:
    from reparam.blocks.involution import Involution

    return "layout" in inspect.signature(Involution.__init__).parameters


def _build_involution_yolov5(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.involution import Involution

    if not _involution_has_yolov5_layout():
        raise FusionError("reparam's Involution has no YOLOv5 (cv1/cv2) layout in this version")
    return Involution(**_involution_args(foreign, "cv1.conv", "cv2"), layout="yolov5")


def _probe_involution(foreign: nn.Module) -> list[Probe]:
    reduce = foreign.conv1.conv if hasattr(foreign, "conv1") else foreign.cv1.conv
    stride = int(getattr(foreign, "stride", 1))
    return image_probes(reduce.in_channels, int(getattr(foreign, "kernel_size", 3)), stride)


def _build_drconv(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.drconv import DRConv2d

    guide = child(foreign, "conv_guide", nn.Conv2d)
    generator = child(foreign, "conv_kernel.3", nn.Conv2d)
    geometry = conv_geometry(guide, "conv_guide")
    regions, in_channels = geometry["out_channels"], geometry["in_channels"]
    if geometry["groups"] != 1 or generator.out_channels % (regions * in_channels):
        raise FusionError("conv_guide / conv_kernel shapes do not match the DRConv layout")
    return DRConv2d(
        in_channels,
        generator.out_channels // (regions * in_channels),
        geometry["kernel_size"],
        region_num=regions,
        stride=geometry["stride"],
        padding=geometry["padding"],
        dilation=geometry["dilation"],
    )


def _asff_widths(foreign: nn.Module) -> tuple[int, int, tuple[int, int, int]]:
    """(level, inter_dim, level widths (c0, c1, c2)) read off an ASFFV5 copy."""
    conv = lambda name: child(foreign, f"{name}.conv", nn.Conv2d)  # noqa: E731
    inter = conv("weight_level_0").in_channels
    if hasattr(foreign, "stride_level_1"):
        level, widths = 0, (inter, conv("stride_level_1").in_channels, 0)
        widths = (*widths[:2], conv("stride_level_2").in_channels)
    elif hasattr(foreign, "stride_level_2"):
        level = 1
        widths = (conv("compress_level_0").in_channels, inter, conv("stride_level_2").in_channels)
    elif hasattr(foreign, "compress_level_1"):
        level = 2
        widths = (conv("compress_level_0").in_channels, conv("compress_level_1").in_channels, inter)
    else:
        raise FusionError("has none of stride_level_1, stride_level_2, compress_level_1")
    return level, inter, widths


def _build_asff(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.asff import ASFF

    level, _, widths = _asff_widths(foreign)
    compress = child(foreign, "weight_level_0.conv", nn.Conv2d).out_channels
    if compress not in (8, 16):
        raise FusionError(f"weight_level_0 has {compress} outputs; ASFF uses 16 (or 8 with rfb)")
    act = getattr(foreign.weight_levels, "act", None)
    act = True if act is None or isinstance(act, nn.SiLU) else copy.deepcopy(act)
    return ASFF(
        level,
        rfb=compress == 8,
        vis=bool(getattr(foreign, "vis", False)),
        channels=widths,
        act=act,
    )


def _probe_asff(foreign: nn.Module) -> list[Probe]:
    """Levels at 16/8/4 and 32/16/8 px (the level sizes must halve exactly), batch 2 and 1,
    scales 1, 1e2, 1e-2."""
    _, _, (c0, c1, c2) = _asff_widths(foreign)
    generator = probe_generator()
    probes = []
    for size, batch, scale in ((16, 2, 1.0), (32, 1, 1e2), (16, 1, 1e-2), (32, 2, 1.0)):
        levels = [
            torch.randn(batch, c, s, s, generator=generator, dtype=torch.float64) * scale
            for c, s in ((c2, size), (c1, size // 2), (c0, size // 4))
        ]
        probes.append(Probe((levels,), f"levels {size}/{size // 2}/{size // 4} px, batch "
                            f"{batch}, scale {scale:g}"))  # fmt: skip
    return probes


LAYOUTS: tuple[Layout, ...] = (
    # Before RepVGG's: they share rbr_dense/rbr_1x1 and are told apart by `accepts`.
    *YOLO_LAYOUTS,
    Layout(
        "ACNet ACBlock",
        "ACBlock",
        ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"),
        _build_acb,
        kxk_probes("square_conv"),
    ),
    Layout(
        "RepVGG block",
        "RepVGGBlock",
        ("rbr_dense", "rbr_1x1"),
        _build_repvgg,
        kxk_probes("rbr_dense.conv"),
    ),
    Layout(
        "Diverse Branch Block",
        "DiverseBranchBlock",
        ("dbb_origin", "dbb_1x1_kxk", "dbb_avg"),
        _build_dbb,
        kxk_probes("dbb_origin.conv"),
    ),
    Layout(
        "MobileOne block",
        "MobileOneBlock",
        ("rbr_conv", "rbr_scale", "rbr_skip"),
        _build_mobileone,
        _probe_mobileone,
    ),
    Layout(
        "mmcv Involution",
        "Involution",
        ("conv1", "conv2", "unfold"),
        _build_involution_mmcv,
        _probe_involution,
    ),
    Layout(
        "YOLOv5 Involution",
        "Involution",
        ("cv1", "cv2", "unfold"),
        _build_involution_yolov5,
        _probe_involution,
    ),
    Layout(
        "DRConv", "DRConv2d", ("conv_kernel", "conv_guide"), _build_drconv, kxk_probes("conv_guide")
    ),
    Layout(
        "YOLOv5 ASFF",
        "ASFF",
        ("weight_level_0", "weight_level_1", "weight_level_2", "weight_levels", "expand"),
        _build_asff,
        _probe_asff,
    ),
)

# Attribute names that mark a module as (a copy of) one of the blocks above. A module having
# some but not all of a layout's names is reported, never silently passed over.
LAYOUT_ATTRIBUTES: frozenset[str] = frozenset(
    {name for layout in LAYOUTS for name in layout.required}
    - {"conv1", "conv2", "unfold", "cv1", "cv2", "expand", "bn", "act"}  # too common alone
) | {"dbb_1x1", "rbr_identity"}
