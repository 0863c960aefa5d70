"""Conv→BatchNorm (and Linear→BatchNorm1d) pairs: ``bn(layer(x))`` where nothing else reads
``layer``'s output, so the BatchNorm's affine map can move into ``layer``'s weights.

Three finders add to one :class:`PairFinder`: adjacent children of a plain ``nn.Sequential``;
a ``torch.fx`` trace (registered dynamic blocks are leaves, so they never stop it); and a
probe forward on example inputs that sees which tensor each module received (for models fx
cannot trace). A pair is refused when either module is reachable under two names, carries a
hook or a parametrization (a fold would drop it), or runs a forward that is not torch's own.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from reparam.errors import summarize
from reparam.fuse_report import FuseReport
from reparam.fusers import leaf_module_types

__all__ = [
    "ConvBNPair",
    "PairFinder",
    "hook_kind",
    "probe_pairs",
    "sequential_pairs",
    "traced_pairs",
]


def hook_kind(module: nn.Module) -> str | None:
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


def _torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs a forward defined by torch itself: not a subclass override,
    and not a function put on the instance (``bn.forward = ...``)."""
    return type(module).forward.__module__.startswith("torch.") and "forward" not in vars(module)


def refusal(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn(layer(x))`` is not an affine map of ``layer``'s weights, or None when it is:
    a torch ConvNd or Linear and a torch BatchNorm over its output channels, each running
    torch's own forward."""
    if not isinstance(bn, _BatchNorm):
        return "not a BatchNorm"
    if not isinstance(layer, _ConvNd) and type(layer) is not nn.Linear:
        return (
            f"its input comes from a {type(layer).__name__}, not a conv or Linear, so there "
            "is nothing to fold it into; it stays a BatchNorm (a per-channel affine map in "
            "eval mode)"
        )
    for module in (layer, bn):
        if not _torch_forward(module):
            return f"{type(module).__name__} runs a forward of its own, not torch's"
    if isinstance(layer, _ConvNd):
        if bn.num_features != layer.out_channels:
            return "its channels are not the conv's output channels"
        return None
    if not isinstance(bn, nn.BatchNorm1d) or bn.num_features != layer.out_features:
        return "not a BatchNorm1d over the Linear's output features"
    return None


@dataclass(frozen=True)
class ConvBNPair:
    """A conv (or Linear) whose output feeds only a BatchNorm: ``bn(conv(x))``, by path."""

    conv: str
    bn: str


class PairFinder:
    """Collects pairs from the passes; a pair found by several passes is kept once.

    ``refused`` maps a BatchNorm path to why a candidate pair ending in it was not taken,
    so the report can say why that BatchNorm was left.
    """

    def __init__(self, model: nn.Module, report: FuseReport | None = None):
        self.model = model
        self.report = report
        self.pairs: dict[str, ConvBNPair] = {}
        self.refused: dict[str, str] = {}
        self.linear_candidates: list[tuple[str, str]] = []
        # BatchNorm path -> calls in the probe forward (None: no probe ran), so a BatchNorm
        # the forward skips, or calls twice, is reported as such.
        self.bn_calls: dict[str, int] | None = None
        self.uses = Counter(id(m) for m in model.modules(remove_duplicate=False))

    def add(self, conv_path: str, bn_path: str) -> bool:
        conv, bn = self.model.get_submodule(conv_path), self.model.get_submodule(bn_path)
        if not isinstance(bn, _BatchNorm):
            return False
        why = refusal(conv, bn)
        if why is None and (self.uses[id(conv)] > 1 or self.uses[id(bn)] > 1):
            why = "the conv or the BatchNorm is reachable under two names"
        if why is not None:
            self.refused.setdefault(bn_path, f"after {conv_path}: {why}")
            return False
        for path, module in ((conv_path, conv), (bn_path, bn)):
            kind = hook_kind(module)
            if kind is not None:
                if self.report is not None:
                    self.report.skip(
                        f"{conv_path} -> {bn_path}",
                        f"{type(module).__name__} at {path} has a {kind}, which folding would drop",
                    )
                return False
        return self.pairs.setdefault(bn_path, ConvBNPair(conv_path, bn_path)).conv == conv_path


def sequential_pairs(finder: PairFinder) -> None:
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


def traced_pairs(finder: PairFinder) -> str:
    """Pairs from a torch.fx trace; returns why tracing failed, or ""."""
    try:
        graph = _LeafTracer(leaf_module_types()).trace(finder.model)
    except Exception as error:  # any tracing failure only skips the traced pairs
        return summarize(error, 160)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    # Parameters and buffers the forward reads directly (``self.bn.weight`` in a pad, a
    # conv's weight in an F.conv2d): a fold would change or remove them.
    read = {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if source.target in read or node.target in read:
            why = "the forward also reads its parameters or statistics directly"
            finder.refused.setdefault(node.target, f"after {source.target}: {why}")
            continue
        if len(source.users) == 1 and calls[node.target] == 1 and calls[source.target] == 1:
            layer = finder.model.get_submodule(source.target)
            if type(layer) is nn.Linear:
                # BatchNorm1d normalises dim 1: the Linear's features only for a 2-D output,
                # a rank the graph does not hold; the probe pass sees it
                finder.linear_candidates.append((source.target, node.target))
                continue
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


def probe_pairs(
    finder: PairFinder, inputs: tuple, only: set[str] | None = None
) -> tuple[set[str], str]:
    """Pairs seen on a forward of ``inputs``: a BatchNorm whose input *is* (same tensor
    object) the output of a conv called once, read by no other operation. ``only``: the
    BatchNorm paths to consider (None: all), so a probe run for what a trace could not
    show does not overrule what the trace refused.

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
    finder.bn_calls = {
        path: calls[path]
        for path, module in model.named_modules()
        if isinstance(module, _BatchNorm)
    }
    added = set()
    for bn_path, received in bn_inputs.items():
        if only is not None and bn_path not in only:
            continue
        if calls[bn_path] != 1 or id(received[0]) not in outputs:
            continue
        conv_path, tensor = outputs[id(received[0])]
        if tensor is received[0] and calls[conv_path] == 1 and counter.uses[id(tensor)] == 1:
            is_new = bn_path not in finder.pairs
            if finder.add(conv_path, bn_path) and is_new:
                added.add(bn_path)
    return added, ""
