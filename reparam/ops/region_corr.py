"""DRConv's training-time correlation: every region's output forward, the chosen one's backward.

For sample b, let P_b be its im2col rows (pixels × K·K·C, channels-last: taps outer,
channels inner) and W_{b,ρ} (K·K·C × O) its kernel for region ρ = 1..r. The forward computes
all r region outputs, A_{b,ρ} = P_b · W_{b,ρ} (the guide's gradient needs every one), and
keeps at each pixel p the row of the region its guide chose, ρ(p) = argmax_ρ guide[b, ρ, p]:

    y[b, :, p] = A_{b,ρ(p)}[p, :].

The backward is the straight-through estimator of the published DRConv (``hard + soft −
soft.detach()``): through the hard choice for the kernels and the input, through the
softmax mixture Σ_ρ softmax(guide)_ρ · A_{b,ρ} for the guide. With G the output gradient
(pixels × O) and S_ρ = {p : ρ(p) = ρ},

    ∂W_{b,ρ} = P_{S_ρ}ᵀ · G_{S_ρ},    ∂P_{S_ρ} = G_{S_ρ} · W_{b,ρ}ᵀ,
    ∂guide_ρ = s_ρ · (m_ρ − Σ_σ s_σ · m_σ),   s = softmax(guide), m_ρ = Σ_o G · A_{b,ρ},

and ∂x is ∂P folded back onto the input (col2im): 1/r of the correlation's backward over
all regions, which the published form (a grouped convolution) computes in full.

How, per sample: P_b is one row gather from the sample's channels-last rows
(:func:`channels_last_rows`, with the :func:`window_index` table; padding taps read a zero
row). The forward multiplies it with the r kernels side by side, (K·K·C, r·O), in one
matmul. The backward sorts the pixels by region once, so that every S_ρ is a run of rows:
P in that order is again one gather, ∂W_{b,ρ} one ``mm`` per run written in place, ∂P one
segment matmul (:func:`~reparam.ops.segment_mm.segment_mm`), and col2im one ``index_add_``
of its rows onto the rows they were gathered from. (Before: a strided im2col copy, then an
``index_select`` of P and G and an ``index_copy_`` of ∂P per region, and a col2im of K²
strided adds; the training step is 6-9% faster, B8 C64→64 32² K3 r=8, 1 and 2 threads.)

Threads: each sample is one chunk of :func:`~reparam.ops.threads.parallel_for` (a few
matmuls and memory-bound ops with one intra-op thread), so a sample's many ops wait at no
thread barrier; a batch smaller than the thread count runs its samples in turn with all
intra-op threads instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from reparam.ops.corr import corr_output_size
from reparam.ops.segment_mm import dense_mm, segment_mm, segment_tmm
from reparam.ops.threads import parallel_for, worker_count
from reparam.ops.workspace import scratch

__all__ = [
    "RegionCorr",
    "channels_last_rows",
    "first_max_index",
    "rows_read",
    "straight_through_guide_grad",
    "to_channels_last",
    "window_index",
]

# A sample's temporaries (channels-last rows, im2col rows, kernels side by side) use
# per-thread buffers up to this size; larger ones get fresh tensors, so that no thread
# keeps tens of MiB for good.
_SCRATCH_BYTES = 4 << 20
# Window index tables (int64, K² per output pixel) up to this size are kept between calls,
# 32 at most: a 32² output with K = 3 takes 72 KiB.
_WINDOW_CACHE_BYTES = 1 << 20


def first_max_index(guide: Tensor, dim: int) -> Tensor:
    """``guide.argmax(dim)``, the first index of the largest value: ``max(dim).indices``
    returns the same indices and is 8-10x faster on CPU for a short ``dim`` (measured on
    (8, 1024) and (8, 8, 32, 32) guides)."""
    return guide.max(dim=dim).indices


def straight_through_guide_grad(mixed: Tensor, guide: Tensor, dim: int) -> Tensor:
    """Softmax backward along ``dim``: s · (m − Σ s · m), s = softmax(guide), m = ``mixed``
    (the output gradient's inner product with each region's output)."""
    soft = torch.softmax(guide, dim=dim)
    return soft * (mixed - (soft * mixed).sum(dim=dim, keepdim=True))


# Where a window tap falls in the zero padding, window_index gives this: any sample's row
# offset added to it stays negative, and the gather clamps it to row 0, the zero row.
_PADDING_TAP = -(1 << 62)


def window_index(height: int, width: int, geometry, device, top: int, bottom: int) -> Tensor:
    """((bottom − top)·W', K·K) int64: for output pixel p = u·W' + v of output rows top ..
    bottom − 1 and tap t = i·K + j, the input pixel the tap reads, y·W + x with
    y = s·u + d·i − pad, x = s·v + d·j − pad, or _PADDING_TAP where (y, x) lies in the zero
    padding. Read only: tables up to _WINDOW_CACHE_BYTES are cached per geometry."""
    out_w = corr_output_size(width, *geometry)
    if (bottom - top) * out_w * geometry[0] ** 2 * 8 <= _WINDOW_CACHE_BYTES:
        return _cached_window_index(height, width, geometry, device, top, bottom)
    return _make_window_index(height, width, geometry, device, top, bottom)


def _make_window_index(height: int, width: int, geometry, device, top: int, bottom: int):
    k, stride, pad, dilation = geometry
    out_w = corr_output_size(width, *geometry)
    with torch.inference_mode(False):  # usable whatever mode the first call ran in
        taps = torch.arange(k, device=device) * dilation
        ys = (torch.arange(top, bottom, device=device) * stride - pad).unsqueeze(1) + taps
        xs = (torch.arange(out_w, device=device) * stride - pad).unsqueeze(1) + taps
        ys, xs = ys.view(bottom - top, 1, k, 1), xs.view(1, out_w, 1, k)
        inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        index = torch.where(inside, ys * width + xs, _PADDING_TAP)
    return index.view((bottom - top) * out_w, k * k)


_cached_window_index = functools.lru_cache(maxsize=32)(_make_window_index)


def rows_read(windows: Tensor, first_row: int) -> Tensor:
    """In place on ``windows`` (a :func:`window_index` table, or rows of one; a tensor the
    caller owns): the row each tap reads of channels-last rows whose pixel 0 is row
    ``first_row``, with every padding tap clamped to row 0, the zero row."""
    return windows.add_(first_row).clamp_(min=0)


def to_channels_last(sample: Tensor, out: Tensor) -> Tensor:
    """``out`` (H·W, C) = one sample (C, H, W) as channels-last rows, by a 2-D transpose:
    torch's fastest layout change (3-D permute copies are slower)."""
    return out.copy_(sample.reshape(sample.shape[0], -1).t())


def channels_last_rows(sample: Tensor, out: Tensor) -> Tensor:
    """``out`` (1 + H·W, C) filled with one sample (C, H, W) as channels-last rows after a
    zero row: row 1 + y·W + x holds sample[:, y, x]. Gathering these rows at
    ``rows_read(window_index(...), 1)`` gives the sample's im2col rows."""
    out[0].zero_()
    to_channels_last(sample, out[1:])
    return out


def _buffer(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A per-thread scratch buffer up to _SCRATCH_BYTES (a fresh block that large faults in
    page by page on every call), a new tensor above (no thread keeps it for good)."""
    return scratch(name, shape, like, max_bytes=_SCRATCH_BYTES)


def _for_each_sample(work: Callable[[int], None], batch: int, device: torch.device) -> None:
    """``work(b)`` for every sample: shared out between threads when the batch allows,
    else in turn with all intra-op threads."""
    if batch < worker_count(device):
        for b in range(batch):
            work(b)
    else:
        parallel_for(work, range(batch), device)


class RegionCorr(torch.autograd.Function):
    """y = the chosen region's correlation output per pixel; straight-through backward.

    Inputs: x (B, C, H, W); kernels (r, B, K·K·C, O), sample b's region-ρ kernel as the
    matrix ``kernels[ρ, b]`` ordered as the im2col rows are (taps outer, channels inner);
    guide (B, r, H', W'); kernel_size, stride, padding, dilation. Output (B, O, H', W').
    """

    @staticmethod
    def forward(ctx, x, kernels, guide, kernel_size, stride, padding, dilation):
        regions, batch, taps_channels, out_channels = kernels.shape
        _, channels, height, width = x.shape
        out_h, out_w = guide.shape[2], guide.shape[3]
        pixels = out_h * out_w
        geometry = (kernel_size, stride, padding, dilation)
        # Per sample, pixel p's r region outputs side by side: (H'W', r·O), each the
        # product oneDNN (or mm) returned, kept as it is: copying them into one batch
        # tensor cost 3-4% of a training step.
        outputs: list[Tensor] = [x] * batch
        y = x.new_empty((batch, out_channels, out_h, out_w))
        choice = first_max_index(guide, 1).view(batch, pixels)  # each pixel's region
        # Row p·r + ρ(p) of a sample's outputs viewed (H'W'·r, O) is pixel p's chosen one.
        chosen = choice + torch.arange(pixels, device=x.device) * regions
        # Row of channels_last_rows that each (pixel, tap) reads; padding taps the zero row.
        sources = rows_read(window_index(height, width, geometry, x.device, 0, out_h).clone(), 1)

        def forward_sample(b: int) -> None:
            rows = _buffer("region_corr.rows", (1 + height * width, channels), x)
            columns = _buffer("region_corr.columns", (pixels, taps_channels), x)
            channels_last = channels_last_rows(x[b], rows)
            torch.index_select(channels_last, 0, sources.view(-1), out=columns.view(-1, channels))
            # The r kernels side by side, (K·K·C, r·O), copied once: one matmul r·O wide
            # is 10-13% faster than r matmuls O wide (1024 x 576 rows, O = 64, r = 8).
            side_by_side = _buffer("region_corr.kernels", (taps_channels, regions, out_channels), x)
            side_by_side.copy_(kernels[:, b].transpose(0, 1))
            outputs[b] = dense_mm(columns, side_by_side.view(taps_channels, -1))
            picked = torch.index_select(outputs[b].view(-1, out_channels), 0, chosen[b])
            y[b].copy_(picked.t().view(out_channels, out_h, out_w))

        _for_each_sample(forward_sample, batch, x.device)
        # Saved like the inputs (freed after the backward, checked for in-place writes).
        ctx.save_for_backward(x, kernels, guide, choice, sources, *outputs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, kernels, guide, choice, sources, *outputs = ctx.saved_tensors
        need_x, need_kernels, need_guide = ctx.needs_input_grad[:3]
        regions, batch, taps_channels, out_channels = kernels.shape
        _, channels, height, width = x.shape
        pixels = guide.shape[2] * guide.shape[3]
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_kernels = torch.empty_like(kernels) if need_kernels else None
        grad_guide = torch.empty_like(guide) if need_guide else None

        def backward_sample(b: int) -> None:
            g = grad[b].view(out_channels, pixels).t().contiguous()  # pixels × O
            if need_guide:
                per_region = outputs[b].view(pixels, regions, out_channels)
                mixed = (per_region * g.unsqueeze(1)).sum(dim=-1).t()  # r × pixels
                guide_b = guide[b].view(regions, pixels)
                grad_guide[b] = straight_through_guide_grad(mixed, guide_b, 0).view_as(guide[b])
            if not (need_x or need_kernels):
                return
            # The pixels in region order: each region's rows are one run, S_ρ.
            order = torch.argsort(choice[b], stable=True)
            counts = torch.bincount(choice[b], minlength=regions).tolist()
            sorted_sources = sources.index_select(0, order)
            g_sorted = torch.index_select(g, 0, order)
            rows = _buffer("region_corr.rows", (1 + height * width, channels), x)
            if need_kernels:  # ∂W_ρ = P_{S_ρ}ᵀ · G_{S_ρ}, P_{S_ρ} gathered in region order
                channels_last = channels_last_rows(x[b], rows)
                by_region = _buffer("region_corr.columns", (pixels, taps_channels), x)
                flat = by_region.view(-1, channels)
                torch.index_select(channels_last, 0, sorted_sources.view(-1), out=flat)
                segment_tmm(by_region, g_sorted, counts, out=grad_kernels[:, b])
            if need_x:  # ∂P_{S_ρ} = G_{S_ρ} · W_ρᵀ, each row added back where it was read
                grad_rows = segment_mm(g_sorted, kernels[:, b].transpose(1, 2), counts, onednn=True)
                rows.zero_()  # row 0 collects the padding taps' gradients, dropped
                rows.index_add_(0, sorted_sources.view(-1), grad_rows.view(-1, channels))
                grad_x[b].copy_(rows[1:].t().view(channels, height, width))

        _for_each_sample(backward_sample, batch, x.device)
        return grad_x, grad_kernels, grad_guide, None, None, None, None
