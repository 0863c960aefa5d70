"""Model-wide fusion: every block to its deploy form, every Conv→BatchNorm pair folded.

``fuse(model)`` works in these passes over an eval-mode copy of the model:

0. **Adoption**: users' own copies of published blocks (ACNet, RepVGG, DBB, MobileOne, ...)
   are replaced by reparam's blocks where :mod:`reparam.adopt` proves them equal.
1. **Blocks**, top down: a module whose type has a registered fuser (looked up along the
   MRO, :mod:`reparam.fusers`) is replaced by what the fuser returns; a module of an
   unregistered type that exposes ``switch_to_deploy()``, ``reparameterize()`` or ``fuse()``
   (the conventions of ACNet/RepVGG, timm/MobileOne and YOLO code) has that method called.
   Children are visited after their parent, so a fuser sees its block in training form.
2. **Pairs** ``bn(layer(x))`` with ``layer`` a ConvNd (or a Linear before a BatchNorm1d),
   found three ways: adjacent children of an
   ``nn.Sequential``; a ``torch.fx`` trace (dynamic blocks are leaves, so they never stop it);
   and, given ``example_inputs``, a probe forward that sees which tensor each module received
   (works for models fx cannot trace). The BatchNorm becomes ``nn.Identity`` in the original
   module tree, so the model keeps its class and forward.

A pair or block whose modules carry hooks is left alone and listed in the report: folding
would drop the hook and change what the model computes. Fusing a fused model finds nothing
to do, so ``fuse`` is idempotent.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from reparam.compare import compare_outputs
from reparam.errors import FusionError, summarize
from reparam.fusers import (
    FuseOutcome,
    Fuser,
    get_fuser,
    leaf_module_types,
    list_fusers,
    override_fuser,
    pre_fuse_passes,
    register_fuser,
    unregister_fuser,
)
from reparam.module_fusion import check_foldable, fold_bn_into_conv, fold_bn_into_linear

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

THIRD_PARTY_METHODS = ("switch_to_deploy", "reparameterize", "fuse")
CONV_BN = "Conv+BatchNorm"
LINEAR_BN = "Linear+BatchNorm1d"

# Largest relative output change accepted when checking probe-found folds on the probe input.
PROBE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
PROBE_RTOL_LOW_PRECISION = 2e-2


@dataclass
class FuseReport:
    """What ``fuse`` did.

    Attributes:
        blocks: modules converted, per type name (``Conv+BatchNorm`` for folded pairs).
        details: notes the fusers wrote, worth showing a user.
        traced: whether the ``torch.fx`` pass ran (None when not asked for).
        trace_error: why tracing failed ("" otherwise).
        probed: whether the example-input pass ran (None without ``example_inputs``).
        probe_error: why the probe forward failed ("" otherwise).
        adopted: ``"path: ForeignType → ReparamType"`` for each user block adopted.
        not_fused: ``(module path, reason)`` for each block or pair left as it was.
    """

    blocks: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    traced: bool | None = None
    trace_error: str = ""
    probed: bool | None = None
    probe_error: str = ""
    adopted: list[str] = field(default_factory=list)
    not_fused: list[tuple[str, str]] = field(default_factory=list)

    def record(self, kind: str, detail: str = "") -> None:
        self.blocks[kind] += 1
        if detail:
            self.details.append(detail)

    def skip(self, path: str, reason: str) -> None:
        """Note that the module at ``path`` was left unfused, and why (once per path)."""
        if all(existing != path for existing, _ in self.not_fused):
            self.not_fused.append((path, reason))

    def summary(self) -> str:
        """A few lines a person can read: what was fused, adopted, and left alone."""
        fused = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.blocks.items()))
        lines = [f"fused: {fused or 'nothing'}"]
        if self.adopted:
            lines += ["adopted:", *(f"  {entry}" for entry in self.adopted)]
        if self.not_fused:
            lines += ["not fused:", *(f"  {path}: {reason}" for path, reason in self.not_fused)]
        if self.details:
            lines += ["notes:", *(f"  {detail}" for detail in self.details)]
        if self.traced is False:
            lines.append(f"torch.fx trace failed: {self.trace_error}")
        if self.probed is False:
            lines.append(f"probe forward failed: {self.probe_error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """The report as plain JSON-able types."""
        return {
            "blocks": dict(sorted(self.blocks.items())),
            "details": list(self.details),
            "traced": self.traced,
            "trace_error": self.trace_error,
            "probed": self.probed,
            "probe_error": self.probe_error,
            "adopted": list(self.adopted),
            "not_fused": [{"path": path, "reason": reason} for path, reason in self.not_fused],
        }


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
            also finds pairs in models fx cannot trace, and the folds it finds are checked
            on these inputs (undone if the outputs change).

    Returns:
        The fused model, in eval mode, with the dtype and device of the input.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        FusionError: a block cannot be fused exactly, a BatchNorm to fold has no running
            statistics or folds to values the dtype cannot hold, the model is TorchScript,
            or it cannot be copied (then ``inplace=True`` is the way).
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
    _check_model(model)
    inputs = _as_inputs(example_inputs)
    target = model if inplace else _copy(model)
    target.eval()
    report = FuseReport()
    _adopt(target, report)
    with torch.no_grad():
        target = _fuse_blocks(target, "", report)
        _fold_pairs(target, report, trace, inputs)
    return target.eval(), report


def _check_model(model: object) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise FusionError(
            "TorchScript modules cannot be fused: their forward is compiled against a fixed "
            "set of submodules, so blocks cannot be swapped for convs nor BatchNorms removed; "
            "fuse the Python nn.Module before torch.jit.script/trace"
        )
    if isinstance(model, nn.Module):
        return
    hint = ""
    if isinstance(model, dict):
        hint = " (a state dict? build the model and call load_state_dict first)"
    elif callable(model):
        hint = " (a function or class? call it to build the model first)"
    raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__name__}{hint}")


def _as_inputs(example_inputs: object) -> tuple | None:
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


def _adopt(model: nn.Module, report: FuseReport) -> None:
    """Run the registered pre-fuse passes (adoption of users' copies of published blocks),
    recording each decision."""
    for pre_fuse_pass in pre_fuse_passes():
        for note in pre_fuse_pass(model):
            if note.adopted_as is None:
                report.skip(note.path, f"{note.foreign_type} not adopted: {note.reason}")
            else:
                report.adopted.append(f"{note.path}: {note.foreign_type} -> {note.adopted_as}")


def _fuse_blocks(module: nn.Module, path: str, report: FuseReport) -> nn.Module:
    if isinstance(module, torch.jit.ScriptModule):
        report.skip(path or "<model>", "TorchScript submodule: its compiled forward cannot change")
        return module
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
    method = None if fuser is not None else _third_party_method(module)
    if fuser is None and method is None:
        return module
    if getattr(module, "deploy", False) is True:
        return module  # already in deploy form: nothing to check or do
    hooked = _hooked_submodule(module)
    if hooked is not None:
        report.skip(where, f"{kind} not fused: {hooked} would be dropped")
        return module
    params = list(module.parameters())
    frozen = bool(params) and not any(p.requires_grad for p in params)
    try:
        if fuser is not None:
            outcome = fuser(module)
            if outcome is None:
                return module
            detail = ""
            if isinstance(outcome, FuseOutcome):
                outcome, detail = outcome.module, outcome.detail
            report.record(kind, f"{where} ({kind}): {detail}" if detail else "")
        else:
            result = method()
            report.record(kind)
            outcome = result if isinstance(result, nn.Module) else module
    except FusionError as error:
        raise FusionError(f"{where} ({kind}): {error}") from error
    # Blame the fuse only when the block's own weights were finite (checked only on failure).
    if not all(map(_finite, outcome.parameters())) and all(map(_finite, params)):
        raise FusionError(
            f"{where} ({kind}): the fused weights are not finite (inf or NaN): a folded "
            f"kernel exceeds what {params[0].dtype if params else 'the dtype'} can hold"
        )
    if frozen:  # a frozen block stays frozen: the new deploy parameters keep the flag
        for parameter in outcome.parameters():
            parameter.requires_grad_(False)
    return outcome.eval()


def _finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    return all(math.isfinite(float(v)) for v in torch.aminmax(tensor.detach()))  # NaN propagates


def _hooks(module: nn.Module) -> str | None:
    """The kind of hook ``module`` carries that a fold would drop, or None."""
    for kind, hooks in (
        ("forward pre-hook", module._forward_pre_hooks),
        ("forward hook", module._forward_hooks),
        ("backward hook", module._backward_hooks),
        ("backward pre-hook", module._backward_pre_hooks),
    ):
        if hooks:
            return kind
    if parametrize.is_parametrized(module):
        return "parametrization"
    return None


def _hooked_submodule(block: nn.Module) -> str | None:
    for name, module in block.named_modules():
        kind = _hooks(module)
        if kind is not None:
            return f"the {kind} on {name or 'the block'}"
    return None


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


def _torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs a forward defined by torch itself (not a user override)."""
    return type(module).forward.__module__.startswith("torch.")


def _foldable_pair(layer: nn.Module, bn: nn.Module) -> bool:
    """``bn(layer(x))`` is an affine map of ``layer``'s weights: a torch ConvNd or Linear
    (forward not overridden) and a torch BatchNorm over its output channels."""
    if not isinstance(bn, _BatchNorm) or not _torch_forward(layer) or not _torch_forward(bn):
        return False
    if isinstance(layer, _ConvNd):
        return bn.num_features == layer.out_channels
    if type(layer) is nn.Linear:
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    return False


@dataclass(frozen=True)
class ConvBNPair:
    """A conv (or Linear) whose output feeds only a BatchNorm: ``bn(conv(x))``, by path."""

    conv: str
    bn: str


class _PairFinder:
    """Collects pairs from the passes; a pair found by several passes is kept once."""

    def __init__(self, model: nn.Module, report: FuseReport | None = None):
        self.model = model
        self.report = report
        self.pairs: dict[str, ConvBNPair] = {}
        self.uses = Counter(id(m) for m in model.modules(remove_duplicate=False))

    def add(self, conv_path: str, bn_path: str) -> bool:
        conv, bn = self.model.get_submodule(conv_path), self.model.get_submodule(bn_path)
        if not _foldable_pair(conv, bn) or self.uses[id(conv)] > 1 or self.uses[id(bn)] > 1:
            return False
        for path, module in ((conv_path, conv), (bn_path, bn)):
            kind = _hooks(module)
            if kind is not None:
                if self.report is not None:
                    self.report.skip(
                        f"{conv_path} -> {bn_path}",
                        f"{type(module).__name__} at {path} has a {kind}, which folding would drop",
                    )
                return False
        return self.pairs.setdefault(bn_path, ConvBNPair(conv_path, bn_path)).conv == conv_path


def find_conv_bn_pairs(model: nn.Module, *, trace: bool = True) -> tuple[list[ConvBNPair], str]:
    """Conv→BatchNorm (and Linear→BatchNorm1d) pairs that can be folded without changing
    any other computation.

    Found as adjacent children of a plain ``nn.Sequential`` and, with ``trace``, through
    ``torch.fx``: a conv whose only consumer is a BatchNorm. Modules reachable under two names
    or called twice, and modules with hooks, are skipped.

    Returns:
        The pairs, and why tracing failed ("" when it succeeded or was not asked for).
    """
    finder = _PairFinder(model)
    _sequential_pairs(finder)
    error = _traced_pairs(finder) if trace else ""
    return list(finder.pairs.values()), error


def _sequential_pairs(finder: _PairFinder) -> None:
    for path, seq in finder.model.named_modules():
        # A Sequential subclass with its own forward may not run its children in order.
        if isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward:
            prefix = f"{path}." if path else ""
            for first, second in itertools.pairwise(seq._modules):
                finder.add(prefix + first, prefix + second)


class _LeafTracer(fx.Tracer):
    """fx tracer that does not enter data-dependent blocks or TorchScript modules: their
    forwards cannot be traced symbolically, and a failure there would stop the whole trace."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (*self.leaves, torch.jit.ScriptModule)) or super().is_leaf_module(
            module, qualified_name
        )


def _traced_pairs(finder: _PairFinder) -> str:
    """Pairs from a torch.fx trace; returns why tracing failed, or ""."""
    try:
        graph = _LeafTracer(leaf_module_types()).trace(finder.model)
    except Exception as error:  # any tracing failure only skips the traced pairs
        return summarize(error, 160)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if len(source.users) == 1 and calls[node.target] == 1 and calls[source.target] == 1:
            layer = finder.model.get_submodule(source.target)
            if type(layer) is nn.Linear:
                continue  # its output rank is unknown here; the probe pass checks it
            finder.add(source.target, node.target)
    return ""


class _ConsumerCounter(TorchFunctionMode):
    """Counts, per tensor, the torch operations that read it and return a tensor.

    Operations returning no tensor (``.shape``, ``.dim()``) do not depend on the values, so
    folding cannot change them; every other read would see the folded values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(result)):
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor):
                    self.uses[id(leaf)] += 1
        return result


def _probe_pairs(finder: _PairFinder, inputs: tuple) -> tuple[set[str], str]:
    """Pairs seen on a forward of ``inputs``: a BatchNorm whose input *is* (same tensor
    object) the output of a conv called once, read by no other operation.

    Returns the BatchNorm paths of the pairs added, and why the forward failed ("").
    """
    model = finder.model
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive: ids stay unique
    bn_inputs: dict[str, list[torch.Tensor]] = {}
    calls: Counter = Counter()
    counter = _ConsumerCounter()

    def after_layer(path: str) -> Callable:
        def hook(module, args, output):
            calls[path] += 1
            spatial = module.weight.dim() - 2 if isinstance(module, _ConvNd) else 0
            if isinstance(output, torch.Tensor) and output.dim() == spatial + 2:
                outputs[id(output)] = (path, output)
                counter.uses[id(output)] = 0  # an earlier tensor may have had this id

        return hook

    def before_bn(path: str) -> Callable:
        def hook(module, args):
            calls[path] += 1
            bn_inputs.setdefault(path, []).extend(args[:1])

        return hook

    handles = []
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue
        if isinstance(module, _ConvNd | nn.Linear):
            handles.append(module.register_forward_hook(after_layer(path)))
        elif isinstance(module, _BatchNorm):
            handles.append(module.register_forward_pre_hook(before_bn(path)))
    try:
        with counter:
            model(*inputs)
    except Exception as error:  # the probe is optional: a failing forward only skips it
        return set(), summarize(error, 160)
    finally:
        for handle in handles:
            handle.remove()
    added = set()
    for bn_path, received in bn_inputs.items():
        if calls[bn_path] != 1 or id(received[0]) not in outputs:
            continue
        conv_path, tensor = outputs[id(received[0])]
        if tensor is received[0] and calls[conv_path] == 1 and counter.uses[id(tensor)] == 1:
            is_new = bn_path not in finder.pairs
            if finder.add(conv_path, bn_path) and is_new:
                added.add(bn_path)
    return added, ""


def replace_module(model: nn.Module, path: str, replacement: nn.Module) -> None:
    """Put ``replacement`` at dotted ``path`` inside ``model``."""
    parent_name, _, child_name = path.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)


@dataclass
class _Undo:
    """What a fold changed, to put back: the layer's parameters and the BatchNorm."""

    pair: ConvBNPair
    weight: nn.Parameter
    bias: nn.Parameter | None
    bn: nn.Module

    def apply(self, model: nn.Module) -> None:
        layer = model.get_submodule(self.pair.conv)
        layer.weight = self.weight
        layer.bias = self.bias
        replace_module(model, self.pair.bn, self.bn)


def _fold_pairs(model: nn.Module, report: FuseReport, trace: bool, inputs: tuple | None) -> None:
    finder = _PairFinder(model, report)
    _sequential_pairs(finder)
    if trace:
        report.trace_error = _traced_pairs(finder)
        report.traced = not report.trace_error
    probe_only: set[str] = set()
    reference = None
    # The probe forward is for models torch.fx cannot trace: where the trace succeeded it
    # has found every pair already, and the probe (a forward under a TorchFunctionMode, then
    # a second one to check the folds) would cost more than the whole fuse.
    if inputs is not None and not report.traced:
        probe_only, report.probe_error = _probe_pairs(finder, inputs)
        report.probed = not report.probe_error
        if probe_only:
            reference = model(*inputs)
    undo = [_fold(model, pair) for pair in finder.pairs.values()]
    if reference is not None and not _same_outputs(reference, model(*inputs), model):
        for step in undo:
            if step.pair.bn in probe_only:
                step.apply(model)
                report.skip(
                    f"{step.pair.conv} -> {step.pair.bn}",
                    "folding changed the outputs on the example inputs (another operation "
                    "reads the conv output); left unfolded",
                )
        undo = [step for step in undo if step.pair.bn not in probe_only]
    for step in undo:
        report.record(
            LINEAR_BN
            if type(step.bn) is nn.BatchNorm1d
            and type(model.get_submodule(step.pair.conv)) is nn.Linear
            else CONV_BN
        )


def _fold(model: nn.Module, pair: ConvBNPair) -> _Undo:
    layer, bn = model.get_submodule(pair.conv), model.get_submodule(pair.bn)
    check_foldable(bn, pair.bn)
    step = _Undo(pair, layer.weight, layer.bias, bn)
    try:
        if isinstance(layer, nn.Linear):
            fold_bn_into_linear(layer, bn)
        else:
            fold_bn_into_conv(layer, bn)
    except FusionError as error:
        smallest = float((bn.running_var + bn.eps).min()) if bn.running_var is not None else 1.0
        why = f" (eps={bn.eps:g} with a running_var of 0)" if smallest <= 0 else ""
        raise FusionError(f"{pair.bn} ({type(bn).__name__}): {error}{why}") from error
    replace_module(model, pair.bn, nn.Identity())
    return step


def _same_outputs(reference: object, candidate: object, model: nn.Module) -> bool:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    rtol = PROBE_RTOL.get(dtype, PROBE_RTOL_LOW_PRECISION)
    try:
        return all(diff.within(rtol) for diff in compare_outputs(reference, candidate))
    except (TypeError, ValueError):  # outputs that cannot be compared: do not trust the folds
        return False
