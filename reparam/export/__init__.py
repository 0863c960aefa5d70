"""ONNX export and verification.

- :func:`export_onnx`: fuse, export (torch.export-based exporter, legacy as a fallback),
  check, embed metadata, write atomically, and check dynamic axes at other sizes.
- :func:`verify_onnx`: the training-time model against the ONNX graph under onnxruntime.
- :mod:`reparam.ops.corr_onnx`: the ``com.reparam::Corr`` custom operator's ONNX schema and
  translations; :mod:`reparam.ops.corr_ort`: its onnxruntime-extensions kernel.

onnx, onnxruntime and onnxscript are imported when a function needs them, not on import.
"""

from reparam.export.onnx_export import (
    CORR_EXPORT_MODES,
    EXPORTERS,
    ExportError,
    ExportReport,
    export_onnx,
    supported_opsets,
)
from reparam.export.verify import VerifyCase, VerifyReport, verify_onnx

__all__ = [
    "CORR_EXPORT_MODES",
    "EXPORTERS",
    "ExportError",
    "ExportReport",
    "VerifyCase",
    "VerifyReport",
    "export_onnx",
    "supported_opsets",
    "verify_onnx",
]
