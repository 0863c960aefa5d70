"""Involution's kernels: the op formulations, their autograd function and their scheduling.

For input x (B, C, H, W), per-pixel kernels w (B, G·K², H', W') of G = C / gc groups, stride
s and x_pad the input zero-padded by (K − 1)/2::

    y[b, g·gc + c, u, v] = Σ_{i,j} w[b, g, i·K + j, u, v] · x_pad[b, g·gc + c, s·u + i, s·v + j]

The published CPU form (:func:`involution_unfold`) unfolds the input into a K²-times larger
tensor first (49× at K = 7). Here the (sample, group) pairs are cut into chunks of about a
megabyte; per chunk the input is padded, the kernels are generated (inference: one matmul
of the span conv on the chunk's reduced features, so the B·G·K²·H·W kernel tensor, 3× the
input at K = 7, never exists whole) and the K² taps are accumulated with ``addcmul_`` on
strided views, all while the chunk stays in cache. Low-precision inputs accumulate in
float32 and round once.

Threads: these are memory-bound element-wise ops; a second intra-op thread barely speeds
them up, but every parallel op waits at a thread barrier, which stalls for a whole
scheduler time slice when another process holds a core. So the chunks (in inference, whole
samples: kernels and taps) are shared out by :func:`~reparam.ops.threads.parallel_for`,
whose worker threads each run one chunk at a time with one intra-op thread.

The backward is the same loop transposed (:class:`_InvolutionFunction`; first-order only).
While tracing (``torch.compile``, ``torch.export``, ONNX export) or under a ``torch.func``
transform (``vmap``, ``grad``) the loop runs out of place on whole tensors
(:func:`_traced`): plain differentiable ops, which export with dynamic batch, height and
width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from reparam.ops.threads import parallel_for, sample_ranges, worker_count

__all__ = [
    "involution",
    "involution_from_features",
    "involution_inference",
    "involution_shift",
    "involution_unfold",
    "whole_tensor_form",
]

# Elements per chunk (padded input + kernels + accumulator): 4 MiB in float32, so the chunk
# stays in cache across the K² passes while the per-op overhead stays small. Measured at
# B8 C64 56² K7 on 2 cores: 2^20 beat 2^18, 2^19, 2^21 and no chunking.
_CHUNK_ELEMENTS = 1 << 20
_WIDE_ACCUMULATOR = (torch.float16, torch.bfloat16)


def whole_tensor_form() -> bool:
    """Whether the loop must run as plain ops on whole tensors (:func:`_traced`): while
    tracing (``torch.compile``/``torch.export``, and the TorchScript tracer behind
    ``torch.jit.trace`` and the legacy ONNX exporter, which records only the calling
    thread's ops), and under a ``torch.func`` transform, whose wrapped tensors exist only in
    the calling thread and take no strided views or ``out=`` arguments."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def _geometry(x: Tensor, weight: Tensor, kernel_size: int, stride: int, group_channels: int):
    batch, channels, height, width = x.shape
    taps = kernel_size * kernel_size
    if channels % group_channels:
        raise ValueError(
            f"involution: {channels} input channels are not divisible by group_channels "
            f"({group_channels})"
        )
    groups = channels // group_channels
    out_h = (height - 1) // stride + 1
    out_w = (width - 1) // stride + 1
    expected = (batch, groups * taps, out_h, out_w)
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"involution: weight must have shape {expected} (B, G·K², ceil(H/s), ceil(W/s)) "
            f"for input {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    return batch, groups, out_h, out_w


def involution_unfold(
    x: Tensor, weight: Tensor, kernel_size: int, stride: int = 1, group_channels: int = 16
) -> Tensor:
    """The published formulation: unfold the input (K² times its size), multiply, sum.

    Args:
        x: input (B, C, H, W).
        weight: generated kernels (B, G·K², ceil(H/s), ceil(W/s)), G = C / group_channels.
        kernel_size: odd K.
        stride: s.
        group_channels: channels sharing one kernel.
    """
    batch, groups, out_h, out_w = _geometry(x, weight, kernel_size, stride, group_channels)
    taps = kernel_size * kernel_size
    columns = F.unfold(x, kernel_size, padding=(kernel_size - 1) // 2, stride=stride)
    columns = columns.view(batch, groups, group_channels, taps, out_h, out_w)
    kernels = weight.view(batch, groups, 1, taps, out_h, out_w)
    return (kernels * columns).sum(dim=3).view(batch, x.shape[1], out_h, out_w)


def _shifted_views(padded: Tensor, kernel_size: int, stride: int, out_h: int, out_w: int):
    """The K² views padded[..., i + s·u, j + s·v] (u < out_h, v < out_w) of an
    (n, c, Hp, Wp) tensor, in (i, j) order, from one strided view."""
    n, c = padded.shape[0], padded.shape[1]
    sn, sc, sh, sw = padded.stride()
    windows = padded.as_strided(
        (kernel_size, kernel_size, n, c, out_h, out_w),
        (sh, sw, sn, sc, stride * sh, stride * sw),
        padded.storage_offset(),
    )
    return [view for row in windows.unbind(0) for view in row.unbind(0)]


def _pads(x: Tensor, kernel_size: int, stride: int, out_h, out_w) -> tuple:
    """F.pad amounts giving exactly the s·(H' − 1) + K rows (and columns) the taps read.

    Left/top: (K − 1)/2. Right/bottom: whatever reaches s·(H' − 1) + K, which is (K − 1)/2
    at stride 1 and may be negative (a crop of never-read pixels) at larger strides.
    Stating the padded size in terms of H' lets ``torch.export`` prove every tap's slice in
    bounds without a guard on H and W.
    """
    pad = (kernel_size - 1) // 2
    bottom = stride * (out_h - 1) + kernel_size - pad - x.shape[2]
    right = stride * (out_w - 1) + kernel_size - pad - x.shape[3]
    return (pad, right, pad, bottom)


def _chunks(rows: int, row_elements: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    if torch.compiler.is_compiling():
        step = rows  # no Python loop over a (possibly symbolic) batch while tracing
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] if rows else []


def _sample_aligned_chunks(batch: int, groups: int, row_elements: int, limit: int):
    """(start, stop) ranges over the B·G (sample, group) rows of at most ``limit`` elements,
    each either whole samples or a range of groups of one sample (so that one matmul
    generates its kernels)."""
    step = max(1, limit // max(1, row_elements))
    if step >= groups:
        step -= step % groups
        rows = batch * groups
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]
    return [
        (b * groups + g, b * groups + min(g + step, groups))
        for b in range(batch)
        for g in range(0, groups, step)
    ]


def _generated_chunk_limit(input_elements: int) -> int:
    """Chunk bound (elements) when kernels are generated per chunk.

    A chunk's temporaries (its padded input and its kernels, K²/gc times its output) stay
    below both the cache-sized chunk and the input's size, so the whole module needs at most
    about its output, the reduced features and one input more. Half the input is allowed
    even above the cache-sized chunk: smaller chunks mean many more, smaller ops, whose
    per-op cost then dominates (measured 2x slower at a quarter of the input).
    """
    return min(max(_CHUNK_ELEMENTS, input_elements // 2), input_elements)


KernelRows = Callable[[int, int], Tensor]


def _accumulate(
    x: Tensor,
    kernel_rows: KernelRows,
    kernel_size: int,
    stride: int,
    group_channels: int,
    out_h: int,
    out_w: int,
    limit: int,
    out: Tensor | None = None,
) -> Tensor:
    """The chunked shift-and-accumulate loop; ``kernel_rows(start, stop)`` gives the kernels
    (stop − start, K², H', W') of (sample, group) rows start..stop. The chunks are shared out
    by :func:`~reparam.ops.threads.parallel_for`; ``out``, if given, receives the result."""
    batch, channels, height, width = x.shape
    groups, taps = channels // group_channels, kernel_size * kernel_size
    rows = x.reshape(batch * groups, group_channels, height, width)
    pads = _pads(x, kernel_size, stride, out_h, out_w)
    if out is None:
        out = x.new_empty((batch, channels, out_h, out_w))
    result, out = out, out.view(batch * groups, group_channels, out_h, out_w)
    # bf16 / fp16: the K² products are summed in float32 and rounded once (error then no
    # worse than the unfold form's, which reduces its product tensor in float32).
    wide = x.dtype in _WIDE_ACCUMULATOR
    span_h, span_w = stride * (out_h - 1) + kernel_size, stride * (out_w - 1) + kernel_size
    row_elements = group_channels * (span_h * span_w + (out_h * out_w if wide else 0))
    row_elements += taps * out_h * out_w

    def accumulate_chunk(chunk: tuple[int, int]) -> None:
        start, stop = chunk
        source = F.pad(rows[start:stop], pads)
        kernel = kernel_rows(start, stop).unsqueeze(2)  # n x K² x 1 x H' x W'
        if wide:
            target = x.new_zeros(out[start:stop].shape, dtype=torch.float32)
        else:
            target = out[start:stop]
        # All K² shifted views and kernel taps from three calls, not three per tap: every
        # Python-to-torch call takes the GIL, which the threads sharing chunks compete for.
        shifted_views = _shifted_views(source, kernel_size, stride, out_h, out_w)
        taps = zip(shifted_views, kernel.unbind(1), strict=True)
        for index, (shifted, tap) in enumerate(taps):
            if index == 0 and not wide:
                torch.mul(shifted, tap, out=target)
            else:
                target.addcmul_(shifted, tap)
        if wide:
            out[start:stop].copy_(target)

    chunks = _sample_aligned_chunks(batch, groups, row_elements, limit)
    parallel_for(accumulate_chunk, chunks, x.device)
    return result


def _traced(x, weight, kernel_size, stride, group_channels, out_h, out_w) -> Tensor:
    """Functional form for tracing: one multiply-add per offset on whole tensors.

    Also the exported graph's form. Under onnxruntime (B8 C64 56² K7, one thread) it takes
    about 3x the eager forward; the other forms measured, interleaved, were no faster:
    channels last (the group's channels innermost) 0.98x of this, one flat slice per tap
    on a width-padded grid 1.4x, an im2col by one-hot Conv 2.3x, per row of taps 1.2x.
    Each tap costs a Slice copy, a Mul and an Add over the whole tensor, where the eager
    loop makes one in-place multiply-add per tap on chunks that stay in cache.
    """
    batch, groups = x.shape[0], x.shape[1] // group_channels
    padded = F.pad(x, _pads(x, kernel_size, stride, out_h, out_w))
    padded = padded.view(batch * groups, group_channels, padded.shape[2], padded.shape[3])
    kernels = weight.reshape(batch * groups, kernel_size * kernel_size, 1, out_h, out_w)
    out = None
    for i in range(kernel_size):
        for j in range(kernel_size):
            shifted = padded[
                ...,
                i : i + stride * (out_h - 1) + 1 : stride,
                j : j + stride * (out_w - 1) + 1 : stride,
            ]
            term = shifted * kernels[:, i * kernel_size + j]
            out = term if out is None else out + term
    return out.reshape(batch, groups * group_channels, out_h, out_w)


def involution_shift(
    x: Tensor, weight: Tensor, kernel_size: int, stride: int = 1, group_channels: int = 16
) -> Tensor:
    """Involution by shift-and-accumulate, without autograd bookkeeping per offset.

    Same arguments and result as :func:`involution_unfold`; use :func:`involution` for a
    differentiable call.
    """
    batch, groups, out_h, out_w = _geometry(x, weight, kernel_size, stride, group_channels)
    if whole_tensor_form():
        return _traced(x, weight, kernel_size, stride, group_channels, out_h, out_w)
    kernels = weight.reshape(batch * groups, kernel_size * kernel_size, out_h, out_w)
    return _accumulate(
        x, lambda start, stop: kernels[start:stop], kernel_size, stride, group_channels,
        out_h, out_w, _CHUNK_ELEMENTS,
    )  # fmt: skip


def involution_from_features(
    x: Tensor,
    features: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: int,
    stride: int = 1,
    group_channels: int = 16,
    *,
    out: Tensor | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """Involution whose kernels are a 1x1 conv of ``features``, generated chunk by chunk.

    Computes ``involution_shift(x, conv2d(features, span_weight, span_bias), ...)`` without
    the whole kernel tensor (B, G·K², H', W'): each chunk's kernels are one matmul of the
    span weights with that chunk's samples of ``features``. No autograd.

    Args:
        x: input (B, C, H, W).
        features: the reduced features (B, C_r, ceil(H/s), ceil(W/s)).
        span_weight: (G·K², C_r, 1, 1) weight of the 1x1 span conv.
        span_bias: its (G·K²) bias, or None.
        kernel_size, stride, group_channels: as for :func:`involution_unfold`.
        out: a contiguous (B, C, ceil(H/s), ceil(W/s)) tensor to write the result into.
        chunk_elements: bound on a chunk's temporaries (elements); by default the smaller
            of the input's size and about a cache's worth, or half the input if larger.
    """
    batch, channels, height, width = x.shape
    taps = kernel_size * kernel_size
    groups = channels // group_channels if group_channels > 0 else 0
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    reduced = span_weight.shape[1]
    expected = (batch, reduced, out_h, out_w)
    if (
        channels % group_channels
        or tuple(span_weight.shape) != (groups * taps, reduced, 1, 1)
        or tuple(features.shape) != expected
    ):
        raise ValueError(
            f"involution_from_features: for input {tuple(x.shape)}, K={kernel_size}, "
            f"group_channels={group_channels}, need span_weight ({groups * taps}, C_r, 1, 1) "
            f"and features {expected}, got {tuple(span_weight.shape)} and "
            f"{tuple(features.shape)}"
        )
    weight = span_weight.reshape(groups * taps, reduced)
    bias = span_bias.reshape(groups * taps, 1) if span_bias is not None else None
    flat = features.reshape(batch, reduced, out_h * out_w)
    if x.dtype in _WIDE_ACCUMULATOR:
        # The kernels feed a float32 accumulator: generate them in float32 too.
        weight, flat = weight.float(), flat.float()
        bias = bias.float() if bias is not None else None

    def kernel_rows(start: int, stop: int) -> Tensor:
        first, group = divmod(start, groups)
        if group or stop - start < groups:  # some groups of one sample
            rows = slice(group * taps, (group + stop - start) * taps)
            kernels = torch.matmul(weight[rows], flat[first])
            if bias is not None:
                kernels += bias[rows]
        else:  # whole samples: a batched matmul (torch.matmul of a matrix by a stack
            # would fold the stack into one matrix and copy the product back: twice the
            # chunk's kernels at once)
            samples = flat[first : stop // groups]
            stacked = weight.expand(samples.shape[0], -1, -1)
            if bias is not None:
                kernels = torch.baddbmm(bias.expand(samples.shape[0], -1, -1), stacked, samples)
            else:
                kernels = torch.bmm(stacked, samples)
        return kernels.view(stop - start, taps, out_h, out_w)

    limit = chunk_elements or _generated_chunk_limit(x.numel())
    return _accumulate(
        x, kernel_rows, kernel_size, stride, group_channels, out_h, out_w, limit, out
    )


def _involution_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    kernel_size: int,
    stride: int,
    group_channels: int,
    need_x: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """∂/∂x_pad: the same loop scattering grad·w; ∂/∂w: Σ_c grad·x_shift over the group."""
    batch, groups, out_h, out_w = _geometry(x, weight, kernel_size, stride, group_channels)
    rows = batch * groups
    grad = grad_out.reshape(rows, group_channels, out_h, out_w)
    pads = _pads(x, kernel_size, stride, out_h, out_w)
    # Contiguous (a channels_last input pads to channels_last, which the views below
    # cannot take).
    padded = F.pad(x, pads).contiguous()
    padded = padded.view(rows, group_channels, padded.shape[2], padded.shape[3])
    kernels = weight.reshape(rows, kernel_size * kernel_size, 1, out_h, out_w)
    grad_padded = x.new_zeros(padded.shape) if need_x else None
    grad_kernels = (
        weight.new_empty((rows, kernel_size * kernel_size, out_h, out_w)) if need_weight else None
    )

    def backward_chunk(chunk: tuple[int, int]) -> None:
        start, stop = chunk
        g = grad[start:stop]
        geometry = (kernel_size, stride, out_h, out_w)
        if need_x:
            grad_views = _shifted_views(grad_padded[start:stop], *geometry)
            for view, tap in zip(grad_views, kernels[start:stop].unbind(1), strict=True):
                view.addcmul_(g, tap)
        if need_weight:
            product = g.new_empty(g.shape)
            shifted_views = _shifted_views(padded[start:stop], *geometry)
            targets = grad_kernels[start:stop].unbind(1)
            for shifted, target in zip(shifted_views, targets, strict=True):
                torch.mul(g, shifted, out=product)
                torch.sum(product, dim=1, out=target)

    parallel_for(backward_chunk, _chunks(rows, group_channels * out_h * out_w), x.device)
    grad_x = None
    if need_x:
        # Undo the padding: negative pads crop, and pixels the forward cropped get zero.
        grad_x = F.pad(grad_padded, tuple(-p for p in pads)).reshape(x.shape)
    grad_weight = grad_kernels.view(weight.shape) if need_weight else None
    return grad_x, grad_weight


class _InvolutionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, kernel_size, stride, group_channels):
        ctx.save_for_backward(x, weight)
        ctx.params = (kernel_size, stride, group_channels)
        return involution_shift(x, weight, kernel_size, stride, group_channels)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = _involution_backward(
            grad_out.contiguous(), x, weight, *ctx.params,
            need_x=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
        )  # fmt: skip
        return grad_x, grad_weight, None, None, None


def involution(
    x: Tensor, weight: Tensor, kernel_size: int, stride: int = 1, group_channels: int = 16
) -> Tensor:
    """Differentiable involution of ``x`` with per-pixel kernels ``weight``.

    Args:
        x: input (B, C, H, W).
        weight: generated kernels (B, G·K², ceil(H/s), ceil(W/s)), G = C / group_channels.
        kernel_size: odd K.
        stride: s.
        group_channels: channels sharing one kernel.
    """
    if whole_tensor_form() or not (
        torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    ):
        return involution_shift(x, weight, kernel_size, stride, group_channels)
    return _InvolutionFunction.apply(x, weight, kernel_size, stride, group_channels)


def involution_inference(
    x: Tensor,
    features: Tensor,
    span_weight: Tensor,
    span_bias: Tensor | None,
    kernel_size: int,
    stride: int = 1,
    group_channels: int = 16,
) -> Tensor:
    """:func:`involution_from_features` for a whole batch, its samples shared out between
    threads, each generating its kernels chunk by chunk and accumulating the taps (one
    thread meeting per call, not per op); a batch too small to share out splits each
    sample's groups instead. No autograd."""
    batch, channels = x.shape[0], x.shape[1]
    out_h, out_w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    out = x.new_empty((batch, channels, out_h, out_w))
    workers = worker_count(x.device)
    samples = sample_ranges(batch, x[0].numel() if batch else 0, workers)
    # Per worker, one cache-sized chunk of temporaries at a time. A batch too small to
    # share out runs as one call whose tap loop shares out each sample's groups.
    limit = _CHUNK_ELEMENTS
    if len(samples) < workers:
        samples, limit = ([(0, batch)] if batch else []), None

    def run_samples(chunk: tuple[int, int]) -> None:
        part = slice(*chunk)
        involution_from_features(
            x[part], features[part], span_weight, span_bias, kernel_size, stride,
            group_channels, out=out[part], chunk_elements=limit,
        )  # fmt: skip

    parallel_for(run_samples, samples, x.device)
    return out
