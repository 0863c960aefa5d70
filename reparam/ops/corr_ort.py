"""``com.reparam::Corr`` under onnxruntime, as a Python custom op of onnxruntime-extensions.

The kernel calls ``torch.ops.reparam.corr`` itself on CPU tensors, so the ONNX node computes
exactly what the PyTorch operator computes. It is a convenience for graphs exported with
``corr="custom"``: a Python op costs a round trip through the interpreter and a copy of its
output (measured 6–12× slower than the standard-op decomposition); export with
``corr="standard"`` (the default) for deployment. float32 only.

onnxruntime-extensions calls the Python function from C++ and any exception it raises ends
in ``std::terminate`` (the process aborts, no error line). So the kernel never raises: it
validates its attributes and input shapes before any work, catches everything else, and on
a failure records the message (:func:`pop_kernel_errors`) and returns an output filled
with NaN, which a caller can detect. Graphs should also be checked when they are loaded
(:func:`reparam.ops.corr_onnx.validate_corr_nodes`), so that a crafted node is refused
before it ever runs.
"""

from __future__ import annotations

import threading

import numpy as np

from reparam.errors import MissingCustomOpError
from reparam.ops.corr_onnx import DOMAIN, OP_TYPE

__all__ = ["MISSING_EXTENSIONS", "check_kernel_call", "custom_ops_library", "pop_kernel_errors"]

MAX_ATTRIBUTE = 1 << 16
MAX_OUTPUT_ELEMENTS = 1 << 31  # ~8 GiB of float32: refuse rather than die allocating

MISSING_EXTENSIONS = (
    f"this ONNX model uses the custom operator {DOMAIN}::{OP_TYPE}, which runs under "
    "onnxruntime through onnxruntime-extensions: pip install 'reparam[custom-ops]' (or pip "
    "install onnxruntime-extensions), or export with --corr standard for a graph of standard "
    "ONNX operators"
)

_library_path: str | None = None
_errors: list[str] = []
_errors_lock = threading.Lock()


def pop_kernel_errors() -> list[str]:
    """Messages of the kernel calls that failed since the last call (oldest first), cleared."""
    with _errors_lock:
        errors = list(_errors)
        _errors.clear()
    return errors


def _record(message: str) -> None:
    with _errors_lock:
        _errors.append(message)
        del _errors[:-100]  # keep the latest only: a long-running service must not grow


def check_kernel_call(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    groups: int,
    stride: int,
    padding: int,
    dilation: int,
) -> tuple[int, int, int, int]:
    """The output shape of a Corr call, or ``ValueError`` saying what is wrong with it."""
    for name, value, lowest in (
        ("groups", groups, 1),
        ("stride", stride, 1),
        ("dilation", dilation, 1),
        ("padding", padding, 0),
    ):
        if not lowest <= value <= MAX_ATTRIBUTE:
            raise ValueError(f"{name}={value} must be between {lowest} and {MAX_ATTRIBUTE}")
    if len(x_shape) != 4 or len(kernel_shape) != 5:
        raise ValueError(
            f"x must have rank 4 and kernel rank 5, got shapes {x_shape} and {kernel_shape}"
        )
    batch, channels, height, width = x_shape
    kernel_batch, out_channels, per_group, kh, kw = kernel_shape
    if kernel_batch != batch:
        raise ValueError(f"kernel batch {kernel_batch} differs from input batch {batch}")
    if channels % groups or out_channels % groups or per_group * groups != channels:
        raise ValueError(
            f"x has {channels} channels and the kernel {out_channels} outputs with {per_group} "
            f"channels per group: inconsistent with groups={groups}"
        )
    out_h = (height + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    if kh < 1 or kw < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {height}x{width} input")
    if batch * out_channels * out_h * out_w > MAX_OUTPUT_ELEMENTS:
        raise ValueError(f"output {batch}x{out_channels}x{out_h}x{out_w} is too large")
    return batch, out_channels, out_h, out_w


def _failed_output(x: object, kernel: object) -> np.ndarray:
    """A NaN output of the shape the graph expects where that can be known, else (0,)."""
    try:
        batch, out_channels = int(x.shape[0]), int(kernel.shape[1])  # type: ignore[attr-defined]
        return np.full((batch, out_channels, 1, 1), np.nan, dtype=np.float32)
    except Exception:  # no shape to go by: an empty tensor still crosses the boundary safely
        return np.zeros((0,), dtype=np.float32)


def custom_ops_library() -> str:
    """Register the Corr kernel (once) and return the library path for SessionOptions.

    Raises:
        MissingCustomOpError: onnxruntime-extensions is not installed.
    """
    global _library_path
    if _library_path is not None:
        return _library_path
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise MissingCustomOpError(MISSING_EXTENSIONS) from None
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
        # Nothing may escape: an exception here aborts the whole process (see module doc).
        try:
            check_kernel_call(x.shape, kernel.shape, groups, stride, padding, dilation)
            with torch.no_grad():
                out = torch.ops.reparam.corr(
                    torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                    torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32)),
                    groups,
                    stride,
                    padding,
                    dilation,
                )
            return out.numpy()
        except BaseException as error:  # MemoryError and KeyboardInterrupt included
            _record(f"{DOMAIN}::{OP_TYPE} kernel failed: {type(error).__name__}: {error}")
            return _failed_output(x, kernel)

    _library_path = get_library_path()
    return _library_path
