"""What :func:`reparam.quantize.quantize_onnx` hands back: the report and its per-layer rows.

:class:`QuantizeReport` holds the sizes, latencies, accuracy figures and notes of one
quantization and renders them as ``(key, value)`` rows, text or a JSON-serialisable dict;
:class:`LayerError` is one row of the optional per-layer comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerError:
    """How far one quantized layer's output is from the fp32 graph's (held-out samples)."""

    name: str
    op_type: str
    cosine: float
    max_rel: float
    added: float  # (1 − cosine) of the output minus that of its worst input: this layer's share


@dataclass
class QuantizeReport:
    """What :func:`quantize_onnx` wrote and measured. ``str()`` gives a readable summary."""

    model_path: Path
    output_path: Path | None
    method: str
    per_channel: bool
    calibration: str
    calibration_samples: int
    held_out_samples: int
    fp32_bytes: int
    int8_bytes: int
    latency_ms: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch → fp32, int8
    max_rel: float = 0.0
    mean_rel: float = 0.0
    cosine: float = 1.0
    agreement: float | None = None
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def speedup(self, batch: int) -> float:
        """fp32 latency / INT8 latency at ``batch`` (above 1: INT8 is faster)."""
        fp32, int8 = self.latency_ms[batch]
        return fp32 / int8 if int8 > 0 else math.inf

    def summary(self) -> list[tuple[str, str]]:
        """(key, value) lines for a table or ``key: value`` output."""
        mib = 1024 * 1024
        rows = [
            ("model", str(self.model_path)),
            ("output", str(self.output_path) if self.output_path else "(not written)"),
            (
                "scheme",
                f"static QDQ, u8 activations, s8 weights "
                f"{'per channel' if self.per_channel else 'per tensor'}, {self.method}",
            ),
            (
                "calibration",
                f"{self.calibration}: {self.calibration_samples} samples, "
                f"{self.held_out_samples} held out",
            ),
            (
                "size",
                f"{self.fp32_bytes / mib:.2f} MiB -> {self.int8_bytes / mib:.2f} MiB "
                f"({self.fp32_bytes / max(self.int8_bytes, 1):.2f}x smaller)",
            ),
        ]
        for batch, (fp32, int8) in self.latency_ms.items():
            rows.append(
                (
                    f"latency batch {batch}",
                    f"fp32 {fp32:.2f} ms, int8 {int8:.2f} ms ({self.speedup(batch):.2f}x, one "
                    "thread, median)",
                )
            )
        rows.append(("cosine vs fp32", f"{self.cosine:.5f}"))
        rows.append(("max / mean rel error", f"{self.max_rel:.3g} / {self.mean_rel:.3g}"))
        if self.agreement is not None:
            rows.append(("top-1 agreement", f"{self.agreement:.2%}"))
        quantized = ", ".join(f"{n} {op}" for op, n in sorted(self.quantized_nodes.items()))
        rows.append(("quantized", quantized or "nothing"))
        if self.excluded_nodes:
            rows.append(("kept in float", f"{len(self.excluded_nodes)} node(s)"))
        for layer in self.layers:
            rows.append(
                (
                    f"layer {layer.name}",
                    f"{layer.op_type}: cosine {layer.cosine:.5f}, max rel {layer.max_rel:.3g}, "
                    f"adds {layer.added:.2e}",
                )
            )
        rows.extend(("note", note) for note in self.notes)
        return rows

    def __str__(self) -> str:
        return "\n".join(f"{key}: {value}" for key, value in self.summary())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings, latency keyed by batch as a string)."""
        data = asdict(self)
        data["model_path"] = str(self.model_path)
        data["output_path"] = str(self.output_path) if self.output_path else None
        data["latency_ms"] = {
            str(batch): {"fp32": fp32, "int8": int8, "speedup": self.speedup(batch)}
            for batch, (fp32, int8) in self.latency_ms.items()
        }
        for key in ("max_rel", "mean_rel", "cosine"):
            if not math.isfinite(data[key]):
                data[key] = str(data[key])
        return data
