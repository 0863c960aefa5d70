"""Structural summary of a model (parameters, layers by kind) and the fuse report behind
``reparam fuse``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from reparam.compare import OutputDiff, compare_outputs
from reparam.convert import FuseReport, fuse_with_report

__all__ = ["FuseRun", "ModelStats", "fuse_and_check", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    conv_layers: int
    batchnorms: int


def model_stats(model: nn.Module) -> ModelStats:
    """Parameter count and the number of conv and BatchNorm layers."""
    modules = list(model.modules())
    return ModelStats(
        parameters=sum(p.numel() for p in model.parameters()),
        conv_layers=sum(isinstance(m, _ConvNd) for m in modules),
        batchnorms=sum(isinstance(m, _BatchNorm) for m in modules),
    )


@dataclass
class FuseRun:
    """A fused model with everything ``reparam fuse`` reports about it."""

    fused: nn.Module
    report: FuseReport
    before: ModelStats
    after: ModelStats
    diffs: list[OutputDiff]
    fuse_seconds: float

    @property
    def max_abs(self) -> float:
        return max(d.max_abs for d in self.diffs)

    @property
    def max_rel(self) -> float:
        return max(d.max_rel for d in self.diffs)

    def to_dict(self) -> dict:
        """Everything but the model, as plain JSON-able types."""
        return {
            "report": self.report.to_dict(),
            "before": dataclasses.asdict(self.before),
            "after": dataclasses.asdict(self.after),
            "outputs": [dataclasses.asdict(diff) for diff in self.diffs],
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "fuse_seconds": self.fuse_seconds,
        }


def fuse_and_check(
    model: nn.Module, probe_inputs: Sequence[torch.Tensor], *, trace: bool = True
) -> FuseRun:
    """Fuse a copy of ``model`` and compare both on ``probe_inputs`` (eval mode).

    The probe inputs also serve as the fuse's example inputs, so Conv→BN pairs fold in
    models that torch.fx cannot trace.
    """
    model.eval()
    start = time.perf_counter()
    fused, report = fuse_with_report(model, trace=trace, example_inputs=tuple(probe_inputs))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        diffs = compare_outputs(model(*probe_inputs), fused(*probe_inputs))
    return FuseRun(fused, report, model_stats(model), model_stats(fused), diffs, seconds)
