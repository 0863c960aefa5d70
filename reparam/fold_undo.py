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
from torch.nn.modules.batchnorm import _BatchNorm

from reparam.conv_bn_pairs import ConvBNPair, PairFinder, probe_pairs, traced_pairs
from reparam.errors import FusionError, summarize
from reparam.fuse_probe import outputs_agree, scaled_probes
from reparam.fuse_report import CONV_BN, LINEAR_BN, FuseReport
from reparam.module_fusion import check_foldable, fold_bn_into_conv, fold_bn_into_linear

__all__ = ["Undo", "fold_pairs", "replace_module"]


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
    """Fold every proven pair of ``model``, check the folds on ``inputs`` and list every
    BatchNorm left, with why.

    A pair is proven by a torch.fx trace (the conv's only user is the BatchNorm, each called
    once) or by a probe forward on ``inputs`` (the BatchNorm received the very tensor the
    conv returned, read by no other operation). Adjacency in an ``nn.Sequential`` proves
    nothing on its own: a model fx cannot trace may call the Sequential's members one by
    one, tap the conv output, or run only the conv. So without a trace and without example
    inputs no pair is folded (exact or refused), and each BatchNorm says so.
    """
    finder = PairFinder(model, report)
    if trace:
        report.trace_error = traced_pairs(finder)
        report.traced = not report.trace_error
    # The probe forward (under a TorchFunctionMode) is for what the trace cannot show: a
    # model fx cannot trace, or the rank of a Linear's output before a BatchNorm1d.
    if inputs is not None and (not report.traced or finder.linear_candidates):
        only = {bn for _, bn in finder.linear_candidates} if report.traced else None
        _, report.probe_error = probe_pairs(finder, inputs, only)
        report.probed = not report.probe_error
    pairs = list(finder.pairs.values())
    steps = _checked_folds(model, pairs, inputs, report) if inputs is not None else None
    if steps is None:
        steps = [_fold(model, pair) for pair in pairs]
    for step in steps:
        layer = model.get_submodule(step.pair.conv)
        report.record(LINEAR_BN if type(layer) is nn.Linear else CONV_BN)
    _list_left_batchnorms(model, report, finder, inputs is not None)


def _checked_folds(
    model: nn.Module, pairs: list[ConvBNPair], inputs: tuple, report: FuseReport
) -> list[Undo] | None:
    """Fold ``pairs`` and check the model on the example inputs and their negation; when
    the outputs change (or the forward fails: a module may read the BatchNorm's attributes),
    undo all and keep, one by one, only the folds that pass. None when the model's forward
    fails on every probe (nothing to check against: only traced pairs, proven, were found)."""
    if not pairs:
        return []
    probes, reference = [], []
    # A fold is affine-exact; what the check catches is another reader of the conv output or
    # of the BatchNorm, which the example input shows, and its negation where pairs came
    # from the probe (a reader behind a ReLU); traced pairs are proven, the check is a guard.
    scales = (1.0,) if report.traced else (1.0, -1.0)
    for probe in scaled_probes([inputs], scales=scales):
        try:
            reference.append(model(*probe))
            probes.append(probe)
        except Exception:
            continue
    if not probes:
        return None
    dtype = _dtype(model)
    steps = [_fold(model, pair) for pair in pairs]
    if _check(model, probes, reference, dtype) is None:
        return steps
    for step in reversed(steps):
        step.apply(model)
    kept = []
    for index, pair in enumerate(pairs):
        where = f"{pair.conv} -> {pair.bn}"
        if index >= ONE_BY_ONE:
            report.skip(
                where,
                "folding all pairs changed the outputs on the example inputs, "
                f"and only the first {ONE_BY_ONE} are tried one by one; left unfolded",
            )
            continue
        step = _fold(model, pair)
        why = _check(model, probes, reference, dtype)
        if why is None:
            kept.append(step)
            continue
        step.apply(model)
        report.skip(
            where,
            f"folding it changed the model on the example inputs ({why}): "
            "something else reads the conv output or the BatchNorm; left unfolded",
        )
    return kept


# Pairs tried one at a time after a joint fold failed its check (each costs the probes'
# forwards); further pairs are left unfolded and listed.
ONE_BY_ONE = 64


def _check(model: nn.Module, probes: list, reference: list, dtype: torch.dtype) -> str | None:
    try:
        got = [model(*probe) for probe in probes]
    except Exception as error:  # a module reading the removed BatchNorm, say
        return f"the forward fails after the fold: {summarize(error, 120)}"
    return outputs_agree(reference, got, dtype)


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _list_left_batchnorms(
    model: nn.Module, report: FuseReport, finder: PairFinder, probed: bool
) -> None:
    """Every BatchNorm still in ``model`` gets a ``not_fused`` entry saying why it is left
    and how to fold it, unless an entry names it already."""
    listed = [path for path, _ in report.not_fused]
    for path, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or any(
            entry == path or entry.endswith(f"-> {path}") for entry in listed
        ):
            continue
        inside = next((e for e in listed if path.startswith(f"{e}.")), None)
        where = f"inside {inside} (left as it was); " if inside else ""
        report.skip(
            path, f"{type(module).__name__} left: {where}{_why_left(path, report, finder, probed)}"
        )


def _why_left(path: str, report: FuseReport, finder: PairFinder, probed: bool) -> str:
    if path in finder.refused:
        reason = finder.refused[path]
        if any(bn == path for _, bn in finder.linear_candidates) and not probed:
            reason += "; pass example_inputs to fold it"
        return reason
    linear = next((conv for conv, bn in finder.linear_candidates if bn == path), None)
    if linear is not None and not report.probed:
        return (
            f"after {linear}: a Linear→BatchNorm1d pair folds only for a 2-D output, a rank "
            "the fx graph does not hold; pass example_inputs to fold it"
        )
    if linear is not None and report.traced:  # traced adjacent: the probe saw the rank
        return (
            f"after {linear}: its output on example_inputs is not 2-D, so BatchNorm1d "
            "normalises axis 1 while the Linear maps the last axis, and the two do not fold "
            "into one; it stays a BatchNorm (a per-channel affine map in eval mode)"
        )
    if not report.traced and not report.probed:
        why = "trace=False" if report.traced is None else "torch.fx cannot trace the model"
        if report.probed is False:
            return (
                f"{why} and the probe forward failed ({report.probe_error}), so nothing "
                "proves which conv feeds it; fix the forward on example_inputs to fold it"
            )
        return (
            f"{why} and no example_inputs were given, so nothing proves which conv feeds "
            "it (an nn.Sequential's members may be called one by one); pass example_inputs "
            "to fold it"
        )
    calls = (finder.bn_calls or {}).get(path)
    if report.probed and calls == 0:
        return (
            "the forward does not run it on example_inputs, so there is nothing to fold it "
            "into; it stays a BatchNorm"
        )
    if report.probed and calls is not None and calls > 1:
        return (
            f"the forward runs it {calls} times on example_inputs (shared), so no one conv "
            "can absorb it; it stays a BatchNorm (a per-channel affine map in eval mode)"
        )
    return (
        "its input is not the output of a conv or Linear that nothing else reads, so there "
        "is nothing to fold it into; it stays a BatchNorm (a per-channel affine map in eval "
        "mode)"
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
        raise FusionError(f"{pair.bn} ({type(bn).__name__}): {error}") from error
    replace_module(model, pair.bn, nn.Identity())
    return step
