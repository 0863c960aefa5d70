"""Timed runs (onnxruntime or OpenVINO): :func:`run_timed` and its :class:`RunReport`."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reparam.runtime.graph_io import GraphModel
from reparam.runtime.text import printable

__all__ = ["RunReport", "run_timed"]


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape)


@dataclass
class RunReport:
    """One warm-up run's outputs and the times of the repeated runs after it."""

    path: Path
    opset: int
    node_count: int
    providers: list[str]
    threads: int
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    seconds: list[float]
    source: str = "random normal"
    notes: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else float("nan")

    @property
    def min_ms(self) -> float:
        return min(self.seconds) * 1000 if self.seconds else float("nan")

    def __str__(self) -> str:
        return (
            f"RunReport({self.path}: median {self.median_ms:.3f} ms over {len(self.seconds)} runs)"
        )

    def summary(self) -> str:
        """Inputs, outputs with their statistics, and the timing."""
        lines = [
            f"reparam run: {printable(str(self.path))} (opset {self.opset}, {self.node_count} "
            f"nodes, {', '.join(self.providers)}, {self.threads} threads)",
        ]
        for name, array in self.inputs.items():
            lines.append(
                f"  input {printable(name)}  {_shape(array.shape)}  {array.dtype}  {self.source}"
            )
        for name, array in self.outputs.items():
            values = (
                f"min {array.min():.4g}  max {array.max():.4g}  mean {array.mean():.4g}"
                if array.size
                else "empty"
            )
            lines.append(
                f"  output {printable(name)}  {_shape(array.shape)}  {array.dtype}  {values}"
            )
        lines.append(
            f"time per run: median {self.median_ms:.3f} ms, min {self.min_ms:.3f} ms "
            f"over {len(self.seconds)} runs (after 1 warm-up)"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: shapes, dtypes, output statistics and times in seconds."""

        def stats(array: np.ndarray) -> dict[str, Any]:
            entry: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
            if array.size:
                entry.update(
                    min=float(array.min()), max=float(array.max()), mean=float(array.mean())
                )
            return entry

        return {
            "path": str(self.path),
            "opset": self.opset,
            "node_count": self.node_count,
            "providers": list(self.providers),
            "threads": self.threads,
            "source": self.source,
            "inputs": {name: stats(a) for name, a in self.inputs.items()},
            "outputs": {name: stats(a) for name, a in self.outputs.items()},
            "seconds": list(self.seconds),
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "notes": list(self.notes),
        }


def run_timed(
    session: GraphModel,
    feeds: dict[str, np.ndarray],
    repeat: int = 10,
    source: str = "random normal",
) -> RunReport:
    """Run once (warm-up; its outputs are reported), then ``repeat`` timed runs."""
    outputs = session.run(feeds)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run_feeds(feeds)  # inputs already checked by the warm-up
        seconds.append(time.perf_counter() - start)
    return RunReport(
        path=session.path,
        opset=session.opset,
        node_count=session.node_count,
        providers=list(session.providers),
        threads=session.threads,
        inputs=feeds,
        outputs=outputs,
        seconds=seconds,
        source=source,
    )
