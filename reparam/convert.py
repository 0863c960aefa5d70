"""Model-wide fusion: every block to its deploy form, every Conv→BatchNorm pair folded.

``fuse(model)`` works in three passes over an eval-mode copy of the model:

1. **Blocks**, top down: a module whose type has a registered fuser (looked up along the
   MRO) is replaced by what the fuser returns; a module of an unregistered type that exposes
   ``switch_to_deploy()``, ``reparameterize()`` or ``fuse()`` (the conventions of ACNet/RepVGG,
   timm/MobileOne and YOLO code) has that method called. Children are visited after their
   parent, so a fuser sees its block in training form.
2. **Sequential pairs**: a Conv directly followed by a BatchNorm in an ``nn.Sequential``.
3. **Traced pairs**: where the model traces with ``torch.fx``, any Conv whose only consumer is
   a BatchNorm, both called once. The BatchNorm is replaced by ``nn.Identity`` in the original
   module tree, so the model keeps its class and forward.

Fusing a fused model finds nothing to do, so ``fuse`` is idempotent.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from reparam.errors import FusionError
from reparam.module_fusion import check_foldable, fold_bn_into_conv

__all__ = [
    "ConvBNPair",
    "FuseOutcome",
    "FuseReport",
    "find_conv_bn_pairs",
    "fuse",
    "fuse_with_report",
    "get_fuser",
    "list_fusers",
    "register_fuser",
    "replace_module",
]

THIRD_PARTY_METHODS = ("switch_to_deploy", "reparameterize", "fuse")
CONV_BN = "Conv+BatchNorm"


@dataclass
class FuseOutcome:
    """What a fuser may return instead of a bare module: the module plus a report note."""

    module: nn.Module
    detail: str = ""


Fuser = Callable[[nn.Module], "nn.Module | FuseOutcome | None"]
"""Takes a block in eval mode; returns its deploy form, or None when it is already fused."""

_FUSERS: dict[type, Fuser] = {}


def register_fuser(block_type: type, fuser: Fuser | None = None):
    """Register ``fuser`` for ``block_type`` (and its subclasses); usable as a decorator.

    A fuser receives the block in eval mode and returns the module that replaces it (it may
    modify and return the block itself), a :class:`FuseOutcome` carrying a note for the fuse
    report, or ``None`` when the block is already in its deploy form.

    Example::

        @reparam.register_fuser(MyBlock)
        def fuse_my_block(block):
            return block.to_conv()
    """

    def decorator(fn: Fuser) -> Fuser:
        if block_type in _FUSERS and _FUSERS[block_type] is not fn:
            warnings.warn(f"replacing the fuser registered for {block_type.__name__}", stacklevel=3)
        _FUSERS[block_type] = fn
        return fn

    return decorator(fuser) if fuser is not None else decorator


def get_fuser(block_type: type) -> Fuser | None:
    """The fuser registered for ``block_type`` or its nearest registered base class."""
    for cls in block_type.__mro__:
        if cls in _FUSERS:
            return _FUSERS[cls]
    return None


def list_fusers() -> list[str]:
    """Names of the block types with a registered fuser."""
    return sorted(cls.__name__ for cls in _FUSERS)


@dataclass
class FuseReport:
    """What ``fuse`` did: blocks converted per type name, and notes worth showing a user."""

    blocks: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    traced: bool | None = None
    trace_error: str = ""

    def record(self, kind: str, detail: str = "") -> None:
        self.blocks[kind] += 1
        if detail:
            self.details.append(detail)


def fuse(model: nn.Module, *, inplace: bool = False, trace: bool = True) -> nn.Module:
    """Return ``model`` with every block in deploy form and every Conv→BN pair folded.

    Args:
        model: any ``nn.Module``; training mode is fine (the work is done in eval mode).
        inplace: modify ``model`` itself instead of a deep copy.
        trace: also fold Conv→BN pairs found by tracing the model with ``torch.fx``.

    Returns:
        The fused model, in eval mode, with the dtype and device of the input.

    Raises:
        FusionError: a block cannot be fused exactly, or a BatchNorm to fold has no running
            statistics.
    """
    return fuse_with_report(model, inplace=inplace, trace=trace)[0]


def fuse_with_report(
    model: nn.Module, *, inplace: bool = False, trace: bool = True
) -> tuple[nn.Module, FuseReport]:
    """:func:`fuse`, also returning a :class:`FuseReport` of what was converted."""
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    report = FuseReport()
    with torch.no_grad():
        target = _fuse_blocks(target, "", report)
        _fold_pairs(target, report, trace)
    return target.eval(), report


def _fuse_blocks(module: nn.Module, path: str, report: FuseReport) -> nn.Module:
    module = _fuse_one(module, path, report)
    for name, child in list(module.named_children()):
        fused = _fuse_blocks(child, f"{path}.{name}" if path else name, report)
        if fused is not child:
            setattr(module, name, fused)
    return module


def _fuse_one(module: nn.Module, path: str, report: FuseReport) -> nn.Module:
    where = path or "<model>"
    kind = type(module).__name__
    fuser = get_fuser(type(module))
    try:
        if fuser is not None:
            outcome = fuser(module)
            if outcome is None:
                return module
            detail = ""
            if isinstance(outcome, FuseOutcome):
                outcome, detail = outcome.module, outcome.detail
            report.record(kind, f"{where} ({kind}): {detail}" if detail else "")
            return outcome.eval()
        method = _third_party_method(module)
        if method is not None:
            result = method()
            report.record(kind)
            return result.eval() if isinstance(result, nn.Module) else module
    except FusionError as error:
        raise FusionError(f"{where} ({kind}): {error}") from error
    return module


def _third_party_method(module: nn.Module) -> Callable[[], object] | None:
    """A no-argument deploy method defined by the module's own (non-torch) class."""
    for name in THIRD_PARTY_METHODS:
        method = getattr(module, name, None)
        if not callable(method) or type(module).__module__.startswith("torch."):
            continue
        try:
            required = [
                p
                for p in inspect.signature(method).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            continue
        if not required:
            return method
    return None


def _is_shared(model: nn.Module, module: nn.Module) -> bool:
    """Whether the same module object is reachable under more than one name."""
    return sum(m is module for m in model.modules(remove_duplicate=False)) > 1


def _foldable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _ConvNd)
        and isinstance(bn, _BatchNorm)
        and bn.num_features == conv.out_channels
    )


@dataclass(frozen=True)
class ConvBNPair:
    """A conv whose output feeds only a BatchNorm: ``bn(conv(x))``, by module path."""

    conv: str
    bn: str


def find_conv_bn_pairs(model: nn.Module, *, trace: bool = True) -> tuple[list[ConvBNPair], str]:
    """Conv→BatchNorm pairs that can be changed without changing any other computation.

    Found as adjacent children of an ``nn.Sequential`` and, with ``trace``, through
    ``torch.fx``: a conv whose only consumer is a BatchNorm. Modules reachable under two names
    or called twice are skipped: changing them would change another call site too.

    Returns:
        The pairs, and why tracing failed ("" when it succeeded or was not asked for).
    """
    pairs: dict[str, ConvBNPair] = {}

    def add(conv_path: str, bn_path: str) -> None:
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if _foldable_pair(conv, bn) and not _is_shared(model, conv) and not _is_shared(model, bn):
            pairs.setdefault(bn_path, ConvBNPair(conv_path, bn_path))

    for path, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            prefix = f"{path}." if path else ""
            for first, second in itertools.pairwise(seq._modules):
                add(prefix + first, prefix + second)
    if not trace:
        return list(pairs.values()), ""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # any tracing failure only skips the traced pairs
        return list(pairs.values()), f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] == 1 and calls[source.target] == 1:
            add(source.target, node.target)
    return list(pairs.values()), ""


def replace_module(model: nn.Module, path: str, replacement: nn.Module) -> None:
    """Put ``replacement`` at dotted ``path`` inside ``model``."""
    parent_name, _, child_name = path.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)


def _fold_pairs(model: nn.Module, report: FuseReport, trace: bool) -> None:
    pairs, trace_error = find_conv_bn_pairs(model, trace=trace)
    if trace:
        report.traced, report.trace_error = not trace_error, trace_error
    for pair in pairs:
        bn = model.get_submodule(pair.bn)
        check_foldable(bn, pair.bn)
        fold_bn_into_conv(model.get_submodule(pair.conv), bn)
        replace_module(model, pair.bn, nn.Identity())
        report.record(CONV_BN)
