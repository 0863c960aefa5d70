"""Look-alike detection: foreign modules that resemble a fusable block but were not adopted.

:func:`suspicion` says why an unrecognised module looks like a multi-branch or dynamic block
(some of a published layout's attribute names, a deploy method reparam does not know, or
a forward that sums convolution branches of one input, found by tracing it with torch.fx),
so the adoption pass can report it instead of passing over it silently.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from reparam.adopt.layouts import LAYOUT_ATTRIBUTES, LAYOUTS

__all__ = ["suspicion"]

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


def suspicion(module: nn.Module) -> str | None:
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
            f"own {methods[0]}() is tried, checked on probe inputs and undone if it changes "
            "the outputs"
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
