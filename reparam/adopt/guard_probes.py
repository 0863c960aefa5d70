"""Adoption probes on the other side of a copy's own size guards (:mod:`reparam.size_guards`).

A pasted copy may branch on its input's size or batch (``y * 0.5 if x.shape[-1] > 40``);
fixed probe sizes see one side only. torch.export records each such branch as a guard, and a
probe where the guard is false is added, so the copy is compared on both sides.
"""

from __future__ import annotations

from torch import nn

from reparam.adopt.parts import Probe
from reparam.size_guards import flip_inputs

__all__ = ["guard_probes"]


def guard_probes(foreign: nn.Module, first: Probe) -> list[Probe]:
    """Probes that flip ``foreign``'s single-axis size guards traced on ``first``."""
    return [Probe(inputs, label) for inputs, label in flip_inputs(foreign, first.inputs)]
