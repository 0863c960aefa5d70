"""Per-sample cross-correlation ("Corr"): every sample correlated with its own kernels.

For x of shape (B, C, H, W) and kernel of shape (B, O, C/g, kh, kw)::

    corr(x, kernel)[b] = conv2d(x[b], kernel[b], stride, padding, dilation, groups=g)

This is DRConv's core (its kernels are generated from the input). Three implementations:

- ``torch.ops.reparam.corr`` — a real PyTorch operator (``torch.library.custom_op``) with a
  fake implementation (so ``torch.export`` traces it with a symbolic batch) and an autograd
  formula. Eagerly it runs one grouped convolution with ``groups = B·g`` over the batch
  folded into channels, and its backward is that convolution's backward.
- :func:`corr_standard` — the same computation in standard operators only, for ONNX export
  with a dynamic batch: im2col as a fixed one-hot depthwise convolution
  (C·kh·kw output channels, ``groups=C``), then a batched matmul with the per-sample kernels.
  A grouped conv with ``groups = batch`` cannot be exported with a dynamic batch.
- :func:`corr_reference` — a plain loop of ``F.conv2d`` over the batch, for tests.

:func:`corr` dispatches between the first two according to :func:`corr_mode`
(a context variable, default ``"op"``); exporters wrap the export in
``corr_mode("standard")`` to get standard ONNX operators.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CORR_MODES",
    "corr",
    "corr_mode",
    "corr_output_size",
    "corr_reference",
    "corr_standard",
    "get_corr_mode",
]

CORR_MODES = ("op", "standard")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("reparam_corr_mode", default="op")


@contextmanager
def corr_mode(mode: str) -> Iterator[None]:
    """Choose how :func:`corr` computes inside the ``with`` block.

    Args:
        mode: ``"op"`` (the custom operator ``torch.ops.reparam.corr``) or ``"standard"``
            (:func:`corr_standard`, standard operators only).
    """
    if mode not in CORR_MODES:
        raise ValueError(f"corr mode must be one of {CORR_MODES}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def get_corr_mode() -> str:
    """The mode :func:`corr` uses in the current context.

    Under ``torch.compile`` the mode at compile time holds for the compiled graph: dynamo
    cannot read a context variable, so this function is marked as having a constant result
    (what ``torch.compiler.assume_constant_result`` does, without importing dynamo, 1 s,
    for every user of the operator).
    """
    return _MODE.get()


get_corr_mode._dynamo_marked_constant = True  # type: ignore[attr-defined]


def corr_output_size(size, kernel_size: int, stride: int, padding: int, dilation: int):
    """floor((L + 2p − d(k−1) − 1) / s) + 1; works on ints and symbolic sizes alike."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _check_args(
    x: Tensor, kernel: Tensor, groups: int, stride: int, padding: int, dilation: int
) -> None:
    if x.dim() != 4:
        raise ValueError(f"corr: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if kernel.dim() != 5:
        raise ValueError(
            f"corr: kernel must be (B, O, C/groups, kh, kw), got shape {tuple(kernel.shape)}"
        )
    if groups < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"corr: need groups, stride, dilation >= 1 and padding >= 0, got groups={groups}, "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )
    channels, out_channels = x.shape[1], kernel.shape[1]
    if channels % groups or out_channels % groups:
        raise ValueError(
            f"corr: input channels ({channels}) and kernel outputs ({out_channels}) must be "
            f"divisible by groups ({groups})"
        )
    if kernel.shape[2] != channels // groups:
        raise ValueError(
            f"corr: kernel has {kernel.shape[2]} input channels per group, the input "
            f"{channels} channels in {groups} groups need {channels // groups}"
        )
    if torch.jit.is_tracing():
        return  # the TorchScript tracer gives sizes as tensors; nothing to check at trace time
    batch, kernel_batch = x.shape[0], kernel.shape[0]
    message = f"corr: kernel batch {kernel_batch} differs from input batch {batch}"
    if isinstance(batch, int) and isinstance(kernel_batch, int):
        if batch != kernel_batch:
            raise ValueError(message)
    else:  # symbolic batch under torch.export: a runtime assertion, not a guard
        torch._check(batch == kernel_batch, lambda: message)


def corr_reference(
    x: Tensor,
    kernel: Tensor,
    groups: int = 1,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Tensor:
    """One ``F.conv2d`` per sample: the obvious formulation, the reference in tests."""
    _check_args(x, kernel, groups, stride, padding, dilation)
    if x.shape[0] == 0:
        return _empty_output(x, kernel, stride, padding, dilation)
    outputs = [
        F.conv2d(x[i : i + 1], kernel[i], None, stride, padding, dilation, groups)
        for i in range(x.shape[0])
    ]
    return torch.cat(outputs, dim=0)


def _empty_output(x: Tensor, kernel: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """The (0, O, H', W') result of an empty batch (the batch-folded convolution would have
    zero groups), after the size check a convolution makes."""
    kh, kw = kernel.shape[3], kernel.shape[4]
    out_h = corr_output_size(x.shape[2], kh, stride, padding, dilation)
    out_w = corr_output_size(x.shape[3], kw, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise RuntimeError(
            f"corr: Kernel size can't be greater than actual input size: the {kh}x{kw} kernel "
            f"(dilation {dilation}) does not fit the {x.shape[2]}x{x.shape[3]} input with "
            f"padding {padding}"
        )
    return x.new_empty((0, kernel.shape[1], out_h, out_w))


def _grouped_geometry(x: Tensor, kernel: Tensor, groups: int):
    batch, channels, height, width = x.shape
    _, out_channels, in_per_group, kh, kw = kernel.shape
    folded_x = x.reshape(1, batch * channels, height, width)
    folded_kernel = kernel.reshape(batch * out_channels, in_per_group, kh, kw)
    return folded_x, folded_kernel, batch * groups


@torch.library.custom_op("reparam::corr", mutates_args=())
def _corr_op(
    x: Tensor,
    kernel: Tensor,
    groups: int = 1,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Tensor:
    _check_args(x, kernel, groups, stride, padding, dilation)
    if x.shape[0] == 0:
        return _empty_output(x, kernel, stride, padding, dilation)
    if kernel.shape[3] == kernel.shape[4] == 1 and stride == 1 and padding == 0:
        return _pointwise(x, kernel, groups)
    folded_x, folded_kernel, folded_groups = _grouped_geometry(x, kernel, groups)
    out = F.conv2d(folded_x, folded_kernel, None, stride, padding, dilation, folded_groups)
    return out.reshape(x.shape[0], kernel.shape[1], out.shape[2], out.shape[3])


def _pointwise(x: Tensor, kernel: Tensor, groups: int) -> Tensor:
    """A 1×1, stride-1, unpadded Corr as one batched matmul:
    y[b, g, o, p] = Σ_c kernel[b, g, o, c] · x[b, g, c, p]. (The batch-folded grouped
    convolution runs B·g tiny convolutions; DRConv's exported region products are this case.)
    """
    batch, channels, height, width = x.shape
    out_channels = kernel.shape[1]
    weights = kernel.reshape(batch, groups, out_channels // groups, channels // groups)
    columns = x.reshape(batch, groups, channels // groups, height * width)
    return torch.matmul(weights, columns).reshape(batch, out_channels, height, width)


@_corr_op.register_fake
def _corr_fake(
    x: Tensor,
    kernel: Tensor,
    groups: int = 1,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Tensor:
    _check_args(x, kernel, groups, stride, padding, dilation)
    kh, kw = kernel.shape[3], kernel.shape[4]
    out_h = corr_output_size(x.shape[2], kh, stride, padding, dilation)
    out_w = corr_output_size(x.shape[3], kw, stride, padding, dilation)
    return x.new_empty((x.shape[0], kernel.shape[1], out_h, out_w))


def _corr_setup_context(ctx, inputs, output) -> None:
    x, kernel, groups, stride, padding, dilation = inputs
    ctx.save_for_backward(x, kernel)
    ctx.params = (groups, stride, padding, dilation)


def _corr_backward(ctx, grad_output: Tensor):
    x, kernel = ctx.saved_tensors
    groups, stride, padding, dilation = ctx.params
    if x.shape[0] == 0:  # nothing flowed through; the folded convolution would have no groups
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_kernel = torch.zeros_like(kernel) if ctx.needs_input_grad[1] else None
        return grad_x, grad_kernel, None, None, None, None
    folded_x, folded_kernel, folded_groups = _grouped_geometry(x, kernel, groups)
    folded_grad = grad_output.reshape(1, -1, grad_output.shape[2], grad_output.shape[3])
    grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
        folded_grad.contiguous(),
        folded_x,
        folded_kernel,
        None,
        [stride, stride],
        [padding, padding],
        [dilation, dilation],
        False,
        [0, 0],
        folded_groups,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
    )
    if grad_x is not None:
        grad_x = grad_x.reshape(x.shape)
    if grad_kernel is not None:
        grad_kernel = grad_kernel.reshape(kernel.shape)
    return grad_x, grad_kernel, None, None, None, None


_corr_op.register_autograd(_corr_backward, setup_context=_corr_setup_context)


def _im2col_weight(channels: int, kh: int, kw: int, like: Tensor) -> Tensor:
    """One-hot depthwise kernel: output channel c·kh·kw + t copies tap t of channel c."""
    taps = kh * kw
    eye = torch.eye(taps, dtype=like.dtype, device=like.device)
    return eye.repeat(channels, 1).reshape(channels * taps, 1, kh, kw)


def corr_standard(
    x: Tensor,
    kernel: Tensor,
    groups: int = 1,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Tensor:
    """:func:`corr` in standard operators only: one-hot depthwise conv (im2col), then matmul.

    Nothing depends on the batch size but reshapes, so an ONNX export keeps a dynamic
    batch (and dynamic H/W). The column order c·kh·kw + i·kw + j matches the kernel's
    flattening (C/g, kh, kw).
    """
    _check_args(x, kernel, groups, stride, padding, dilation)
    batch, channels = x.shape[0], x.shape[1]
    out_channels, in_per_group, kh, kw = kernel.shape[1:]
    columns = F.conv2d(
        x, _im2col_weight(channels, kh, kw, x), None, stride, padding, dilation, channels
    )
    out_h, out_w = columns.shape[2], columns.shape[3]
    columns = columns.reshape(batch, groups, in_per_group * kh * kw, out_h * out_w)
    weights = kernel.reshape(batch, groups, out_channels // groups, in_per_group * kh * kw)
    out = torch.matmul(weights, columns)
    return out.reshape(batch, out_channels, out_h, out_w)


def corr(
    x: Tensor,
    kernel: Tensor,
    groups: int = 1,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Tensor:
    """Per-sample correlation of ``x`` (B, C, H, W) with ``kernel`` (B, O, C/g, kh, kw).

    Returns (B, O, H', W') with H' = floor((H + 2p − d(kh−1) − 1)/s) + 1 (W' likewise).
    Runs ``torch.ops.reparam.corr`` in mode ``"op"`` (the default) and
    :func:`corr_standard` in mode ``"standard"`` (see :func:`corr_mode`).
    """
    if get_corr_mode() == "standard":
        return corr_standard(x, kernel, groups, stride, padding, dilation)
    return torch.ops.reparam.corr(x, kernel, groups, stride, padding, dilation)
