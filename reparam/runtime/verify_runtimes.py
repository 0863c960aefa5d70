"""Check a graph against the PyTorch model in each runtime users ship on.

:func:`verify_runtimes` runs :func:`reparam.export.verify_onnx` for onnxruntime and the same
comparison (:func:`verify_openvino`) for OpenVINO, and keeps each runtime's outcome apart: a
runtime that is not installed, or that cannot load or run the graph, gets its one-line
error, and the other runtimes are still checked and reported.

The comparison is verify_onnx's: inputs drawn once at the largest batch, each batch size a
leading slice, outputs compared with :func:`reparam.compare.compare_outputs` (an output
passes when max|graph − torch| ≤ atol or max|graph − torch| / max|torch| ≤ rtol).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from reparam.errors import ReparamError, printable
from reparam.export.verify import DEFAULT_BATCH_SIZES
from reparam.export.verify_report import VerifyReport

__all__ = [
    "RUNTIMES",
    "OpenVinoReport",
    "RuntimeResults",
    "parse_runtimes",
    "verify_openvino",
    "verify_runtimes",
]

RUNTIMES = ("onnxruntime", "openvino")

Progress = Callable[[str], None]


def parse_runtimes(text: str) -> list[str]:
    """``onnxruntime``, ``openvino``, ``all`` or a comma list → runtime names in order.

    Raises:
        UserInputError: an unknown name.
    """
    from reparam.errors import UserInputError

    names: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        chosen = list(RUNTIMES) if part == "all" else [part]
        for name in chosen:
            if name not in RUNTIMES:
                raise UserInputError(
                    f"--runtime '{printable(part)}' is not one of {', '.join(RUNTIMES)}, all"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise UserInputError(f"--runtime must name one of {', '.join(RUNTIMES)}, all")
    return names


class OpenVinoReport(VerifyReport):
    """:class:`VerifyReport` whose lines name OpenVINO instead of ORT's optimisation levels
    (the report's wording is onnxruntime's; its numbers and verdicts are the same)."""

    def failures(self) -> list[str]:
        return [
            line.replace("ORT optimizations openvino, ", "OpenVINO, ")
            for line in super().failures()
        ]

    def failure_summary(self) -> str:
        return super().failure_summary().replace("ONNX output differs", "OpenVINO output differs")

    def summary(self) -> str:
        return (
            super()
            .summary()
            .replace(
                "onnxruntime " + ", ".join(self.providers) + "; optimizations disabled and all; ",
                ", ".join(self.providers) + "; ",
            )
        )


def verify_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Any = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
    progress: Progress | None = None,
    reference_name: str = "",
) -> VerifyReport:
    """Compare the graph at ``path`` (``.onnx`` or OpenVINO ``.xml``) run by OpenVINO with
    ``model``; arguments and result as :func:`reparam.export.verify_onnx`.

    Raises:
        RuntimeNotInstalledError: openvino is not installed.
        UserInputError: the graph cannot be converted or compiled; bad inputs or tolerances.
    """
    from reparam.export.verify import _check_tolerances, compare_sessions
    from reparam.runtime.openvino import OpenVinoModel

    started = time.perf_counter()
    sizes = _check_tolerances(rtol, atol, batch_sizes)
    say = progress or (lambda line: None)
    say("verify: converting the graph for OpenVINO")
    session = OpenVinoModel(path)
    report = OpenVinoReport(
        Path(path), rtol, atol, session.providers, session.output_names, reference=reference_name
    )
    dynamic_batch = bool(session.inputs) and all(
        spec.declared and spec.shape and not isinstance(spec.shape[0], int)
        for spec in session.inputs
    )
    compare_sessions(
        model, {"openvino": session}, report, inputs, batch_sizes=sizes, seed=seed,
        dynamic_batch=dynamic_batch, runtime="OpenVINO", say=say,
    )  # fmt: skip
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class RuntimeResults:
    """Each runtime's :class:`VerifyReport`, or the one line saying why it has none."""

    reports: dict[str, VerifyReport] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(report.ok for report in self.reports.values())

    def summary(self) -> str:
        lines = []
        for name, report in self.reports.items():
            lines.append(f"[{name}] {report.summary()}")
        for name, error in self.errors.items():
            lines.append(f"[{name}] error: {error}")
        return "\n".join(lines)

    def failure_summary(self) -> str:
        """One line: which runtimes failed and why."""
        parts = [f"{name}: {error}" for name, error in self.errors.items()]
        parts += [
            f"{name}: {report.failure_summary()}"
            for name, report in self.reports.items()
            if not report.ok
        ]
        return "verification failed in " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runtimes": {name: report.to_dict() for name, report in self.reports.items()},
            "errors": dict(self.errors),
        }


def verify_runtimes(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Any = None,
    *,
    runtimes: Sequence[str] = ("onnxruntime",),
    progress: Progress | None = None,
    **options: Any,
) -> RuntimeResults:
    """:func:`reparam.export.verify_onnx` / :func:`verify_openvino` for each of ``runtimes``.

    A runtime whose check raises a reparam error (not installed, graph not loadable, inputs
    it refuses) gets that error's one line in ``errors``; the others still run.
    """
    from reparam.export.verify import verify_onnx

    checks = {"onnxruntime": verify_onnx, "openvino": verify_openvino}
    results = RuntimeResults()
    for name in runtimes:
        try:
            results.reports[name] = checks[name](model, path, inputs, progress=progress, **options)
        except ReparamError as error:
            results.errors[name] = " ".join(str(error).split())
    return results
