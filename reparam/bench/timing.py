"""Side-by-side timing: several candidates interleaved in rotating order, medians and spread.

Every candidate of one comparison runs once per round, in an order that rotates from round
to round, so drift (other processes, frequency scaling) spreads over all candidates instead
of biasing the one measured last; ratios are ratios of medians from the same run.

``torch.utils.benchmark.Timer`` does not fit this protocol: its ``timeit`` adds two untimed
calls before every measurement and ``blocked_autorange`` times one statement in blocks, so
neither interleaves candidates call by call. The samples here come from
``time.perf_counter``, the clock that Timer and ``timeit`` use too.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from reparam.errors import UserInputError

__all__ = ["Timing", "time_candidates", "torch_threads"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: the median and every sample."""

    median: float
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """Interquartile range / median of the samples: how noisy the measurement was."""
        if len(self.samples) < 2 or not self.median:
            return 0.0
        low, _, high = statistics.quantiles(self.samples, n=4)
        return (high - low) / self.median


def time_candidates(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    settle: bool = True,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, Timing]:
    """Time several zero-argument callables side by side, interleaved.

    Each round calls every candidate once; the order rotates by one each round. The first
    ``warmup`` rounds are not recorded (allocator, oneDNN primitive caches, ORT arenas).
    With ``settle``, each timed call follows an untimed call of the same candidate: a
    candidate otherwise pays for the allocator state its predecessor leaves (measured: a
    fused ACBlock ran 30% slower right after its multi-branch form freed its buffers, and
    as fast as a plain conv after itself). Everything runs under ``torch.inference_mode``.

    Args:
        candidates: zero-argument callables by name.
        repeats: timed rounds.
        warmup: untimed rounds first.
        settle: call each candidate once untimed right before timing it.
        progress: called with ``(round, rounds)`` after each round.

    Returns:
        The :class:`Timing` of each candidate, by name.
    """
    if repeats < 1 or warmup < 0:
        raise UserInputError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    rounds = warmup + repeats
    with torch.inference_mode():
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if settle:
                    candidates[name]()
                start = time.perf_counter()
                candidates[name]()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    samples[name].append(elapsed)
            if progress is not None:
                progress(round_index + 1, rounds)
    return {
        name: Timing(statistics.median(values), tuple(values)) for name, values in samples.items()
    }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: leave torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
