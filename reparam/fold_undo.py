"""Fold the Conv→BatchNorm pairs of a model, checking and undoing what cannot be trusted.

A fold replaces ``layer``'s weight and bias by new Parameters (W' = W·γ/σ per output
channel, b' = β + (b − μ)·γ/σ, :mod:`reparam.module_fusion`) and the BatchNorm by
``nn.Identity`` in the original module tree, so the model keeps its class and forward. Each
fold keeps an :class:`Undo` record (the old Parameters and the BatchNorm) so that a fold the
probe check rejects is put back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reparam.compare import compare_outputs
from reparam.conv_bn_pairs import (
    ConvBNPair,
    PairFinder,
    probe_pairs,
    sequential_pairs,
    traced_pairs,
)
from reparam.errors import FusionError
from reparam.fuse_report import CONV_BN, LINEAR_BN, FuseReport
from reparam.module_fusion import check_foldable, fold_bn_into_conv, fold_bn_into_linear

__all__ = ["PROBE_RTOL", "Undo", "fold_pairs", "replace_module"]

# Largest relative output change accepted when checking probe-found folds on the probe input.
PROBE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
PROBE_RTOL_LOW_PRECISION = 2e-2


def replace_module(model: nn.Module, path: str, replacement: nn.Module) -> None:
    """Put ``replacement`` at dotted ``path`` inside ``model``."""
    parent_name, _, child_name = path.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)


@dataclass
class Undo:
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


def fold_pairs(model: nn.Module, report: FuseReport, trace: bool, inputs: tuple | None) -> None:
    finder = PairFinder(model, report)
    sequential_pairs(finder)
    if trace:
        report.trace_error = traced_pairs(finder)
        report.traced = not report.trace_error
    probe_only: set[str] = set()
    reference = None
    # The probe forward is for models torch.fx cannot trace: where the trace succeeded it
    # has found every pair already, and the probe (a forward under a TorchFunctionMode, then
    # a second one to check the folds) would cost more than the whole fuse.
    if inputs is not None and not report.traced:
        probe_only, report.probe_error = probe_pairs(finder, inputs)
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


def _fold(model: nn.Module, pair: ConvBNPair) -> Undo:
    layer, bn = model.get_submodule(pair.conv), model.get_submodule(pair.bn)
    check_foldable(bn, pair.bn)
    step = Undo(pair, layer.weight, layer.bias, bn)
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
