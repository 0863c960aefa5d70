"""``com.reparam::Corr`` under onnxruntime, as a Python custom op of onnxruntime-extensions.

The kernel calls ``torch.ops.reparam.corr`` itself on CPU tensors, so the ONNX node computes
exactly what the PyTorch operator computes. It is a convenience for graphs exported with
``corr="custom"``: a Python op costs a round trip through the interpreter and a copy of its
output (REFERENCE.md §4: ~12× slower than the standard-op decomposition); export with
``corr="standard"`` (the default) for deployment. float32 only.
"""

from __future__ import annotations

from reparam.errors import UserInputError
from reparam.ops.corr_onnx import DOMAIN, OP_TYPE

__all__ = ["MISSING_EXTENSIONS", "custom_ops_library"]

MISSING_EXTENSIONS = (
    f"this ONNX model uses the custom operator {DOMAIN}::{OP_TYPE}, which runs under "
    "onnxruntime through onnxruntime-extensions: pip install 'reparam[custom-ops]' (or pip "
    "install onnxruntime-extensions), or export with --corr standard for a graph of standard "
    "ONNX operators"
)

_library_path: str | None = None


def custom_ops_library() -> str:
    """Register the Corr kernel (once) and return the library path for SessionOptions.

    Raises:
        UserInputError: onnxruntime-extensions is not installed.
    """
    global _library_path
    if _library_path is not None:
        return _library_path
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise UserInputError(MISSING_EXTENSIONS) from None
    import torch

    import reparam.ops.corr  # noqa: F401  (registers torch.ops.reparam.corr)

    int64 = PyCustomOpDef.dt_int64

    @onnx_op(
        op_type=f"{DOMAIN}::{OP_TYPE}",
        inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
        outputs=[PyCustomOpDef.dt_float],
        attrs={"groups": int64, "stride": int64, "padding": int64, "dilation": int64},
    )
    def corr(x, kernel, groups=1, stride=1, padding=0, dilation=1):
        with torch.no_grad():
            out = torch.ops.reparam.corr(
                torch.from_numpy(x), torch.from_numpy(kernel), groups, stride, padding, dilation
            )
        return out.numpy()

    _library_path = get_library_path()
    return _library_path
