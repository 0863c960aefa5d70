"""Model-wide fusion: every block to its deploy form, every Conv→BatchNorm pair folded.

The promise is *exact or refused*: the fused model computes what the model computed (eval
mode, ≤ 1e-5 relative in float32), or a FusionError says why in one line, or the module is
left as it was and listed in the :class:`FuseReport` with why (and how to fold it).

``fuse(model)`` works in these passes over an eval-mode copy of the model, after
:func:`reparam.builtins.register_builtins` (so nothing depends on what the user imported):

0. **Adoption**: users' own copies of published blocks (ACNet, RepVGG, DBB, MobileOne, ...)
   are replaced by reparam's blocks where :mod:`reparam.adopt` proves them equal.
1. **Blocks**, top down: a module whose type has a registered fuser (looked up along the
   MRO, :mod:`reparam.fusers`) is replaced by what the fuser returns; a module of an
   unregistered type that exposes ``switch_to_deploy()``, ``reparameterize()`` or ``fuse()``
   (the conventions of ACNet/RepVGG, timm/MobileOne and YOLO code) has that method called,
   but only under a check (:mod:`reparam.fuse_probe`): on the inputs the module received
   from ``example_inputs`` (or one inferred from its first conv), scaled from 1e-2 to 1e2
   and negated, before and after; the module is restored when they differ.
2. **Pairs** ``bn(layer(x))`` with ``layer`` a ConvNd (or a Linear before a BatchNorm1d),
   folded only where proven: by a ``torch.fx`` trace (dynamic blocks are leaves, so they
   never stop it), or, given ``example_inputs``, by a probe forward that sees the BatchNorm
   receive the very tensor the conv returned, read by nothing else. Adjacency in an
   ``nn.Sequential`` is no proof (a forward may call the members one by one), so a model
   fx cannot trace has no pair folded without example inputs. With example inputs the folds
   are checked on them and undone one by one when the outputs change. The BatchNorm becomes
   ``nn.Identity`` in the original module tree, so the model keeps its class and forward.

A pair or block whose modules carry hooks is left alone: folding would drop the hook. Every
BatchNorm left in the fused model is listed in the report. Fusing a fused model finds
nothing to do, so ``fuse`` is idempotent.

This module holds the entry points; the work is split by job: :mod:`reparam.fuse_walk` (the
walk over blocks), :mod:`reparam.conv_bn_pairs` (pair finding), :mod:`reparam.fold_undo`
(folds and their undo), :mod:`reparam.fuse_probe` (checks on probe inputs),
:mod:`reparam.fuse_report` (the report) and :mod:`reparam.builtins` (the registrations).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from reparam.builtins import register_builtins
from reparam.conv_bn_pairs import ConvBNPair, PairFinder, sequential_pairs, traced_pairs
from reparam.errors import FusionError, summarize
from reparam.fold_undo import fold_pairs, replace_module
from reparam.fuse_probe import record_inputs
from reparam.fuse_report import FuseReport
from reparam.fuse_walk import adopt, checked_on_inputs, fuse_blocks
from reparam.fusers import (
    FuseOutcome,
    Fuser,
    get_fuser,
    list_fusers,
    override_fuser,
    register_fuser,
    unregister_fuser,
)

__all__ = [
    "ConvBNPair",
    "FuseOutcome",
    "FuseReport",
    "Fuser",
    "find_conv_bn_pairs",
    "fuse",
    "fuse_with_report",
    "get_fuser",
    "list_fusers",
    "override_fuser",
    "register_fuser",
    "replace_module",
    "unregister_fuser",
]


def fuse(
    model: nn.Module,
    *,
    inplace: bool = False,
    trace: bool = True,
    example_inputs: object = None,
) -> nn.Module:
    """Return ``model`` with every block in deploy form and every Conv→BN pair folded.

    Args:
        model: any ``nn.Module``; training mode is fine (the work is done in eval mode).
        inplace: modify ``model`` itself instead of a deep copy.
        trace: also fold Conv→BN pairs found by tracing the model with ``torch.fx``.
        example_inputs: a tensor or tuple of positional inputs. When given, a probe forward
            also finds pairs in models fx cannot trace (without them, such a model has no
            pair folded), the folds are checked on these inputs (undone if the outputs
            change), and other libraries' deploy methods are checked on what each module
            received.

    Returns:
        The fused model, in eval mode, with the dtype and device of the input.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        FusionError: a block cannot be fused exactly, a BatchNorm to fold has no running
            statistics, a negative running_var, or folds to values the dtype cannot hold,
            the model is TorchScript or on the meta device, or it cannot be copied (then
            ``inplace=True`` is the way).
    """
    return fuse_with_report(model, inplace=inplace, trace=trace, example_inputs=example_inputs)[0]


def fuse_with_report(
    model: nn.Module,
    *,
    inplace: bool = False,
    trace: bool = True,
    example_inputs: object = None,
) -> tuple[nn.Module, FuseReport]:
    """:func:`fuse`, also returning a :class:`FuseReport` of what was converted."""
    register_builtins()
    _check_model(model)
    inputs = as_inputs(example_inputs)
    target = model if inplace else _copy(model)
    target.eval()
    report = FuseReport()
    with torch.no_grad():
        recorded = None
        if inputs is not None:  # what each checked module received: its checks run on these
            checked = {id(m): m for m in target.modules() if _checked(m)}
            recorded = record_inputs(target, inputs, checked) if checked else {}
        adopt(target, report, recorded, inputs)
        target = fuse_blocks(target, "", report, recorded)
        fold_pairs(target, report, trace, inputs)
    return target.eval(), report


def _checked(module: nn.Module) -> bool:
    """Modules whose conversion is checked on their recorded inputs: other libraries'
    modules (adoption candidates, deploy methods) and blocks with a user-registered fuser."""
    foreign = not type(module).__module__.startswith(("torch.", "reparam."))
    return foreign or checked_on_inputs(module)


def _check_model(model: object) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise FusionError(
            "TorchScript modules cannot be fused: their forward is compiled against a fixed "
            "set of submodules, so blocks cannot be swapped for convs nor BatchNorms removed; "
            "fuse the Python nn.Module before torch.jit.script/trace"
        )
    if isinstance(model, nn.Module):
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            raise FusionError(
                "the model is on the meta device: its weights hold no values, so nothing can "
                "be folded or checked; build it on a real device (or call "
                "model.to_empty(device='cpu') and load a state dict) before fusing"
            )
        return
    hint = ""
    if isinstance(model, dict):
        hint = " (a state dict? build the model and call load_state_dict first)"
    elif callable(model):
        hint = " (a function or class? call it to build the model first)"
    raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__name__}{hint}")


def as_inputs(example_inputs: object) -> tuple | None:
    """``example_inputs`` as a tuple of positional inputs (None stays None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of positional inputs, got "
        f"{type(example_inputs).__name__}"
    )


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:  # anything deepcopy raises means "this model cannot be copied"
        raise FusionError(
            f"cannot copy the model to fuse it ({summarize(error)}); "
            "pass inplace=True to fuse the model itself"
        ) from error


def find_conv_bn_pairs(model: nn.Module, *, trace: bool = True) -> tuple[list[ConvBNPair], str]:
    """Conv→BatchNorm (and Linear→BatchNorm1d) pairs that can be folded without changing
    any other computation.

    Found through ``torch.fx`` (a conv whose only consumer is a BatchNorm) when ``trace`` is
    set and the model traces; otherwise as adjacent children of a plain ``nn.Sequential``
    (which assumes the forward calls the Sequential as a whole: ``fuse`` does not fold such
    a pair without example inputs that show it). Modules reachable under two names or called
    twice, and modules with hooks, are skipped.

    Returns:
        The pairs, and why tracing failed ("" when it succeeded or was not asked for).
    """
    register_builtins()
    finder = PairFinder(model)
    error = traced_pairs(finder) if trace else ""
    if not trace or error:  # a trace shows which Sequential pairs the forward really runs
        sequential_pairs(finder)
    return list(finder.pairs.values()), error
