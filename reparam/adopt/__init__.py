"""Adopt users' own copies of published blocks into reparam's blocks, so they fuse fully.

YOLOv5 forks carry their own copies of ACNet's ACBlock, RepVGG's block, DBB, MobileOne,
Involution, DRConv and ASFF (pasted into ``models/common.py``). Such a copy has the published
attribute names but not reparam's class, so nothing merges its branches. This module
recognises those layouts by their attribute names, builds the reparam block with the
configuration read off the copy's submodules, loads the copy's state dict with strict keys,
and swaps the block in only after checking, on a probe input in float64 and eval mode, that
it computes what the copy computes. Anything that looks like a multi-branch or dynamic block
but is not adopted gets a note saying why.

Published layouts (attribute names):

- ACNet, https://github.com/DingXiaoH/ACNet (acnet/acb.py): square/ver/hor_conv + _bn;
- RepVGG, https://github.com/DingXiaoH/RepVGG (repvgg.py): rbr_dense, rbr_1x1, rbr_identity;
- DBB, https://github.com/DingXiaoH/DiverseBranchBlock (diversebranchblock.py): dbb_origin,
  dbb_1x1, dbb_1x1_kxk, dbb_avg;
- MobileOne, https://github.com/apple/ml-mobileone (mobileone.py): rbr_conv, rbr_scale,
  rbr_skip;
- Involution, https://github.com/d-li14/involution (mmcv ConvModule layout): conv1, conv2;
  the YOLOv5 layout (cv1, cv2) where :class:`~reparam.blocks.Involution` offers it;
- DRConv as YOLOv5 users paste it: conv_kernel, conv_guide;
- ASFF for YOLOv5 (ASFFV5): weight_level_0/1/2, weight_levels, expand.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

from reparam.errors import FusionError, summarize
from reparam.fusers import register_pre_fuse_pass

__all__ = ["LAYOUT_ATTRIBUTES", "AdoptionNote", "adopt_foreign_blocks"]

# A probe output may differ from the copy's by this much, relative to the largest output
# magnitude. The check runs in float64, where exact adoptions agree to ~1e-15, so this only
# has to separate rounding from a different function.
_RTOL = 1e-5
_PROBE_SEED = 20240901


@dataclass(frozen=True)
class AdoptionNote:
    """What happened to one foreign block-like module."""

    path: str  # module path in the model
    foreign_type: str  # the user's class name (qualified)
    adopted_as: str | None  # reparam block class name, or None if left alone
    reason: str  # why adopted / why not


@dataclass(frozen=True)
class _Layout:
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


def _has_se(foreign: nn.Module) -> bool:
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
    block = RepVGGBlock(**geometry, use_se=_has_se(foreign))
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
    block = MobileOneBlock(**geometry, num_conv_branches=len(branches), use_se=_has_se(foreign))
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

LAYOUTS: tuple[_Layout, ...] = (
    _Layout(
        "ACNet ACBlock",
        "ACBlock",
        ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"),
        _build_acb,
        _probe_kxk("square_conv"),
    ),
    _Layout(
        "RepVGG block",
        "RepVGGBlock",
        ("rbr_dense", "rbr_1x1"),
        _build_repvgg,
        _probe_kxk("rbr_dense.conv"),
        _SQUARE_SE,
    ),
    _Layout(
        "Diverse Branch Block",
        "DiverseBranchBlock",
        ("dbb_origin", "dbb_1x1_kxk", "dbb_avg"),
        _build_dbb,
        _probe_kxk("dbb_origin.conv"),
    ),
    _Layout(
        "MobileOne block",
        "MobileOneBlock",
        ("rbr_conv", "rbr_scale", "rbr_skip"),
        _build_mobileone,
        _probe_mobileone,
        _SQUARE_SE,
    ),
    _Layout(
        "mmcv Involution",
        "Involution",
        ("conv1", "conv2", "unfold"),
        _build_involution_mmcv,
        _probe_involution,
    ),
    _Layout(
        "YOLOv5 Involution",
        "Involution",
        ("cv1", "cv2", "unfold"),
        _build_involution_yolov5,
        _probe_involution,
    ),
    _Layout(
        "DRConv", "DRConv2d", ("conv_kernel", "conv_guide"), _build_drconv, _probe_kxk("conv_guide")
    ),
    _Layout(
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


# --------------------------------------------------------------------------- the check


def _outputs(value: object) -> list[Tensor]:
    """The tensors of a forward's result (a tensor, or nested tuples / lists of them)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    raise FusionError(f"returns a {type(value).__name__}, not tensors")


def _relative_error(foreign: nn.Module, candidate: nn.Module, inputs: tuple) -> float:
    """Largest |difference| of the two modules' float64 eval-mode outputs on ``inputs``,
    relative to the largest output magnitude. Both run on copies: the user's module keeps
    its dtype, device and train/eval state."""
    try:
        reference = copy.deepcopy(foreign).to(device="cpu", dtype=torch.float64).eval()
    except Exception as error:
        raise FusionError(f"it cannot be copied for the check ({summarize(error)})") from error
    adopted = copy.deepcopy(candidate).to(device="cpu", dtype=torch.float64).eval()
    with torch.no_grad():
        try:
            expected = _outputs(reference(*inputs))
        except Exception as error:  # the user's forward: any failure means "cannot check"
            raise FusionError(f"its forward fails on a probe input ({summarize(error)})") from error
        try:
            got = _outputs(adopted(*inputs))
        except Exception as error:
            reason = f"the adopted block fails on the probe input ({summarize(error)})"
            raise FusionError(reason) from error
    shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in got]
    if shapes[0] != shapes[1] or not expected:
        raise FusionError(f"output shapes differ on the probe input: {shapes[0]} vs {shapes[1]}")
    scale = max(float(t.abs().max()) for t in expected)
    error = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    return error / max(scale, 1e-30)


def _sync_norm_settings(foreign: nn.Module, candidate: nn.Module) -> None:
    """Give every BatchNorm of ``candidate`` the eps and momentum of the copy's BatchNorm at
    the same path (copies sometimes use eps=1e-3 as YOLOv5 does); state dicts carry neither."""
    for path, norm in candidate.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        try:
            theirs = foreign.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(theirs, nn.modules.batchnorm._BatchNorm):
            norm.eps, norm.momentum = theirs.eps, theirs.momentum


def _reference_tensor(module: nn.Module) -> Tensor | None:
    """A floating tensor of ``module`` giving the dtype and device the adopted block takes."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _adopt_one(foreign: nn.Module, layout: _Layout) -> tuple[nn.Module, float]:
    """The reparam block computing what ``foreign`` computes, and the probe's relative error.

    Raises FusionError with the reason when it cannot be built, loaded or shown equal.
    """
    # Building the block initialises weights from the global RNG: keep the user's stream.
    with torch.random.fork_rng(devices=[]):
        try:
            candidate = layout.build(foreign)
        except FusionError:
            raise
        except Exception as error:  # the block's own constructor checks, or odd shapes
            reason = f"no {layout.target} matches its configuration ({summarize(error)})"
            raise FusionError(reason) from error
    _sync_norm_settings(foreign, candidate)
    reference = _reference_tensor(foreign)
    if reference is not None:
        candidate.to(device=reference.device, dtype=reference.dtype)
    try:
        candidate.load_state_dict(foreign.state_dict(), strict=True)
    except RuntimeError as error:
        reason = f"its state dict does not load into {layout.target}: {summarize(error)}"
        raise FusionError(reason) from error
    try:
        inputs = layout.probe(foreign)
    except FusionError:
        raise
    except Exception as error:
        raise FusionError(f"no probe input could be built ({summarize(error)})") from error
    error = _relative_error(foreign, candidate, inputs)
    if not error <= _RTOL:
        raise FusionError(
            f"it computes something else than {layout.target} (relative error {error:.2e} on a "
            f"probe input, eval mode, float64)"
        )
    candidate.train(foreign.training)
    return candidate, error


# --------------------------------------------------------------------------- the walk


def _qualified(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _is_foreign(module: nn.Module) -> bool:
    """Not one of reparam's own classes and not a torch.nn class."""
    name = type(module).__module__
    return not (name == "reparam" or name.startswith(("reparam.", "torch.")))


def _matching_layout(module: nn.Module) -> _Layout | None:
    for layout in LAYOUTS:
        if all(hasattr(module, name) for name in layout.required):
            return layout
    return None


@register_pre_fuse_pass
def adopt_foreign_blocks(model: nn.Module) -> list[AdoptionNote]:
    """Replace recognised foreign blocks in ``model`` (in place) by reparam blocks.

    A module is adopted when its class is not reparam's, its attributes follow one of the
    published layouts (see the module docstring), the reparam block built from its
    configuration loads its state dict with strict keys, and both compute the same on a
    probe input (eval mode, float64, relative error ≤ 1e-5). The adopted block has the
    copy's dtype, device and train/eval state; a module shared at several paths is replaced
    at all of them by one block.

    Returns one note per foreign module that was adopted, or that looks like a multi-branch
    or dynamic block (a published layout, part of one, a deploy method reparam does not
    know, or convolution branches of one input summed) but was left alone, with why.
    ``model`` itself is never replaced (there is nothing to replace it in); its own layout
    is reported if it has one.
    """
    notes: list[AdoptionNote] = []
    replaced: dict[int, nn.Module] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        # _modules, not named_children(): that skips a module's second occurrence.
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            if id(child) in replaced:  # shared: the same block at every path
                setattr(module, name, replaced[id(child)])
                continue
            if id(child) in seen:
                continue
            seen.add(id(child))
            block, is_copy = _consider(child, child_path, notes)
            if block is not None:
                replaced[id(child)] = block
                setattr(module, name, block)
            elif not is_copy:  # a copy's children are its branches: nothing more to find
                visit(child, child_path)

    _, is_copy = _consider(model, "", notes, replace=False)
    if not is_copy:
        visit(model, "")
    return notes


def _consider(
    module: nn.Module, path: str, notes: list[AdoptionNote], replace: bool = True
) -> tuple[nn.Module | None, bool]:
    """(the adopted block or None, whether ``module`` follows a published layout); appends a
    note when ``module`` is adopted or looks like a block that is not."""
    if not _is_foreign(module):
        return None, False
    where, kind = path or "<model>", _qualified(module)
    layout = _matching_layout(module)
    if layout is None:
        reason = _suspicion(module)
        if reason is not None:
            notes.append(AdoptionNote(where, kind, None, reason))
        return None, False
    if not replace:
        reason = f"{layout.name} layout, but it is the whole model: nothing to replace it in"
        notes.append(AdoptionNote(where, kind, None, reason))
        return None, True
    try:
        block, error = _adopt_one(module, layout)
    except FusionError as skip:
        notes.append(AdoptionNote(where, kind, None, f"{layout.name} layout, but {skip}"))
        return None, True
    extra = f"; {layout.note}" if layout.note and _has_se(module) else ""
    reason = (
        f"{layout.name} layout; same outputs on a probe input (relative error {error:.1e}){extra}"
    )
    notes.append(AdoptionNote(where, kind, type(block).__name__, reason))
    return block, True


# --------------------------------------------------------------------------- suspicion

_DEPLOY_METHODS = ("switch_to_deploy", "reparameterize", "get_equivalent_kernel_bias")
# Leaf modules a linear branch may consist of (eval mode): a sum of such branches of one
# input is what reparameterisation merges.
_LINEAR_LEAVES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.modules.batchnorm._BatchNorm,
    nn.Identity,
    nn.AvgPool2d,
    nn.ZeroPad2d,
    nn.Dropout,
)
_ADDS = {operator.add, operator.iadd, torch.add}


def _suspicion(module: nn.Module) -> str | None:
    """Why an unrecognised foreign module looks like a block reparam cannot fuse, or None."""
    present = sorted(name for name in LAYOUT_ATTRIBUTES if hasattr(module, name))
    if present:
        layout = max(LAYOUTS, key=lambda lay: sum(hasattr(module, n) for n in lay.required))
        missing = [name for name in layout.required if not hasattr(module, name)]
        return (
            f"has {', '.join(present)} like the {layout.name} layout but lacks "
            f"{', '.join(missing)}; only its Conv→BatchNorm pairs can be folded"
        )
    methods = [name for name in _DEPLOY_METHODS if callable(getattr(module, name, None))]
    if methods:
        return (
            f"defines {', '.join(methods)} but follows no published layout reparam knows; its "
            f"own {methods[0]}() is used as it is, unchecked"
        )
    branches = _summed_conv_branches(module)
    if branches >= 2:
        return (
            f"sums {branches} convolution branches of one input like a multi-branch block, but "
            f"follows no published layout; its branches stay separate (only Conv→BatchNorm "
            f"pairs are folded)"
        )
    return None


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward, every submodule a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _linear_module(module: nn.Module) -> bool:
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and all(isinstance(m, _LINEAR_LEAVES) for m in leaves)


def _summed_conv_branches(module: nn.Module) -> int:
    """The largest number of terms of one sum in ``module.forward`` that are linear
    conv branches (chains of Conv/BatchNorm/crop submodules) of the same input; 0 if the
    forward does not trace."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # control flow, asserts, *args: the heuristic just does not apply
        return 0
    submodules = dict(module.named_modules())

    def origin(node: torch.fx.Node) -> torch.fx.Node | None:
        """The input a term is a linear conv branch of, or None."""
        has_conv = False
        while True:
            if node.op == "call_module":
                target = submodules.get(node.target)
                if target is None or not _linear_module(target) or len(node.args) != 1:
                    return None
                has_conv |= any(isinstance(m, nn.modules.conv._ConvNd) for m in target.modules())
            elif not (node.op == "call_function" and node.target is operator.getitem):
                return node if node.op == "placeholder" and has_conv else None
            if not isinstance(node.args[0], torch.fx.Node):
                return None
            node = node.args[0]

    def terms(node: torch.fx.Node) -> list[torch.fx.Node]:
        if node.op == "call_function" and node.target in _ADDS:
            return [t for arg in node.args if isinstance(arg, torch.fx.Node) for t in terms(arg)]
        return [node]

    best = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _ADDS:
            origins = [origin(term) for term in terms(node)]
            counts = [origins.count(o) for o in set(origins) if o is not None]
            best = max([best, *counts])
    return best
