"""ONNX export and verification.

- :func:`export_onnx`: fuse, export (torch.export-based exporter, legacy as a fallback),
  check, embed metadata (with the valid range of every symbolic axis), check dynamic axes at
  other sizes and verify the temporary file (``verify=`` :class:`VerifyOptions`), then
  replace the target atomically.
- :func:`verify_onnx`: the training-time model against the ONNX graph under onnxruntime.
- :mod:`reparam.ops.corr_onnx`: the ``com.reparam::Corr`` custom operator's ONNX schema,
  translations, function and validation; :mod:`reparam.ops.corr_ort`: its
  onnxruntime-extensions kernel.

onnx, onnxruntime and onnxscript are imported when a function needs them, not on import.
"""

from reparam.errors import ExportError
from reparam.export.onnx_export import (
    CORR_EXPORT_MODES,
    EXPORTERS,
    ExportVerificationError,
    export_onnx,
    supported_opsets,
)
from reparam.export.report import ExportReport
from reparam.export.signature import InputTree
from reparam.export.tolerances import VerifyOptions
from reparam.export.verify import verify_onnx
from reparam.export.verify_report import VerifyCase, VerifyReport

__all__ = [
    "CORR_EXPORT_MODES",
    "EXPORTERS",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "InputTree",
    "VerifyCase",
    "VerifyOptions",
    "VerifyReport",
    "export_onnx",
    "supported_opsets",
    "verify_onnx",
]
