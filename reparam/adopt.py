"""Adopt users' own copies of published blocks into reparam's blocks.

Filled in incrementally; the interface is stable.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AdoptionNote:
    """What happened to one foreign block-like module."""

    path: str  # module path in the model
    foreign_type: str  # the user's class name (qualified)
    adopted_as: str | None  # reparam block class name, or None if left alone
    reason: str  # why adopted / why not


def adopt_foreign_blocks(model: nn.Module) -> list[AdoptionNote]:
    """Replace recognised foreign blocks in `model` (in place) by reparam blocks."""
    return []
