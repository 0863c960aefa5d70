"""What :func:`reparam.export_onnx` wrote: :class:`ExportReport`, readable and as JSON."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reparam.compare import OutputDiff
from reparam.convert import FuseReport
from reparam.runtime.text import format_shape, format_size, printable

__all__ = ["ExportReport", "format_shape", "format_size", "key_values"]


def key_values(rows: Sequence[tuple[str, str]]) -> list[str]:
    """``key   value`` lines with the keys padded to one width (fits any terminal)."""
    width = max((len(key) for key, _ in rows), default=0)
    return [f"  {key.ljust(width)}  {value}" for key, value in rows]


def _diff_dict(diff: OutputDiff) -> dict[str, Any]:
    return {
        "name": diff.name,
        "shape": list(diff.shape),
        "max_abs": diff.max_abs,
        "max_rel": diff.max_rel,
        "cosine": diff.cosine,
    }


@dataclass
class ExportReport:
    """What :func:`reparam.export_onnx` wrote."""

    path: Path
    exporter: str
    opset: int
    fused: bool
    corr: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[tuple[int | str, ...]]
    output_shapes: list[tuple[int | str, ...]]
    node_counts: Counter
    custom_ops: list[str]
    file_size: int
    metadata: dict[str, str]
    seconds: float
    fuse_report: FuseReport | None = None
    dynamic_check: list[OutputDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dtype: str = "float32"
    check: Any = None  # what the caller's check returned (a VerifyReport for the CLI)

    @property
    def node_total(self) -> int:
        return sum(self.node_counts.values())

    def __str__(self) -> str:
        return (
            f"ExportReport({self.path}: {self.exporter} opset {self.opset}, "
            f"{self.node_total} nodes, {format_size(self.file_size)}, {self.seconds:.1f} s)"
        )

    def summary(self) -> str:
        """The graph's inputs and outputs, nodes by type, size, checks and notes; one
        ``key  value`` row per line."""
        rows = [
            ("file", printable(str(self.path))),
            ("exporter", f"{self.exporter} (opset {self.opset})"),
            ("fused", "yes" if self.fused else "no"),
            ("dtype", self.dtype),
            ("corr", self.corr),
        ]
        rows += [
            (f"input {printable(name)}", format_shape(shape))
            for name, shape in zip(self.input_names, self.input_shapes, strict=True)
        ]
        rows += [
            (f"output {printable(name)}", format_shape(shape))
            for name, shape in zip(self.output_names, self.output_shapes, strict=True)
        ]
        rows += [
            ("custom operators", ", ".join(self.custom_ops) or "none"),
            ("file size", format_size(self.file_size)),
        ]
        if self.dynamic_check:
            worst = max(diff.max_rel for diff in self.dynamic_check)
            rows.append(("dynamic axes check", f"max rel {worst:.3g} at other sizes"))
        rows.append(("export time", f"{self.seconds:.2f} s"))
        counts = sorted(self.node_counts.items(), key=lambda item: (-item[1], item[0]))
        ops = ", ".join(f"{op} {count}" for op, count in counts)
        rows.append((f"nodes ({self.node_total})", ops))
        lines = ["graph:", *key_values(rows)]
        if self.notes:
            lines += ["notes:", *(f"  {note}" for note in self.notes)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (``json.dumps`` works on the result)."""
        result = {
            "path": str(self.path),
            "exporter": self.exporter,
            "opset": self.opset,
            "fused": self.fused,
            "dtype": self.dtype,
            "corr": self.corr,
            "inputs": [
                {"name": n, "shape": list(s)}
                for n, s in zip(self.input_names, self.input_shapes, strict=True)
            ],
            "outputs": [
                {"name": n, "shape": list(s)}
                for n, s in zip(self.output_names, self.output_shapes, strict=True)
            ],
            "node_counts": dict(self.node_counts),
            "node_total": self.node_total,
            "custom_ops": list(self.custom_ops),
            "file_size": self.file_size,
            "metadata": dict(self.metadata),
            "seconds": self.seconds,
            "dynamic_check": [_diff_dict(d) for d in self.dynamic_check],
            "notes": list(self.notes),
        }
        if self.fuse_report is not None:
            result["fuse"] = self.fuse_report.to_dict()
        if hasattr(self.check, "to_dict"):
            result["verify"] = self.check.to_dict()
        return result
