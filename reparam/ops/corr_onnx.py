"""``com.reparam::Corr`` in ONNX, one import for callers: schema, function and validation.

The pieces live in their own modules; this one re-exports them:

- :mod:`reparam.ops.corr_schema`: the node's schema, its shape inference and the exporters'
  translations (torch.export-based table, legacy symbolic);
- :mod:`reparam.ops.corr_function`: the node's meaning as a model-local ONNX function of
  standard operators, written in onnxscript, and :func:`attach_corr_function`;
- :mod:`reparam.ops.corr_validation`: the checks a graph read from a file gets.
"""

from __future__ import annotations

from reparam.ops.corr_function import FUNCTION_OPSET, attach_corr_function, corr_function_proto
from reparam.ops.corr_schema import (
    ATTRIBUTE_DEFAULTS,
    DOMAIN,
    DOMAIN_VERSION,
    OP_TYPE,
    _op_defaults,
    register_legacy_symbolic,
    register_schema,
    translation_table,
)
from reparam.ops.corr_validation import corr_nodes, validate_corr_nodes

__all__ = [
    "ATTRIBUTE_DEFAULTS",
    "DOMAIN",
    "DOMAIN_VERSION",
    "FUNCTION_OPSET",
    "OP_TYPE",
    "_op_defaults",
    "attach_corr_function",
    "corr_function_proto",
    "corr_nodes",
    "register_legacy_symbolic",
    "register_schema",
    "translation_table",
    "validate_corr_nodes",
]
