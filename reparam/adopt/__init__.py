"""Adopt users' own copies of published blocks into reparam's blocks, so they fuse fully.

YOLOv5 forks carry their own copies of ACNet's ACBlock, RepVGG's block, DBB, MobileOne,
Involution, DRConv and ASFF (pasted into ``models/common.py``). Such a copy has the published
attribute names but not reparam's class, so nothing merges its branches. This package
recognises those layouts by their attribute names, builds the reparam block with the
configuration read off the copy's submodules, loads the copy's state dict with strict keys,
and swaps the block in only after checking, on a probe input in float64 and eval mode, that
it computes what the copy computes. Anything that looks like a multi-branch or dynamic block
but is not adopted gets a note saying why.

This module owns the walk over the model (:func:`adopt_foreign_blocks`, which
:mod:`reparam.builtins` registers as a pre-fuse pass) and :class:`AdoptionNote`;
:mod:`reparam.adopt.layouts` the published layouts and their builders (the YOLO family's in
:mod:`reparam.adopt.yolo`), :mod:`reparam.adopt.parts` the layout record and the probe
inputs, :mod:`reparam.adopt.check` the state-dict load and the probe check,
:mod:`reparam.adopt.lookalike` the detection of look-alikes that are not adopted.

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
- ASFF for YOLOv5 (ASFFV5): weight_level_0/1/2, weight_levels, expand;
- YOLOv6 QARepVGGBlock (rbr_dense, bare rbr_1x1, bn after the sum), YOLOv7 RepConv
  (rbr_dense.0/.1, rbr_1x1.0/.1, rbr_identity, act) and ultralytics RepConv (conv1, conv2,
  bn, act): see :mod:`reparam.adopt.yolo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reparam.adopt.check import adopt_one
from reparam.adopt.layouts import LAYOUT_ATTRIBUTES, LAYOUTS, Layout
from reparam.adopt.lookalike import suspicion
from reparam.adopt.parts import Probe, scaled_probes
from reparam.errors import FusionError

__all__ = ["LAYOUT_ATTRIBUTES", "AdoptionNote", "adopt_foreign_blocks"]


@dataclass(frozen=True)
class AdoptionNote:
    """What happened to one foreign block-like module."""

    path: str  # module path in the model
    foreign_type: str  # the user's class name (qualified)
    adopted_as: str | None  # reparam block class name, or None if left alone
    reason: str  # why adopted / why not


# --------------------------------------------------------------------------- the walk


def _qualified(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _is_foreign(module: nn.Module) -> bool:
    """Not one of reparam's own classes and not a torch.nn class."""
    name = type(module).__module__
    return not (name == "reparam" or name.startswith(("reparam.", "torch.")))


def _matching_layout(module: nn.Module) -> Layout | None:
    for layout in LAYOUTS:
        if layout.matches(module):
            return layout
    return None


def _seen_inputs(model: nn.Module, example_inputs: tuple | None) -> dict[int, list[Probe]]:
    """Probes from the inputs each layout-matching foreign module receives when ``model``
    runs on ``example_inputs`` (float64 copies), keyed by module id; empty without an
    example or when the model does not run on it (the layouts' own probes still apply)."""
    if example_inputs is None:
        return {}
    seen: dict[int, list[Probe]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        if id(module) not in seen:
            as_float64 = tuple(_to_float64(value) for value in args)
            seen[id(module)] = scaled_probes(as_float64, "the example input")

    handles = [
        module.register_forward_pre_hook(record)
        for module in model.modules()
        if _is_foreign(module) and _matching_layout(module) is not None
    ]
    if not handles:
        return {}
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception:  # the fuse reports the example's own failure; adoption just probes less
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _to_float64(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(device="cpu", dtype=torch.float64).clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float64(item) for item in value)
    return value


def adopt_foreign_blocks(
    model: nn.Module, example_inputs: tuple | None = None
) -> list[AdoptionNote]:
    """Replace recognised foreign blocks in ``model`` (in place) by reparam blocks.

    A module is adopted when its class is not reparam's, its attributes follow one of the
    published layouts (see the module docstring), the reparam block built from its
    configuration loads its state dict with strict keys, and both compute the same on a
    set of probe inputs (eval mode, float64, relative error ≤ 1e-5 on each): inputs scaled
    from 1e-2 to 1e2, several spatial sizes (above 16 px, odd, non-square) and batch sizes
    1 and 2, plus, when ``example_inputs`` is given, the very inputs each copy receives when
    ``model`` runs on it and random ones of that shape at 1e2. The adopted block has the
    copy's dtype, device and train/eval state; a module shared at several paths is replaced
    at all of them by one block.

    Not registered by importing this package: :mod:`reparam.builtins` registers it as a
    pre-fuse pass, so fusing finds it whatever the user imported.

    Returns one note per foreign module that was adopted, or that looks like a multi-branch
    or dynamic block (a published layout, part of one, a deploy method reparam does not
    know, or convolution branches of one input summed) but was left alone, with why.
    ``model`` itself is never replaced (there is nothing to replace it in); its own layout
    is reported if it has one.
    """
    notes: list[AdoptionNote] = []
    replaced: dict[int, nn.Module] = {}
    seen: set[int] = set()
    examples = _seen_inputs(model, example_inputs)

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
            block, is_copy = _consider(child, child_path, notes, examples=examples)
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
    module: nn.Module,
    path: str,
    notes: list[AdoptionNote],
    replace: bool = True,
    examples: dict[int, list[Probe]] | None = None,
) -> tuple[nn.Module | None, bool]:
    """(the adopted block or None, whether ``module`` follows a published layout); appends a
    note when ``module`` is adopted or looks like a block that is not."""
    if not _is_foreign(module):
        return None, False
    where, kind = path or "<model>", _qualified(module)
    layout = _matching_layout(module)
    if layout is None:
        reason = suspicion(module)
        if reason is not None:
            notes.append(AdoptionNote(where, kind, None, reason))
        return None, False
    if not replace:
        reason = f"{layout.name} layout, but it is the whole model: nothing to replace it in"
        notes.append(AdoptionNote(where, kind, None, reason))
        return None, True
    try:
        block, error = adopt_one(module, layout, (examples or {}).get(id(module), []))
    except FusionError as skip:
        notes.append(AdoptionNote(where, kind, None, f"{layout.name} layout, but {skip}"))
        return None, True
    extra = f"; {layout.note}" if layout.note else ""
    reason = (
        f"{layout.name} layout; same outputs on every probe input (relative error "
        f"{error:.1e}){extra}"
    )
    notes.append(AdoptionNote(where, kind, type(block).__name__, reason))
    return block, True
