"""DRConv's kernels: region assignment, and inference that computes each pixel's region only.

For input x (B, C, H, W), per-sample kernels W_{b,ρ} (K·K·C × O) of r regions and guide maps
(B, r, H', W'), the output at pixel p is the correlation with the kernel of the region its
guide chose, ρ(p) = argmax_ρ guide[b, ρ, p]:

    y[b, :, p] = P_b[p] · W_{b,ρ(p)}      (P_b: the sample's im2col rows)

:func:`assign_region` keeps one of r region outputs per pixel with the blog post's
straight-through gradient; :func:`region_first_forward` computes y without the other r − 1
outputs (no autograd): the guide's argmax first, every sample's pixels sorted by region,
each region's im2col rows multiplied with that region's kernel only, 1/r of the work.
The training-time correlation is :class:`~reparam.ops.region_corr.RegionCorr`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from reparam.ops.corr import corr_output_size
from reparam.ops.pooling import pooling_matrix
from reparam.ops.region_corr import (
    first_max_index,
    rows_read,
    straight_through_guide_grad,
    to_channels_last,
    window_index,
)
from reparam.ops.segment_mm import segment_mm
from reparam.ops.threads import parallel_for
from reparam.ops.workspace import scratch

__all__ = [
    "RegionFirstParts",
    "assign_region",
    "assign_region_reference",
    "autocasting",
    "cached_pooling_matrix",
    "region_first_forward",
    "without_data",
]

# im2col bytes per band of output rows in the 1/r path. Each band's segment matmul splits
# its rows r ways, so bands must be tall for the matmuls to be efficient (measured per band
# of 512 pixels: 0.82 of 1.5 ms in the matmul at 46 GFLOP/s); the bound keeps a large
# image's temporaries small and gives it several bands to share between threads.
_BAND_BYTES = 4 << 20
# Input pixels per chunk of samples whose guide conv, pooling and channels-last copy run
# together: one conv over several small images is faster than one per image, and fewer,
# larger ops keep threads from queueing for the GIL (B8 32², 2 CPU cores: 1.9-2.3 ms with
# ranges of 4 images, 3.3-3.7 ms with one image per chunk).
_RANGE_PIXELS = 4096


def _hard_index(guide: Tensor, channels: int) -> Tensor:
    index = guide.argmax(dim=1, keepdim=True).unsqueeze(2)  # B x 1 x 1 x H x W
    return index.expand(-1, -1, channels, -1, -1)


def _hard_select(outputs: Tensor, guide: Tensor) -> Tensor:
    return torch.gather(outputs, 1, _hard_index(guide, outputs.shape[2])).squeeze(1)


class _AssignRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outputs: Tensor, guide: Tensor) -> Tensor:
        ctx.save_for_backward(outputs, guide)
        return _hard_select(outputs, guide)

    @staticmethod
    def backward(ctx, grad: Tensor):
        outputs, guide = ctx.saved_tensors
        grad_outputs = grad_guide = None
        if ctx.needs_input_grad[0]:
            index = _hard_index(guide, outputs.shape[2])
            grad_outputs = torch.zeros_like(outputs).scatter_(1, index, grad.unsqueeze(1))
        if ctx.needs_input_grad[1]:
            # Softmax backward of Σ_ρ softmax(guide)_ρ · outputs_ρ.
            mixed = (grad.unsqueeze(1) * outputs).sum(dim=2)  # B x r x H x W
            grad_guide = straight_through_guide_grad(mixed, guide, 1)
        return grad_outputs, grad_guide


def assign_region(outputs: Tensor, guide: Tensor) -> Tensor:
    """Pick, per pixel, the region output whose guide value is largest (straight-through).

    Args:
        outputs: per-region outputs (B, r, O, H, W).
        guide: region maps (B, r, H, W).

    Returns:
        (B, O, H, W). Backward: ``outputs`` gets the gradient through the hard mask,
        ``guide`` that of the softmax mixture Σ_ρ softmax(guide)_ρ · outputs_ρ.
    """
    if outputs.dim() != 5 or guide.dim() != 4 or outputs.shape[:2] != guide.shape[:2]:
        raise ValueError(
            f"assign_region: outputs must be (B, r, O, H, W) and guide (B, r, H, W), got "
            f"{tuple(outputs.shape)} and {tuple(guide.shape)}"
        )
    needs_grad = torch.is_grad_enabled() and (outputs.requires_grad or guide.requires_grad)
    if not needs_grad:
        return _hard_select(outputs, guide)
    if torch.compiler.is_exporting():  # a deployed graph: inference only
        return _hard_select(outputs, guide)
    if torch.compiler.is_compiling():  # the same gradients in plain autograd, traceable
        return assign_region_reference(outputs, guide)
    return _AssignRegion.apply(outputs, guide)


def assign_region_reference(outputs: Tensor, guide: Tensor) -> Tensor:
    """:func:`assign_region` in plain autograd: hard + soft − soft.detach()."""
    hard = _hard_select(outputs, guide)
    soft = (torch.softmax(guide, dim=1).unsqueeze(2) * outputs.detach()).sum(dim=1)
    return hard + soft - soft.detach()


def _bands(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """(top, bottom) bands of a sample's ``rows`` output rows, im2col rows of at most
    _BAND_BYTES each. Independent of the thread count, so the results are too."""
    step = max(1, _BAND_BYTES // max(1, row_bytes))
    return [(top, min(top + step, rows)) for top in range(0, rows, step)]


def _sample_ranges(batch: int, pixels: int) -> list[tuple[int, int]]:
    """(first, last) ranges of consecutive samples of at most _RANGE_PIXELS input pixels
    (at least one sample) each. Independent of the thread count, so the results are too."""
    step = max(1, _RANGE_PIXELS // max(1, pixels))
    return [(first, min(first + step, batch)) for first in range(0, batch, step)]


def _call(task: Callable[[], object]) -> None:
    task()


@functools.lru_cache(maxsize=32)
def cached_pooling_matrix(length: int, k: int, dtype: torch.dtype, device) -> Tensor:
    """:func:`~reparam.ops.pooling.pooling_matrix` (K, L), cached; read only."""
    with torch.inference_mode(False):  # usable whatever mode the first call ran in
        return pooling_matrix(length, k, torch.empty(0, dtype=dtype, device=device))


def autocasting(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (False for devices without autocast)."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def without_data(x: Tensor) -> bool:
    """Whether ``x`` has no values to read (meta device, or a fake tensor): the 1/r path
    reads the region counts back, so such inputs take the reference formulation."""
    if x.device.type == "meta":
        return True
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # a torch without it has no fake tensors of this kind either
        return False
    return detect_fake_mode((x,)) is not None  # a fake input, or a fake mode active


@dataclass(frozen=True)
class RegionFirstParts:
    """What :func:`region_first_forward` takes from the block.

    Attributes:
        regions, out_channels: r and O.
        geometry: (K, stride, padding, dilation) of the correlation and the guide.
        pool_rows: (P_h, P_w), the (K, H) and (K, W) adaptive-average-pool matrices, or
            None to call ``pool`` instead (a replaced or hooked pool).
        pool: the block's pool, (n, C, H, W) → (n, C, K, K).
        features: the pooled input → the generator's input [features, 1], (n, r, K², r + 1).
        guide: the guide conv, (n, C, H, W) → (n, r, H', W').
        generator_matrix: () → (r, r + 1, C·O), the generator's weights with the bias row.
    """

    regions: int
    out_channels: int
    geometry: tuple[int, int, int, int]
    pool_rows: tuple[Tensor, Tensor] | None
    pool: Callable[[Tensor], Tensor]
    features: Callable[[Tensor], Tensor]
    guide: Callable[[Tensor], Tensor]
    generator_matrix: Callable[[], Tensor]


def region_first_forward(x: Tensor, parts: RegionFirstParts) -> Tensor:
    """Region first, then each pixel's own region's kernels only (no autograd).

    1. Per range of a few samples (:func:`_sample_ranges`): their input as channels-last
       rows, after one zero row shared by the batch; their adaptive average pool,
       P_h · X · P_wᵀ on those rows (``parts.pool`` itself when ``pool_rows`` is None),
       and from it the generator's features; their guide (on the channels-last view) and
       each pixel's region (the first argmax). Before the ranges, one chunk makes the
       generator matrix. The block's submodules called here run once per range, on
       whichever thread takes it: their hooks see ranges of samples, not the batch.
    2. Per sample: its r kernels, one generator matmul; then, in bands of a few output
       rows: the band's pixels sorted by region, their im2col rows gathered in that order
       by one row gather from the channels-last rows (a tap in the zero padding reads the
       zero row: :func:`~reparam.ops.region_corr.window_index`), one segment matmul of
       each region's rows with that region's kernel, the results put back in pixel
       order. No im2col row is written twice. A sample whose im2col rows fit in one band
       is one chunk, its kernels and rows made and used by one thread while they are in
       cache; a larger one has its bands shared out, also in a batch of one.

    Threads: all these chunks are shared out in one
    :func:`~reparam.ops.threads.parallel_for`, each worker running its ops with one
    intra-op thread and pulling the next chunk: on a machine where another process holds
    a core every parallel op would stall at its thread barrier. A sample's chunk waits
    only for the generator matrix and its own range, so threads meet once per call, not
    once per step (B8 32², 2 threads: 3-6% faster than a loop per step, interleaved).
    Steps are few, and their ops large: ops of a few microseconds, run per chunk on
    several threads, hold the GIL longer than they compute and slow each other down.

    The output size must be at least 1x1 (the caller falls back to the reference
    formulation, whose convolution says why otherwise).
    """
    regions, out_channels, geometry = parts.regions, parts.out_channels, parts.geometry
    k = geometry[0]
    batch, channels, height, width = x.shape
    out_h, out_w = (corr_output_size(n, *geometry) for n in (height, width))
    pixels_in, pixels_out, taps = height * width, out_h * out_w, k * k
    pool_rows = parts.pool_rows
    # All samples' channels-last rows, after one zero row that padding taps read.
    rows = x.new_empty((1 + batch * pixels_in, channels))
    images = rows[1:].view(batch, height, width, channels)
    pooled = x.new_empty((batch, channels, k, k))
    choice = torch.empty((batch, pixels_out), dtype=torch.long, device=x.device)
    generator: list[Tensor] = []

    ranges = _sample_ranges(batch, pixels_in)
    features = x.new_empty((batch, regions, taps, regions + 1))
    out = x.new_empty((batch, out_channels, pixels_out))
    kernel_shape = (regions, taps * channels, out_channels)

    def make_generator() -> None:
        generator.append(parts.generator_matrix())

    def prepare(first: int, last: int) -> None:
        samples = images[first:last].view(last - first, pixels_in, channels)
        for b in range(first, last):
            to_channels_last(x[b], out=samples[b - first])
        if pool_rows is None:  # a replaced or hooked pool: the module itself
            pooled[first:last] = parts.pool(x[first:last])
        else:  # P_h · X · P_wᵀ on the channels-last rows just written (still in cache)
            across = torch.matmul(pool_rows[1], images[first:last])  # (n, H, K, C)
            down = torch.matmul(pool_rows[0], across.reshape(last - first, height, -1))
            pooled[first:last] = down.view(last - first, k, k, channels).permute(0, 3, 1, 2)
        features[first:last] = parts.features(pooled[first:last])
        guide = parts.guide(images[first:last].permute(0, 3, 1, 2))
        choice[first:last] = first_max_index(guide, 1).reshape(last - first, -1)

    def generate(b: int, kernels: Tensor) -> Tensor:
        """Sample b's kernels, (r, K·K·C, O), into ``kernels``: per region one matmul of
        its features (K², r + 1) with its generator matrix, whose (c, o) column order
        makes every region's kernel a contiguous (K·K·C, O) matrix."""
        torch.bmm(features[b], generator[0], out=kernels.view(regions, taps, -1))
        return kernels

    def run_band(b: int, kernels: Tensor, top: int, bottom: int) -> None:
        first, last = top * out_w, bottom * out_w
        band_choice = choice[b, first:last]
        order = torch.argsort(band_choice, stable=True)
        counts = torch.bincount(band_choice, minlength=regions).tolist()
        # Band temporaries in per-thread scratch buffers: fresh multi-MiB blocks would
        # fault in page by page on every call.
        by_region = scratch("drconv.sorted_rows", (last - first, taps * channels), x)
        windows = window_index(height, width, geometry, x.device, top, bottom)
        sources = rows_read(windows.index_select(0, order), 1 + b * pixels_in)
        torch.index_select(rows, 0, sources.view(-1), out=by_region.view(-1, channels))
        product = segment_mm(by_region, kernels, counts, onednn=True)
        result = scratch("drconv.result", tuple(product.shape), x).index_copy_(0, order, product)
        out[b, :, first:last].copy_(result.t())

    # One loop of dependent chunks: the generator matrix (chunk 0), each range's
    # preparation (chunks 1 ..), then the samples, each waiting only for chunk 0 and
    # its own range. A thread that is done preparing goes on to samples while the
    # other still prepares.
    rows[0].zero_()
    tasks: list[Callable[[], object]] = [make_generator]
    needs: list[tuple[int, ...]] = [()]
    prepared: dict[int, int] = {}  # sample -> the chunk that prepares it
    for first, last in ranges:
        prepared.update(dict.fromkeys(range(first, last), len(tasks)))
        tasks.append(partial(prepare, first, last))
        needs.append(())
    bands = _bands(out_h, out_w * taps * channels * x.element_size())
    if len(bands) == 1:

        def run_sample(b: int) -> None:
            # A sample's kernels in a per-thread scratch buffer, unless they are large.
            kernels = scratch("drconv.kernels", kernel_shape, x, max_bytes=_BAND_BYTES)
            run_band(b, generate(b, kernels), 0, out_h)

        for b in range(batch):
            tasks.append(partial(run_sample, b))
            needs.append((0, prepared[b]))
    else:  # each sample's kernels made once, its bands shared out
        kernels = x.new_empty((batch, *kernel_shape))
        for b in range(batch):
            generated = len(tasks)
            tasks.append(partial(generate, b, kernels[b]))
            needs.append((0, prepared[b]))
            for top, bottom in bands:
                tasks.append(partial(run_band, b, kernels[b], top, bottom))
                needs.append((generated,))
    parallel_for(_call, tasks, x.device, needs=needs)
    return out.view(batch, out_channels, out_h, out_w)
