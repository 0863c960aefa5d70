"""Dynamic Region-Aware Convolution, DRConv (Chen et al., CVPR 2021), as in the seed.

For input x (B, C, H, W) and r regions:

1. kernel generator: adaptive average pool to KxK → 1x1 conv (C → r²) → sigmoid → grouped
   1x1 conv (r² → r·C·O, r groups); reshaped, every sample gets r kernels (O, C, K, K);
2. guide: a KxK conv (C → r) with the block's stride, padding and dilation gives r region
   maps;
3. per-sample correlation of x with its r·O kernels (:func:`reparam.ops.corr`), then at
   every output pixel the output of the region whose guide map is largest.

Region assignment (the seed's ``asign_index``) is an argmax, so it has no gradient; the seed
trains with a straight-through estimator: forward the hard choice, backward as if the output
were the softmax mixture Σ_ρ softmax(guide)_ρ · out_ρ for the guide, and through the hard
mask for the kernels. :func:`assign_region` implements that; :func:`assign_region_reference`
is the same in plain autograd, ``hard + soft − soft.detach()`` with soft computed from
detached outputs.

The reference forward computes all r region outputs and keeps one per pixel. When no
autograd graph is needed (``torch.no_grad()`` / ``torch.inference_mode()``, or no input or
parameter requiring grad), :meth:`DRConv2d.forward` takes the guide's argmax first, sorts
every sample's pixels by region and multiplies each region's pixel columns (im2col) with
that region's kernels only: 1/r of the correlation work, same outputs up to rounding. While
tracing (``torch.export``, ONNX export) or under ``corr_mode("standard")`` it always uses
the reference formulation, which exports with a dynamic batch.

Training (an autograd graph is needed) computes all r region outputs, as the guide's
softmax gradient needs them, but the correlation's backward only for the region each pixel
chose (the straight-through gradient is zero elsewhere): per sample, its pixels sorted by
region, one matmul per region for the kernels' gradient and one segment matmul for the
im2col rows' gradient, folded back onto the input
(:class:`~reparam.blocks.region_corr.RegionCorr`): 1/r of the backward work of the grouped
convolution. The kernels are generated directly in the layout those matmuls read
(:meth:`DRConv2d._tap_major_kernels`), so no copy reorders them. The gradients are those of
the seed's formulation, :meth:`DRConv2d.forward_reference`.

Threads: inference shares ranges of samples, samples and bands of output rows, training shares
samples, between ``torch.get_num_threads()`` threads that each run their ops with one
intra-op thread (:func:`~reparam.ops.threads.parallel_for`), so the many medium-sized ops
never wait at a thread barrier, which stalls when another process holds a core. (A
training batch smaller than the thread count runs its samples in turn with all intra-op
threads instead.)

State-dict keys follow the seed: ``conv_kernel.{1,3}.*`` (index 0 is the pool, 2 the
sigmoid) and ``conv_guide.*``. Index 0 is :class:`~reparam.ops.AdaptiveAvgPool2dExact`, which
exports exactly at every input size, instead of ``nn.AdaptiveAvgPool2d``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from reparam.blocks.region_corr import (
    RegionCorr,
    first_max_index,
    rows_read,
    straight_through_guide_grad,
    to_channels_last,
    window_index,
)
from reparam.errors import BlockConfigError, UserInputError
from reparam.ops.corr import corr, corr_output_size, get_corr_mode
from reparam.ops.pooling import AdaptiveAvgPool2dExact, pooling_matrix
from reparam.ops.segment_mm import segment_mm
from reparam.ops.threads import parallel_for
from reparam.ops.workspace import scratch

__all__ = ["DRConv2d", "assign_region", "assign_region_reference"]

# Below 3 regions the 1/r path saves too little to pay for its im2col gather (measured on
# 2 CPU cores: equal speed at r = 2, B8 C64→64 32² K3).
_FAST_MIN_REGIONS = 3
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
    if torch.compiler.is_compiling() or not needs_grad:
        return _hard_select(outputs, guide)
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
def _pooling_matrix(length: int, k: int, dtype: torch.dtype, device) -> Tensor:
    """:func:`~reparam.ops.pooling.pooling_matrix` (K, L), cached; read only."""
    with torch.inference_mode(False):  # usable whatever mode the first call ran in
        return pooling_matrix(length, k, torch.empty(0, dtype=dtype, device=device))


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own, or global module hooks)."""
    from torch.nn.modules import module as module_globals

    own = module._forward_hooks or module._forward_pre_hooks
    every = getattr(module_globals, "_global_forward_hooks", None) or getattr(
        module_globals, "_global_forward_pre_hooks", None
    )
    return bool(own or every)


def _autocasting(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (False for devices without autocast)."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _without_data(x: Tensor) -> bool:
    """Whether ``x`` has no values to read (meta device, or a fake tensor): the 1/r path
    reads the region counts back, so such inputs take the reference formulation."""
    if x.device.type == "meta":
        return True
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # a torch without it has no fake tensors of this kind either
        return False
    return detect_fake_mode((x,)) is not None  # a fake input, or a fake mode active


class DRConv2d(nn.Module):
    """Dynamic region-aware convolution with the seed's layout and straight-through training.

    Args:
        in_channels, out_channels: channel counts (>= 1).
        kernel_size: odd K.
        region_num: r >= 1 regions (r kernels per sample).
        stride, padding, dilation: of the correlation and of the guide conv (the seed's
            ``**kwargs``).

    Attributes:
        fast_inference: use the 1/r inference path when no autograd graph is needed and
            region_num >= 3 (default True); the outputs are the same either way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        region_num: int = 8,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if region_num < 1:
            raise BlockConfigError(f"DRConv2d: region_num must be >= 1, got {region_num}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise BlockConfigError(
                f"DRConv2d needs an odd kernel_size (the generated kernels and the guide "
                f"conv are centred on the output pixel), got {kernel_size}"
            )
        if in_channels < 1 or out_channels < 1:
            raise BlockConfigError(
                f"DRConv2d: in_channels and out_channels must be >= 1, got {in_channels} "
                f"and {out_channels}"
            )
        if stride < 1 or dilation < 1 or padding < 0:
            raise BlockConfigError(
                f"DRConv2d: need stride, dilation >= 1 and padding >= 0, got stride={stride}, "
                f"padding={padding}, dilation={dilation}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.region_num = kernel_size, region_num
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.fast_inference = True
        self.conv_kernel = nn.Sequential(
            AdaptiveAvgPool2dExact((kernel_size, kernel_size)),
            nn.Conv2d(in_channels, region_num * region_num, kernel_size=1),
            nn.Sigmoid(),
            nn.Conv2d(
                region_num * region_num,
                region_num * in_channels * out_channels,
                kernel_size=1,
                groups=region_num,
            ),
        )
        self.conv_guide = nn.Conv2d(
            in_channels, region_num, kernel_size, stride=stride, padding=padding, dilation=dilation
        )

    def _generated(self, x: Tensor) -> Tensor:
        """``conv_kernel(x)`` as a (r, O, C, B, K, K) view, region-major as in the seed.

        The last, grouped 1x1 conv of ``conv_kernel`` (r² → r·C·O on KxK pixels) runs as one
        batched matmul over the r groups, several times faster on CPU than the grouped
        convolution; :meth:`_kernels` gets the seed's layout from it with one copy.
        """
        regions, k = self.region_num, self.kernel_size
        batch = x.shape[0]
        features = self.conv_kernel[2](self.conv_kernel[1](self.conv_kernel[0](x)))
        features = features.reshape(batch, regions, regions, k * k).permute(1, 2, 0, 3)
        generator = self.conv_kernel[3]
        weight = generator.weight.reshape(regions, -1, regions)
        kernel = torch.baddbmm(
            generator.bias.reshape(regions, -1, 1), weight, features.reshape(regions, regions, -1)
        )
        return kernel.reshape(regions, self.out_channels, self.in_channels, batch, k, k)

    def _kernels(self, x: Tensor) -> Tensor:
        """Per-sample kernels (B, r·O, C, K, K): ``conv_kernel(x)`` reshaped, as in the seed."""
        kernel = self._generated(x).permute(3, 0, 1, 2, 4, 5)
        k = self.kernel_size
        kernels = self.region_num * self.out_channels
        return kernel.reshape(x.shape[0], kernels, self.in_channels, k, k)

    def _generator_matrix(self) -> Tensor:
        """The last, grouped 1x1 conv of ``conv_kernel`` as (r, r + 1, C·O): per region ρ,
        the matrix mapping [features, 1] (r + 1) to that region's kernel values ordered
        (c, o), the bias folded in as the last row."""
        regions, channels, out_channels = self.region_num, self.in_channels, self.out_channels
        generator = self.conv_kernel[3]
        # Output channel ρ·O·C + o·C + c of the grouped conv (the seed's kernel layout).
        weight = generator.weight.reshape(regions, out_channels, channels, regions)
        bias = generator.bias.reshape(regions, out_channels, channels)
        # Two transposing copies into one buffer: 3x faster than cat + permute + reshape.
        matrix = weight.new_empty((regions, regions + 1, channels, out_channels))
        matrix[:, :regions].copy_(weight.permute(0, 3, 2, 1))
        matrix[:, regions].copy_(bias.permute(0, 2, 1))
        return matrix.view(regions, regions + 1, channels * out_channels)

    def _kernel_features(self, x: Tensor) -> Tensor:
        """The generator's input for every sample and tap, (r, B, K², r + 1): the pooled,
        1x1-convolved, sigmoid features of region ρ's group, then a 1 for the bias."""
        return self._features_from_pooled(self.conv_kernel[0](x)).transpose(0, 1)

    def _tap_major_kernels(
        self, features: Tensor, generator: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Per region and sample, the kernel as a (K·K·C, O) matrix, taps outer and channels
        inner as the channels-last im2col rows are: (r, B, K·K·C, O).

        One matmul per region of :meth:`_kernel_features` (``features``, any slice of
        samples) with :meth:`_generator_matrix` (``generator``), whose (c, o) column order
        makes every (sample, region) matrix contiguous: no copy of the kernel values.
        ``out``, a contiguous tensor of the result's shape, receives it (no autograd).
        """
        regions, batch = features.shape[0], features.shape[1]
        flat = features.reshape(regions, -1, features.shape[-1])
        taps_channels = self.kernel_size**2 * self.in_channels
        shape = (regions, batch, taps_channels, self.out_channels)
        if out is not None:
            torch.bmm(flat, generator, out=out.view(regions, flat.shape[1], generator.shape[-1]))
            return out
        return torch.bmm(flat, generator).view(shape)  # (r, B·K², C·O) viewed

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UserInputError(
                f"DRConv2d expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if _autocasting(x) and not self._tracing_or_standard():
            # The 1/r and chosen-region paths multiply the input with the weights directly,
            # in their dtype: under autocast they run as a float32 op does, with autocast
            # off on the input cast to the weights' dtype (it may arrive in the autocast
            # dtype), and return that dtype. (On this CPU a float32 matmul is also faster
            # than a bfloat16 one.)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.to(next(self.parameters()).dtype))
        if self.uses_fast_path(x):
            return self._forward_fast(x)
        if self._tracing_or_standard() or not self._needs_grad(x):
            return self.forward_reference(x)
        kernels = self._tap_major_kernels(self._kernel_features(x), self._generator_matrix())
        return RegionCorr.apply(
            x, kernels, self.conv_guide(x), self.kernel_size, self.stride, self.padding,
            self.dilation,
        )  # fmt: skip

    def forward_reference(self, x: Tensor) -> Tensor:
        """The seed's formulation: all r region outputs, then one kept per pixel."""
        self._check_input(x)
        outputs = corr(x, self._kernels(x), 1, self.stride, self.padding, self.dilation)
        batch, _, height, width = outputs.shape
        outputs = outputs.reshape(batch, self.region_num, self.out_channels, height, width)
        return assign_region(outputs, self.conv_guide(x))

    def uses_fast_path(self, x: Tensor) -> bool:
        """Whether :meth:`forward` takes the 1/r inference path for this input now."""
        return (
            self.fast_inference
            and self.region_num >= _FAST_MIN_REGIONS
            and not self._tracing_or_standard()
            and not self._needs_grad(x)
            and not _without_data(x)
        )

    @staticmethod
    def _tracing_or_standard() -> bool:
        return (
            torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export()
            or get_corr_mode() == "standard"
        )

    def _needs_grad(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _forward_fast(self, x: Tensor) -> Tensor:
        """Region first, then each pixel's own region's kernels only (no autograd).

        1. Per range of a few samples (:func:`_sample_ranges`): their input as
           channels-last rows, after one zero row shared by the batch; their adaptive
           average pool, P_h · X · P_wᵀ on those rows (``conv_kernel[0]`` itself when it
           was replaced or is hooked), and from it the generator's features
           (``conv_kernel``'s 1x1 conv and sigmoid); their guide (``conv_guide`` on the
           channels-last view) and each pixel's region (the first argmax). Before the
           ranges, one chunk turns the kernel generator's weights into
           :meth:`_generator_matrix`. The submodules called here run once per range, on
           whichever thread takes it: their hooks see ranges of samples, not the batch.
        2. Per sample: its r kernels, one generator matmul; then, in bands of a few output
           rows: the band's pixels sorted by region, their im2col rows gathered in that
           order by one row gather from the channels-last rows (a tap in the zero padding
           reads the zero row: :func:`~reparam.blocks.region_corr.window_index`), one
           segment matmul of each region's rows with that region's kernel, the results put
           back in pixel order. No im2col row is written twice. A sample whose im2col rows
           fit in one band is one chunk, its kernels and rows made and used by one thread
           while they are in cache; a larger one has its bands shared out, also in a batch
           of one.

        Threads: all these chunks are shared out in one
        :func:`~reparam.ops.threads.parallel_for`, each thread running its ops with one
        intra-op thread and pulling the next chunk: on a machine where another process
        holds a core every parallel op would stall at its thread barrier. A sample's chunk
        waits only for the generator matrix and its own range, so threads meet once per
        call, not once per step (B8 32², 2 threads: 3-6% faster than a loop per step,
        interleaved). Steps are few, and their ops large: ops of a few microseconds, run
        per chunk on several threads, hold the GIL longer than they compute and slow each
        other down.
        """
        regions, out_channels, k = self.region_num, self.out_channels, self.kernel_size
        batch, channels, height, width = x.shape
        geometry = (k, self.stride, self.padding, self.dilation)
        out_h, out_w = (corr_output_size(n, *geometry) for n in (height, width))
        if out_h < 1 or out_w < 1:  # the reference's convolution says why, in its words
            return self.forward_reference(x)
        pixels_in, pixels_out, taps = height * width, out_h * out_w, k * k
        pool_rows = self._pooling_matrices(height, width, x)
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
            generator.append(self._generator_matrix())

        def prepare(first: int, last: int) -> None:
            samples = images[first:last].view(last - first, pixels_in, channels)
            for b in range(first, last):
                to_channels_last(x[b], out=samples[b - first])
            if pool_rows is None:  # a replaced or hooked pool: the module itself
                pooled[first:last] = self.conv_kernel[0](x[first:last])
            else:  # P_h · X · P_wᵀ on the channels-last rows just written (still in cache)
                across = torch.matmul(pool_rows[1], images[first:last])  # (n, H, K, C)
                down = torch.matmul(pool_rows[0], across.reshape(last - first, height, -1))
                pooled[first:last] = down.view(last - first, k, k, channels).permute(0, 3, 1, 2)
            features[first:last] = self._features_from_pooled(pooled[first:last])
            guide = self.conv_guide(images[first:last].permute(0, 3, 1, 2))
            choice[first:last] = first_max_index(guide, 1).reshape(last - first, -1)

        def generate(b: int, kernels: Tensor) -> Tensor:
            """Sample b's kernels, (r, K·K·C, O), into ``kernels``."""
            sample = features[b].unsqueeze(1)  # (r, 1, K², r + 1)
            self._tap_major_kernels(sample, generator[0], out=kernels.unsqueeze(1))
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
            product = segment_mm(by_region, kernels, counts)
            result = scratch("drconv.result", tuple(product.shape), x).index_copy_(
                0, order, product
            )
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

    def _pooling_matrices(self, height: int, width: int, like: Tensor):
        """(P_h, P_w), the (K, H) and (K, W) averaging matrices of ``conv_kernel[0]``, when
        it is the adaptive average pool to K x K that the block builds (or the seed's) and
        no hook watches it; else None, and the fast path calls the module."""
        pool, k = self.conv_kernel[0], self.kernel_size
        stock = isinstance(pool, AdaptiveAvgPool2dExact | nn.AdaptiveAvgPool2d)
        size = getattr(pool, "output_size", None)
        if not stock or size not in ((k, k), k) or _hooked(pool):
            return None
        return tuple(_pooling_matrix(n, k, like.dtype, like.device) for n in (height, width))

    def _features_from_pooled(self, pooled: Tensor) -> Tensor:
        """The generator's input [features, 1] per sample, region and tap, (B, r, K², r + 1),
        from the adaptively pooled input (B, C, K, K): ``conv_kernel``'s 1x1 conv and
        sigmoid of region ρ's group, then a 1 for the bias."""
        batch, taps, regions = pooled.shape[0], self.kernel_size**2, self.region_num
        reduced = self.conv_kernel[2](self.conv_kernel[1](pooled))  # (B, r², K, K)
        features = pooled.new_empty((batch, regions, taps, regions + 1))
        features[..., :regions] = reduced.view(batch, regions, regions, taps).transpose(2, 3)
        features[..., regions] = 1
        return features

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"region_num={self.region_num}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}"
        )
