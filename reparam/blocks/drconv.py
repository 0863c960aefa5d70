"""Dynamic Region-Aware Convolution, DRConv (Chen et al., CVPR 2021), as in the blog post.

For input x (B, C, H, W) and r regions:

1. kernel generator: adaptive average pool to KxK → 1x1 conv (C → r²) → sigmoid → grouped
   1x1 conv (r² → r·C·O, r groups); reshaped, every sample gets r kernels (O, C, K, K);
2. guide: a KxK conv (C → r) with the block's stride, padding and dilation gives r region
   maps;
3. per-sample correlation of x with its r·O kernels (:func:`reparam.ops.corr`), then at
   every output pixel the output of the region whose guide map is largest.

Region assignment (the blog post's ``asign_index``) is an argmax, so it has no gradient; the
blog post trains with a straight-through estimator: forward the hard choice, backward as if
the output were the softmax mixture Σ_ρ softmax(guide)_ρ · out_ρ for the guide, and through the hard
mask for the kernels. :func:`assign_region` implements that; :func:`assign_region_reference`
is the same in plain autograd, ``hard + soft − soft.detach()`` with soft computed from
detached outputs.

The reference forward computes all r region outputs and keeps one per pixel. When no
autograd graph is needed (``torch.no_grad()`` / ``torch.inference_mode()``, or no input or
parameter requiring grad), :meth:`DRConv2d.forward` takes the guide's argmax first, sorts
every sample's pixels by region and multiplies each region's pixel columns (im2col) with
that region's kernels only: 1/r of the correlation work, same outputs up to rounding
(:func:`~reparam.ops.drconv_kernels.region_first_forward`). Under ``corr_mode("standard")``
(which the ONNX and ``.pt2`` exporters set) it computes the same 1/r form in standard
operators (:func:`~reparam.ops.drconv_graph.region_first_graph`), so the deployed graph
does 1/r of the work too, with a dynamic batch. ``--corr custom`` exports (mode ``"op"``)
get the same form with its region products as one ``com.reparam::Corr`` node of groups r
and 1×1 filters. While tracing otherwise (``torch.compile``) it uses the reference
formulation.

Training (an autograd graph is needed) computes all r region outputs, as the guide's
softmax gradient needs them, but the correlation's backward only for the region each pixel
chose (the straight-through gradient is zero elsewhere): per sample, its pixels sorted by
region, one matmul per region for the kernels' gradient and one segment matmul for the
im2col rows' gradient, folded back onto the input
(:class:`~reparam.ops.region_corr.RegionCorr`): 1/r of the backward work of the grouped
convolution. The kernels are generated directly in the layout those matmuls read
(:meth:`DRConv2d._tap_major_kernels`), so no copy reorders them. The gradients are those of
the blog post's formulation, :meth:`DRConv2d.forward_reference`.

Threads: inference shares ranges of samples, samples and bands of output rows, training shares
samples, between ``torch.get_num_threads()`` threads that each run their ops with one
intra-op thread (:func:`~reparam.ops.threads.parallel_for`), so the many medium-sized ops
never wait at a thread barrier, which stalls when another process holds a core. (A
training batch smaller than the thread count runs its samples in turn with all intra-op
threads instead.)

State-dict keys follow the blog post: ``conv_kernel.{1,3}.*`` (index 0 is the pool, 2 the
sigmoid) and ``conv_guide.*``. Index 0 is :class:`~reparam.ops.AdaptiveAvgPool2dExact`, which
exports exactly at every input size, instead of ``nn.AdaptiveAvgPool2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reparam.errors import BlockConfigError, UserInputError
from reparam.ops.corr import corr, corr_output_size, get_corr_mode
from reparam.ops.drconv_graph import graph_applies, region_first_graph
from reparam.ops.drconv_kernels import (
    RegionFirstParts,
    assign_region,
    assign_region_reference,
    autocasting,
    cached_pooling_matrix,
    region_first_forward,
    without_data,
)
from reparam.ops.pooling import AdaptiveAvgPool2dExact
from reparam.ops.region_corr import RegionCorr

__all__ = ["DRConv2d", "assign_region", "assign_region_reference"]

# torch.fx.symbolic_trace records a call of assign_region (an autograd Function it cannot
# trace into); the traced module runs it as is.
torch.fx.wrap("assign_region")

# Below 3 regions the 1/r path saves too little to pay for its im2col gather (measured on
# 2 CPU cores: equal speed at r = 2, B8 C64→64 32² K3).
_FAST_MIN_REGIONS = 3


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own, or global module hooks)."""
    from torch.nn.modules import module as module_globals

    own = module._forward_hooks or module._forward_pre_hooks
    every = getattr(module_globals, "_global_forward_hooks", None) or getattr(
        module_globals, "_global_forward_pre_hooks", None
    )
    return bool(own or every)


class DRConv2d(nn.Module):
    """Dynamic region-aware convolution with the blog post's layout and straight-through training.

    Args:
        in_channels, out_channels: channel counts (>= 1).
        kernel_size: odd K.
        region_num: r >= 1 regions (r kernels per sample).
        stride, padding, dilation: of the correlation and of the guide conv (the blog post's
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
        """``conv_kernel(x)`` as a (r, O, C, B, K, K) view, region-major as in the blog post.

        The last, grouped 1x1 conv of ``conv_kernel`` (r² → r·C·O on KxK pixels) runs as one
        batched matmul over the r groups, several times faster on CPU than the grouped
        convolution; :meth:`_kernels` gets the blog post's layout from it with one copy.
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
        """Per-sample kernels (B, r·O, C, K, K): ``conv_kernel(x)`` reshaped as the blog post
        does."""
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
        # Output channel ρ·O·C + o·C + c of the grouped conv (the blog post's kernel layout).
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
        if isinstance(x, torch.fx.Proxy):
            return
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UserInputError(
                f"DRConv2d expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: the reference form
            return self.forward_reference(x)
        self._check_input(x)
        if autocasting(x) and not self._tracing_or_standard():
            # The 1/r and chosen-region paths multiply the input with the weights directly,
            # in their dtype: under autocast they run as a float32 op does, with autocast
            # off on the input cast to the weights' dtype (it may arrive in the autocast
            # dtype), and return that dtype. (On this CPU a float32 matmul is also faster
            # than a bfloat16 one.)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.to(next(self.parameters()).dtype))
        if self.uses_fast_path(x):
            return self._forward_fast(x)
        if self.uses_region_first_graph(x):
            return self._forward_graph(x)
        if self._tracing_or_standard() or not self._needs_grad(x):
            return self.forward_reference(x)
        kernels = self._tap_major_kernels(self._kernel_features(x), self._generator_matrix())
        return RegionCorr.apply(
            x, kernels, self.conv_guide(x), self.kernel_size, self.stride, self.padding,
            self.dilation,
        )  # fmt: skip

    def forward_reference(self, x: Tensor) -> Tensor:
        """The blog post's formulation: all r region outputs, then one kept per pixel."""
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
            and not without_data(x)
        )

    def uses_region_first_graph(self, x: Tensor) -> bool:
        """Whether :meth:`forward` computes the 1/r form in standard operators for this
        input now: under ``corr_mode("standard")``, in the graph ``torch.export`` and the
        ONNX exporter write (inference only), or in eager without autograd; in mode
        ``"op"`` only in an exported graph (its products one Corr node). Not while the
        TorchScript tracer runs: it would record the data-dependent region size as a
        constant."""
        standard = get_corr_mode() == "standard"
        return (
            self.fast_inference
            and self.region_num >= _FAST_MIN_REGIONS
            # mode "op": only in the exported graph (one Corr node of groups r, 1/r work)
            and (standard or torch.compiler.is_exporting())
            and (torch.compiler.is_exporting() or not self._needs_grad(x))
            and not torch.jit.is_tracing()
            and graph_applies(x)
        )

    def _forward_graph(self, x: Tensor) -> Tensor:
        """:func:`~reparam.ops.drconv_graph.region_first_graph` with this block's kernels
        (B, r, K·K·C, O) and guide."""
        k, batch = self.kernel_size, x.shape[0]
        # [features, 1] (B, r, K², r + 1) times the generator matrix (r, r + 1, C·O): the
        # kernels come out in the layout the MatMul reads, no transposing copy (a 6-D
        # Transpose took a third of the graph's time under onnxruntime).
        # Out of place (cat, no writes into empty buffers): plain ops for every exporter.
        regions, channels, out_channels = self.region_num, self.in_channels, self.out_channels
        reduced = self.conv_kernel[2](self.conv_kernel[1](self.conv_kernel[0](x)))
        reduced = reduced.view(batch, regions, regions, k * k).transpose(2, 3)
        features = torch.cat([reduced, reduced.new_ones((batch, regions, k * k, 1))], 3)
        generator = self.conv_kernel[3]
        weight = generator.weight.view(regions, out_channels, channels, regions)
        bias = generator.bias.view(regions, 1, out_channels, channels)
        matrix = torch.cat([weight.permute(0, 3, 2, 1), bias.permute(0, 1, 3, 2)], 1)
        kernels = torch.matmul(features, matrix.reshape(regions, regions + 1, -1))
        kernels = kernels.reshape(batch, regions, k * k * channels, -1)  # (B, r, K²·C, O)
        geometry = (k, self.stride, self.padding, self.dilation)
        return region_first_graph(x, kernels, self.conv_guide(x), geometry)

    @staticmethod
    def _tracing_or_standard() -> bool:
        return (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()  # records the calling thread's ops only, no .tolist()
            or torch.onnx.is_in_onnx_export()
            or get_corr_mode() == "standard"
        )

    def _needs_grad(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _forward_fast(self, x: Tensor) -> Tensor:
        """Region first, then each pixel's own region's kernels only (no autograd):
        :func:`~reparam.ops.drconv_kernels.region_first_forward` with this block's pool,
        feature conv, guide conv and generator."""
        height, width = x.shape[2], x.shape[3]
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        if min(corr_output_size(n, *geometry) for n in (height, width)) < 1:
            return self.forward_reference(x)  # its convolution says why, in its words
        parts = RegionFirstParts(
            regions=self.region_num,
            out_channels=self.out_channels,
            geometry=geometry,
            pool_rows=self._pooling_matrices(height, width, x),
            pool=self.conv_kernel[0],
            features=self._features_from_pooled,
            guide=self.conv_guide,
            generator_matrix=self._generator_matrix,
        )
        return region_first_forward(x, parts)

    def _pooling_matrices(self, height: int, width: int, like: Tensor):
        """(P_h, P_w), the (K, H) and (K, W) averaging matrices of ``conv_kernel[0]``, when
        it is the adaptive average pool to K x K that the block builds (or the blog post's) and
        no hook watches it; else None, and the fast path calls the module."""
        pool, k = self.conv_kernel[0], self.kernel_size
        stock = isinstance(pool, AdaptiveAvgPool2dExact | nn.AdaptiveAvgPool2d)
        size = getattr(pool, "output_size", None)
        if not stock or size not in ((k, k), k) or _hooked(pool):
            return None
        return tuple(cached_pooling_matrix(n, k, like.dtype, like.device) for n in (height, width))

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
