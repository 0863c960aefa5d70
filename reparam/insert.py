"""Turn an existing network into a training-time ACNet: ``expand(model, "acnet")``.

Kept for the name earlier releases documented; :func:`reparam.expansion.expand` does the
work for every family (ACNet, RepVGG, DBB, MobileOne, QARepVGG) and says why each conv it
leaves alone was left alone.
"""

from __future__ import annotations

import copy

from torch import nn

from reparam.expansion import NothingToExpandError, expand_with_report

__all__ = ["convert_to_acblocks"]


def convert_to_acblocks(
    model: nn.Module, *, inplace: bool = False, trace: bool = True
) -> tuple[nn.Module, int]:
    """``expand(model, "acnet")``, returning the model and how many convs were expanded.

    Each odd KxK Conv2d (K > 1) with its BatchNorm becomes an ACBlock (inside an
    :class:`~reparam.expansion.ExpandedConv`) whose square branch holds the original kernel
    and BatchNorm; the Kx1 and 1xK branches start with BN γ = β = 0, so the outputs are
    unchanged. A network with nothing to convert comes back unchanged (a copy), with 0.
    """
    try:
        converted, report = expand_with_report(model, "acnet", trace=trace, inplace=inplace)
    except NothingToExpandError:
        return (model if inplace else copy.deepcopy(model)), 0
    return converted, len(report.expanded)
