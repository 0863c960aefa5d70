"""Dynamic operators: per-sample correlation (a registered PyTorch op) and exact pooling.

Importing this package registers ``torch.ops.reparam.corr``.
"""

from reparam.ops.corr import (
    CORR_MODES,
    corr,
    corr_mode,
    corr_output_size,
    corr_reference,
    corr_standard,
    get_corr_mode,
)
from reparam.ops.pooling import AdaptiveAvgPool2dExact, adaptive_avg_pool2d_exact, pooling_matrix

__all__ = [
    "CORR_MODES",
    "AdaptiveAvgPool2dExact",
    "adaptive_avg_pool2d_exact",
    "corr",
    "corr_mode",
    "corr_output_size",
    "corr_reference",
    "corr_standard",
    "get_corr_mode",
    "pooling_matrix",
]
