"""The targets a benchmark row is judged by, and the verdict: met, missed, or noisy.

A ratio that misses its limit by less than the spread of the timings behind it is
"noisy", not "missed": the medians cannot tell the two apart. The spread is each timing's
interquartile range / median (see :attr:`reparam.bench.timing.Timing.spread`).
"""

from __future__ import annotations

from collections.abc import Iterable

from reparam.bench.timing import Timing

__all__ = [
    "BLOCK_TARGET",
    "MODEL_LIMIT_TARGET",
    "MODEL_SPEEDUP_TARGET",
    "ORT_TARGET",
    "SPEEDUP_TARGETS",
    "verdict",
]

BLOCK_TARGET = 1.05
"""A fused block runs within this factor of a plain conv of the same shape."""
MODEL_LIMIT_TARGET = 1.05
"""A fused model runs within this factor of the plain network it fuses down to."""
MODEL_SPEEDUP_TARGET = 1.5
"""The fused ACNet ResNet-18 runs at least this much faster than its training-time form."""
ORT_TARGET = 1.0
"""onnxruntime is no slower than torch eager on a fused model."""
SPEEDUP_TARGETS = {"acnet_resnet18": MODEL_SPEEDUP_TARGET}
"""Models with a training-form / fused speed-up target."""


def verdict(
    ratio: float, limit: float, timings: Iterable[Timing], *, at_least: bool = False
) -> str:
    """``"met"``, ``"missed"`` or ``"noisy"`` for ``ratio`` against ``limit``.

    Args:
        ratio: the measured ratio of two medians.
        limit: the most it may be (or with ``at_least``, the least).
        timings: the timings the ratio is made of; their largest spread is the noise.
        at_least: the ratio must reach ``limit`` instead of staying below it.
    """
    met = ratio >= limit if at_least else ratio <= limit
    if met:
        return "met"
    miss = limit / ratio - 1 if at_least else ratio / limit - 1
    spread = max((t.spread for t in timings), default=0.0)
    return "noisy" if spread >= miss else "missed"
