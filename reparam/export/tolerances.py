"""Verification options of an export, checked once: tolerances, batch sizes, the fp16 floor.

An exported graph passes when, for every output, max|onnx − torch| ≤ atol or
max|onnx − torch| / max|torch| ≤ rtol. A float16 graph is compared with the float32
training-time model: its 11-bit mantissa gives relative errors around 1e-3 on a deep net
(measured 2e-4 to 2e-3 on the bundled models), so its tolerances are never stricter than
:data:`FP16_RTOL` / :data:`FP16_ATOL` (:meth:`VerifyOptions.for_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reparam.compare import check_tolerance
from reparam.export.verify import DEFAULT_BATCH_SIZES, check_batch_sizes

__all__ = ["DEFAULT_BATCH_SIZES", "FP16_ATOL", "FP16_RTOL", "VerifyOptions", "check_batch_sizes"]

FP16_RTOL = 1e-2
FP16_ATOL = 1e-3


@dataclass(frozen=True)
class VerifyOptions:
    """How :func:`reparam.export.export_onnx` verifies the new file before it replaces anything.

    Attributes:
        rtol, atol: the pass criterion above (checked: finite, ≥ 0).
        batch_sizes: batch sizes tried when the batch axis is dynamic.
        seed: for the random inputs.
        reference_name: what the model is, for the report.
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seed: int = 0
    reference_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rtol", check_tolerance(self.rtol, "rtol"))
        object.__setattr__(self, "atol", check_tolerance(self.atol, "atol"))
        object.__setattr__(self, "batch_sizes", check_batch_sizes(self.batch_sizes))

    def for_dtype(self, half: bool) -> VerifyOptions:
        """These options, with the float16 floor applied to a half-precision graph."""
        if not half:
            return self
        return replace(self, rtol=max(self.rtol, FP16_RTOL), atol=max(self.atol, FP16_ATOL))
