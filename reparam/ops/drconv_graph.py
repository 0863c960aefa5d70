"""DRConv's region-first inference in standard operators, for deployed graphs (ONNX, .pt2).

The same result as :func:`~reparam.ops.drconv_kernels.region_first_forward`, with 1/r of the
correlation's work, written in ops that every exporter turns into standard ONNX (Gather,
ScatterElements, CumSum, MatMul, ...) with a dynamic batch. For sample b, pixel p and
its region ρ(p) = argmax_ρ guide[b, ρ, p] (the first largest)::

    y[b, :, p] = P_b[p] · W_{b,ρ(p)}

1. Each pixel's slot in a padded, region-major layout: rank(p), the number of earlier
   pixels of the sample in the same region (an exclusive cumulative sum of the one-hot
   choice), and slot(p) = ρ(p)·M + rank(p), with M the largest region of the batch.
2. The source pixel of every slot (B, r·M): the pixel scattered there, or a dummy pixel
   whose every tap reads a zero row.
3. The im2col rows of every slot in one row gather from the input's channels-last rows
   (a window table gives, per pixel and tap, the row read; padding taps read the zero
   row): (B, r, M, K²·C), taps outer, channels inner.
4. One batched MatMul with the sample's region kernels (B, r, K²·C, O), then each pixel's
   row gathered back from its slot. In mode ``"op"`` (``--corr custom`` exports, which ship
   one ``com.reparam::Corr`` node) the same products are one Corr of groups r with 1×1
   kernels (:func:`_products_as_corr`), so a runtime's own Corr kernel does the 1/r work.

The work is B·r·M rows of K²·C × O: 1/r of the all-regions form when the regions are even
(M ≈ H'W'/r), and at most the same when one region takes every pixel. M depends on the
data; torch.export records it as a size computed in the graph. The window table is a
constant of the input's height and width, so the input's spatial sizes must be concrete
(:func:`graph_applies`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reparam.ops.corr import corr, corr_output_size, get_corr_mode
from reparam.ops.region_corr import first_max_index

__all__ = ["graph_applies", "region_first_graph"]


def graph_applies(x: Tensor) -> bool:
    """Whether :func:`region_first_graph` can take ``x``: concrete height and width (the
    window table is built from them) and a non-empty batch when it is concrete (the largest
    region of an empty batch is undefined)."""
    height, width, batch = x.shape[2], x.shape[3], x.shape[0]
    return (
        isinstance(height, int)
        and isinstance(width, int)
        and (not isinstance(batch, int) or batch > 0)
    )


def _window_rows(height: int, width: int, geometry, device) -> Tensor:
    """(H'·W' + 1, K²) int64: for output pixel p and tap t = i·K + j, 1 + y·W + x with
    y = s·u + d·i − pad, x = s·v + d·j − pad, or 0 (the zero row) where (y, x) lies in the
    padding; the last row, the dummy pixel, all 0.

    Made afresh on every call: under a tracer its tensors are fake, and must never be
    cached (as :func:`~reparam.ops.region_corr.window_index` caches its tables). Small
    values only, so a runtime computing indices in int32 reads the same rows.
    """
    k, stride, pad, dilation = geometry
    out_h, out_w = (corr_output_size(n, *geometry) for n in (height, width))
    taps = torch.arange(k, device=device) * dilation
    ys = (torch.arange(out_h, device=device) * stride - pad).unsqueeze(1) + taps
    xs = (torch.arange(out_w, device=device) * stride - pad).unsqueeze(1) + taps
    ys, xs = ys.view(out_h, 1, k, 1), xs.view(1, out_w, 1, k)
    inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    rows = torch.where(inside, ys * width + xs + 1, 0).view(out_h * out_w, k * k)
    return torch.cat([rows, rows.new_zeros((1, k * k))])


def _products_as_corr(gathered: Tensor, kernels: Tensor) -> Tensor:
    """gathered (B, r, M, K²·C) @ kernels (B, r, K²·C, O) as one per-sample correlation.

    Corr(x, k, groups=r) with 1×1 kernels computes y[b, f, o] = Σ_c k[b, f, c] · x[b, ρ·K²C
    + c, o] for filter f = ρ·M + m of group ρ. Taking the slots' im2col rows as the r·M
    filters (B, r·M, K²·C, 1, 1) and the region kernels as the "image" (B, r·K²·C, O, 1)
    gives y[b, ρ·M + m, o] = Σ_c gathered[b, ρ, m, c] · kernels[b, ρ, c, o], the batched
    MatMul, from two reshapes of contiguous tensors: no transposing copy of either.
    """
    batch, regions, largest, depth = gathered.shape
    image = kernels.reshape(batch, regions * depth, kernels.shape[3], 1)
    # Unsqueeze, not a reshape to (…, 1, 1): the 1×1 stays static in runtimes that convert
    # Corr with a fixed window (OpenVINO's extension reads it from the partial shape).
    filters = gathered.reshape(batch, regions * largest, depth)[:, :, :, None, None]
    return corr(image, filters, regions)  # (B, r·M, O, 1)


def region_first_graph(
    x: Tensor, kernels: Tensor, guide: Tensor, geometry: tuple[int, int, int, int]
) -> Tensor:
    """y (B, O, H', W') of DRConv from its input, kernels and guide, in standard ops.

    Args:
        x: input (B, C, H, W), H and W concrete.
        kernels: (B, r, K·K·C, O), sample b's region-ρ kernel ordered as the im2col rows
            (taps outer, channels inner).
        guide: (B, r, H', W').
        geometry: (K, stride, padding, dilation).
    """
    batch, channels, height, width = x.shape
    regions, out_channels = kernels.shape[1], kernels.shape[3]
    out_h, out_w = (corr_output_size(n, *geometry) for n in (height, width))
    pixels, taps = out_h * out_w, geometry[0] ** 2
    choice = first_max_index(guide, 1).reshape(batch, pixels)  # (B, P)
    # 1. rank within the region, slot in the padded layout.
    onehot = F.one_hot(choice, regions)  # (B, P, r)
    counts = onehot.sum(dim=1)  # (B, r)
    largest = counts.max().item()  # M: a size computed in the graph
    torch._check(largest >= 1)
    torch._check(largest <= pixels)
    rank = (onehot.cumsum(dim=1) - onehot).gather(2, choice.unsqueeze(2)).squeeze(2)
    slot = choice * largest + rank  # (B, P)
    # 2. the source pixel of every slot; pixel index P is the dummy (every tap: zero row).
    every_pixel = torch.arange(pixels, device=x.device).expand(batch, pixels)
    source = torch.full((batch, regions * largest), pixels, dtype=torch.long, device=x.device)
    source = source.scatter(1, slot, every_pixel)
    # 3. the slots' im2col rows: one gather from the channels-last rows, row 0 of each
    # sample's block of 1 + H·W rows being zeros.
    windows = _window_rows(height, width, geometry, x.device)
    block = 1 + height * width
    rows = torch.cat([x.new_zeros((batch, 1, channels)), x.flatten(2).transpose(1, 2)], 1)
    first_rows = (torch.arange(batch, device=x.device) * block).view(batch, 1, 1)
    read = windows[source] + first_rows  # (B, r·M, K²)
    gathered = rows.reshape(-1, channels).index_select(0, read.reshape(-1))
    gathered = gathered.view(batch, regions, largest, taps * channels)
    # 4. one batched MatMul (or Corr), then each pixel's row from its slot.
    if get_corr_mode() == "standard":
        products = torch.matmul(gathered, kernels)
    else:
        products = _products_as_corr(gathered, kernels)
    products = products.reshape(-1, out_channels)  # (B·r·M, O)
    first_slots = (torch.arange(batch, device=x.device) * (regions * largest)).view(batch, 1)
    out = products.index_select(0, (slot + first_slots).reshape(-1))
    return (
        out.view(batch, pixels, out_channels)
        .transpose(1, 2)
        .reshape(batch, out_channels, out_h, out_w)
    )
