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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reparam.errors import FusionError

__all__ = ["LAYOUTS", "LAYOUT_ATTRIBUTES", "Layout", "has_se"]

_PROBE_SEED = 20240901


@dataclass(frozen=True)
class Layout:
    """One published block layout: how to recognise, build and probe a copy of it."""

    name: str  # the published block, for notes
    target: str  # the reparam block class name
    required: tuple[str, ...]  # attributes that identify the layout (all present)
    build: Callable[[nn.Module], nn.Module]  # the reparam block, configured, not loaded
    probe: Callable[[nn.Module], tuple]  # probe input(s) for the forward check
    note: str = ""  # what the adoption changes beyond the published function, if anything


# --------------------------------------------------------------------------- helpers


def _child(module: nn.Module, path: str, kind: type[nn.Module] = nn.Module) -> nn.Module:
    """``module``'s submodule at dotted ``path``, which must be a ``kind``."""
    try:
        found = module.get_submodule(path)
    except AttributeError as error:
        raise FusionError(f"has no submodule {path!r}") from error
    if not isinstance(found, kind):
        raise FusionError(f"{path} is a {type(found).__name__}, expected {kind.__name__}")
    return found


def _single(value: int | Sequence[int], what: str) -> int:
    """The one value of a square conv parameter (kernel, stride, padding, dilation)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        raise FusionError(f"{what} is {value!r}; only numeric padding is supported")
    if len(set(value)) != 1:
        raise FusionError(f"{what} {tuple(value)} is not square")
    return int(value[0])


def _geometry(conv: nn.Conv2d, name: str) -> dict[str, int]:
    """in/out channels, square kernel, stride, padding, dilation and groups of ``conv``."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": _single(conv.kernel_size, f"{name}.kernel_size"),
        "stride": _single(conv.stride, f"{name}.stride"),
        "padding": _single(conv.padding, f"{name}.padding"),
        "dilation": _single(conv.dilation, f"{name}.dilation"),
        "groups": conv.groups,
    }


def _probe_image(channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> Tensor:
    """A random (2, C, S, S) float64 batch, S a multiple of the stride and large enough that
    border handling and the interior both show in the output."""
    size = max(12, 2 * dilation * (kernel - 1) + 6)
    size = stride * math.ceil(size / stride)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn(2, channels, size, size, generator=generator, dtype=torch.float64)


def _activation_of(foreign: nn.Module, name: str) -> nn.Module | None:
    """A copy of the copy's activation module ``name`` (users swap ReLU for SiLU)."""
    act = getattr(foreign, name, None)
    return copy.deepcopy(act) if isinstance(act, nn.Module) else None


def has_se(foreign: nn.Module) -> bool:
    se = getattr(foreign, "se", None)
    return isinstance(se, nn.Module) and not isinstance(se, nn.Identity)


# --------------------------------------------------------------------------- layouts


def _build_acb(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.acb import ACBlock

    square = _child(foreign, "square_conv", nn.Conv2d)
    ver = _child(foreign, "ver_conv", nn.Conv2d)
    hor = _child(foreign, "hor_conv", nn.Conv2d)
    geometry = _geometry(square, "square_conv")
    k = geometry["kernel_size"]
    if tuple(ver.kernel_size) != (k, 1) or tuple(hor.kernel_size) != (1, k):
        raise FusionError(
            f"ver_conv/hor_conv kernels {tuple(ver.kernel_size)}/{tuple(hor.kernel_size)} are "
            f"not ({k}, 1)/(1, {k})"
        )
    square_bn = _child(foreign, "square_bn", nn.BatchNorm2d)
    return ACBlock(
        **geometry,
        padding_mode=square.padding_mode,
        use_affine=square_bn.affine,
        bias=square.bias is not None,
    )


def _build_repvgg(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.repvgg import RepVGGBlock

    geometry = _geometry(_child(foreign, "rbr_dense.conv", nn.Conv2d), "rbr_dense.conv")
    block = RepVGGBlock(**geometry, use_se=has_se(foreign))
    act = _activation_of(foreign, "nonlinearity")
    if act is not None:
        block.nonlinearity = act
    return block


def _build_dbb(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.dbb import DiverseBranchBlock

    geometry = _geometry(_child(foreign, "dbb_origin.conv", nn.Conv2d), "dbb_origin.conv")
    conv2 = _child(foreign, "dbb_1x1_kxk.conv2", nn.Conv2d)
    return DiverseBranchBlock(
        **geometry,
        internal_channels_1x1_3x3=conv2.in_channels,
        nonlinear=_activation_of(foreign, "nonlinear"),
    )


def _build_mobileone(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.mobileone import MobileOneBlock

    branches = _child(foreign, "rbr_conv", nn.ModuleList)
    scale = getattr(foreign, "rbr_scale", None)
    if len(branches):
        geometry = _geometry(_child(foreign, "rbr_conv.0.conv", nn.Conv2d), "rbr_conv.0.conv")
    elif isinstance(scale, nn.Module):
        geometry = _geometry(_child(foreign, "rbr_scale.conv", nn.Conv2d), "rbr_scale.conv")
        geometry["kernel_size"] = int(getattr(foreign, "kernel_size", 1))
        geometry["padding"] = int(getattr(foreign, "padding", geometry["kernel_size"] // 2))
    else:
        raise FusionError("has neither rbr_conv branches nor rbr_scale")
    block = MobileOneBlock(**geometry, num_conv_branches=len(branches), use_se=has_se(foreign))
    act = _activation_of(foreign, "activation")
    if act is not None:
        block.activation = act
    return block


def _probe_kxk(conv_path: str) -> Callable[[nn.Module], tuple]:
    def probe(foreign: nn.Module) -> tuple:
        conv = foreign.get_submodule(conv_path)
        return (
            _probe_image(
                conv.in_channels,
                _single(conv.kernel_size, "kernel_size"),
                _single(conv.stride, "stride"),
                _single(conv.dilation, "dilation"),
            ),
        )

    return probe


def _probe_mobileone(foreign: nn.Module) -> tuple:
    path = "rbr_conv.0.conv" if len(foreign.rbr_conv) else "rbr_scale.conv"
    return _probe_kxk(path)(foreign)


def _involution_args(foreign: nn.Module, reduce_path: str, span_path: str) -> dict:
    reduce = _child(foreign, reduce_path, nn.Conv2d)
    span = _child(foreign, span_path, nn.Conv2d)
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


def _probe_involution(foreign: nn.Module) -> tuple:
    reduce = foreign.conv1.conv if hasattr(foreign, "conv1") else foreign.cv1.conv
    stride = int(getattr(foreign, "stride", 1))
    return (_probe_image(reduce.in_channels, int(getattr(foreign, "kernel_size", 3)), stride),)


def _build_drconv(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.drconv import DRConv2d

    guide = _child(foreign, "conv_guide", nn.Conv2d)
    generator = _child(foreign, "conv_kernel.3", nn.Conv2d)
    geometry = _geometry(guide, "conv_guide")
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
    conv = lambda name: _child(foreign, f"{name}.conv", nn.Conv2d)  # noqa: E731
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
    compress = _child(foreign, "weight_level_0.conv", nn.Conv2d).out_channels
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


def _probe_asff(foreign: nn.Module) -> tuple:
    _, _, (c0, c1, c2) = _asff_widths(foreign)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    levels = [
        torch.randn(2, c, s, s, generator=generator, dtype=torch.float64)
        for c, s in ((c2, 16), (c1, 8), (c0, 4))
    ]
    return (levels,)


_SQUARE_SE = "its SE pools the whole map (the published SE a W×W window: same on square maps)"

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "ACNet ACBlock",
        "ACBlock",
        ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"),
        _build_acb,
        _probe_kxk("square_conv"),
    ),
    Layout(
        "RepVGG block",
        "RepVGGBlock",
        ("rbr_dense", "rbr_1x1"),
        _build_repvgg,
        _probe_kxk("rbr_dense.conv"),
        _SQUARE_SE,
    ),
    Layout(
        "Diverse Branch Block",
        "DiverseBranchBlock",
        ("dbb_origin", "dbb_1x1_kxk", "dbb_avg"),
        _build_dbb,
        _probe_kxk("dbb_origin.conv"),
    ),
    Layout(
        "MobileOne block",
        "MobileOneBlock",
        ("rbr_conv", "rbr_scale", "rbr_skip"),
        _build_mobileone,
        _probe_mobileone,
        _SQUARE_SE,
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
        "DRConv", "DRConv2d", ("conv_kernel", "conv_guide"), _build_drconv, _probe_kxk("conv_guide")
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
    - {"conv1", "conv2", "unfold", "cv1", "cv2", "expand"}  # too common on their own
) | {"dbb_1x1", "rbr_identity"}
