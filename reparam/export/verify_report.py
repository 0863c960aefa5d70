"""What :func:`reparam.verify_onnx` found: :class:`VerifyCase` per run, :class:`VerifyReport`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reparam.compare import OutputDiff
from reparam.runtime.text import format_shape, printable

__all__ = ["VerifyCase", "VerifyReport"]


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join("x".join(map(str, shape)) for shape in shapes)


@dataclass
class VerifyCase:
    """One comparison: an input set under one ORT optimisation level."""

    optimization: str
    input_shapes: list[tuple[int, ...]]
    diffs: list[OutputDiff]
    error: str = ""

    def ok(self, rtol: float, atol: float) -> bool:
        return not self.error and all(d.within(rtol, atol) for d in self.diffs)


@dataclass
class VerifyReport:
    """All comparisons of :func:`reparam.verify_onnx`; ``ok`` when every one is within
    tolerance.

    An output is within tolerance when max abs error ≤ atol or max abs error / max
    |reference| ≤ rtol (:meth:`reparam.compare.OutputDiff.within`).
    """

    path: Path
    rtol: float
    atol: float
    providers: list[str]
    output_names: list[str]
    cases: list[VerifyCase] = field(default_factory=list)
    reference: str = ""  # what the graph was compared with, for the summary
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(case.ok(self.rtol, self.atol) for case in self.cases)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({case.input_shapes[0][0] for case in self.cases if case.input_shapes[0]})

    def worst(self) -> list[OutputDiff]:
        """Per output: the largest errors and the smallest cosine over all cases."""
        worst: dict[str, OutputDiff] = {}
        for case in self.cases:
            for diff in case.diffs:
                old = worst.get(diff.name)
                if old is None:
                    worst[diff.name] = diff
                    continue
                worst[diff.name] = OutputDiff(
                    diff.name,
                    old.shape,
                    max(old.max_abs, diff.max_abs),
                    max(old.max_rel, diff.max_rel),
                    min(old.cosine, diff.cosine),
                )
        return list(worst.values())

    def failures(self) -> list[str]:
        """One line per case or output beyond tolerance, with its numbers."""
        lines = []
        for case in self.cases:
            where = f"ORT optimizations {case.optimization}, inputs {_shapes(case.input_shapes)}"
            if case.error:
                lines.append(f"{where}: {case.error}")
            for diff in case.diffs:
                if not diff.within(self.rtol, self.atol):
                    lines.append(
                        f"{where}: output '{printable(diff.name)}' max abs {diff.max_abs:.3g} "
                        f"(atol {self.atol:g}), max rel {diff.max_rel:.3g} (rtol {self.rtol:g}), "
                        f"cosine {diff.cosine:.9f}"
                    )
        return lines

    def failure_summary(self) -> str:
        """A one-line account of the worst failure, for error messages."""
        failures = self.failures()
        if not failures:
            return "within tolerance"
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"ONNX output differs from the PyTorch model: {failures[0]}{more}"

    def __str__(self) -> str:
        state = "OK" if self.ok else "FAILED"
        return (
            f"VerifyReport({self.path}: {state}, {len(self.cases)} runs, batch sizes "
            f"{','.join(map(str, self.batch_sizes))})"
        )

    def summary(self) -> str:
        """Per output the worst errors over every run, then OK or the failures."""
        against = f" against {self.reference}" if self.reference else ""
        batches = ",".join(map(str, self.batch_sizes))
        lines = [
            f"verify {printable(str(self.path))}{against}",
            f"onnxruntime {', '.join(self.providers)}; optimizations disabled and all; "
            f"batch sizes {batches}; {len(self.cases)} runs",
        ]
        for diff in self.worst():
            per_sample = format_shape(diff.shape[1:]) if diff.shape else ""
            lines.append(
                f"  output {printable(diff.name)}  per sample {per_sample}  "
                f"max abs {diff.max_abs:.3g}  max rel {diff.max_rel:.3g}  "
                f"min cosine {diff.cosine:.9f}"
            )
        if self.ok:
            lines.append(f"OK: within rtol {self.rtol:g} / atol {self.atol:g}")
        else:
            lines += ["FAILED:", *(f"  {line}" for line in self.failures())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "rtol": self.rtol,
            "atol": self.atol,
            "providers": list(self.providers),
            "reference": self.reference,
            "batch_sizes": self.batch_sizes,
            "seconds": self.seconds,
            "worst": [
                {
                    "name": d.name,
                    "shape": list(d.shape),
                    "max_abs": d.max_abs,
                    "max_rel": d.max_rel,
                    "cosine": d.cosine,
                }
                for d in self.worst()
            ],
            "cases": [
                {
                    "optimization": case.optimization,
                    "input_shapes": [list(s) for s in case.input_shapes],
                    "error": case.error,
                    "ok": case.ok(self.rtol, self.atol),
                    "outputs": [
                        {
                            "name": d.name,
                            "max_abs": d.max_abs,
                            "max_rel": d.max_rel,
                            "cosine": d.cosine,
                        }
                        for d in case.diffs
                    ],
                }
                for case in self.cases
            ],
            "failures": self.failures(),
        }
