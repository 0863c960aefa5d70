"""Matrix products over row segments: one product per group of consecutive rows.

With the rows of ``a`` cut into consecutive groups of ``counts[g]`` rows, A_g:

    segment_mm(a, b, counts) = [A_0 · b[0]; A_1 · b[1]; …]       (rows × N)

and, with B_g the same groups of the rows of ``b``, its weight gradient

    segment_tmm(a, b, counts) = [A_0ᵀ · B_0, A_1ᵀ · B_1, …]       (G × K × N)

DRConv's per-region products are of this form once the pixels are sorted by region. On
CPU, ``torch._grouped_mm`` computes them in one op (it matched the loop of ``mm`` bit for
bit wherever we compared). One op instead of one per group matters when threads share out
the work, since every op call holds the GIL while Python hands it its arguments. It takes
float32 operands whose strides are multiples of 16 bytes (and is private to torch, so it
is probed once); anything else runs the loop, and so does everything while a torch
dispatch mode is active (``FlopCounterMode`` has no formula for the grouped op).

Each product itself, float32 on CPU, runs as oneDNN's matmul (:func:`dense_mm`) where
torch has it: torch's ``mm`` calls MKL, which on the AMD EPYC development machine runs at
95-110 GFLOP/s on one thread where oneDNN's runs at 160-240 (AVX-512; the 1024 x 576 x 64
products of DRConv's bands, and 1024 x 576 x 512 of its training forward).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from reparam.ops.threads import modes_active

__all__ = ["dense_mm", "segment_mm", "segment_tmm"]


def dense_mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a`` (M, K) · ``b`` (K, N), into ``out`` when given: oneDNN's matmul for float32 CPU
    operands that need no gradient (while no dispatch mode watches), else ``torch.mm``.

    oneDNN reads ``b`` transposed in place (any strides): no copy of the weights. Its
    result is a new tensor, copied into ``out``; the copy costs a few percent of the
    product it replaces."""
    if _onednn_ok(a, b):
        product = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
        return product if out is None else out.copy_(product)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def segment_mm(a: Tensor, b: Tensor, counts: list[int], *, onednn: bool = False) -> Tensor:
    """(rows, N): each group of consecutive rows of ``a`` (rows, K) times its ``b[g]`` (K, N).

    With ``onednn``, each group's product is :func:`dense_mm` (oneDNN where it applies):
    faster on CPUs where MKL does not use AVX-512, rounded differently from ``mm`` (sums
    in another order: within float32 rounding of the product's scale, not of each
    element)."""
    onednn = onednn and _onednn_ok(a, b)
    if not onednn and _grouped_ok(a, b) and not modes_active():
        return torch._grouped_mm(a, b, offs=_offsets(counts, a.device))
    out = a.new_empty((a.shape[0], b.shape[2]))
    start = 0
    for group, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            if onednn:
                _bucketed_product(a, b[group], start, count, out[rows])
            else:
                torch.mm(a[rows], b[group], out=out[rows])
            start += count
    return out


def segment_tmm(a: Tensor, b: Tensor, counts: list[int], out: Tensor) -> Tensor:
    """``out`` (G, K, N) = [A_0ᵀ · B_0, A_1ᵀ · B_1, …] for the groups of consecutive rows of
    ``a`` (rows, K) and ``b`` (rows, N): the weight gradient of :func:`segment_mm`; an empty
    group gives zeros. One ``mm`` per group, written straight into ``out[g]`` (any stride
    between groups): the grouped op's 2-D x 2-D form was 10% faster, but its result then
    took a copy into place that cost more (1024 x 576 rows, 8 groups)."""
    start = 0
    for group, count in enumerate(counts):
        if count:
            torch.mm(a[start : start + count].t(), b[start : start + count], out=out[group])
        else:
            out[group].zero_()
        start += count
    return out


# oneDNN makes (and caches, process-wide, 1024 at most) one matmul primitive per operand
# shape, so a product over a group's exact row count would make a new one for almost every
# group, 10-25 µs each, and push other primitives (the convolutions of the rest of a
# network) out of the cache. A group's product runs over its row count rounded up to a
# multiple of _ROW_BUCKET instead, the rows after (or before) the group's included and
# their results dropped: at most rows / _ROW_BUCKET shapes per (K, N), 6% more work.
_ROW_BUCKET = 16


def _bucketed_product(a: Tensor, b: Tensor, start: int, count: int, out: Tensor) -> None:
    """``out`` = a[start : start + count] · b, by oneDNN over a row-count bucket of ``a``."""
    total = a.shape[0]
    padded = -(-count // _ROW_BUCKET) * _ROW_BUCKET
    if padded > total:  # fewer rows in all than the bucket
        padded = count
    # The bucket runs on into the next groups' rows, or near the end starts in the
    # previous groups' rows: first <= start, start + count <= first + padded <= total.
    first = min(start, total - padded)
    keep = slice(start - first, start - first + count)
    product = torch.ops.mkldnn._linear_pointwise(
        a[first : first + padded], b.t(), None, "none", [], ""
    )
    out.copy_(product[keep])


def _onednn_ok(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`dense_mm` runs oneDNN's matmul on these operands: float32 on CPU, no
    autograd graph to record (the op has no derivative), no dispatch mode active
    (``FlopCounterMode`` has no formula for it), no empty dimension, and the op works."""
    for t in (a, b):
        if t.dtype != torch.float32 or t.device.type != "cpu" or 0 in t.shape:
            return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    return not modes_active() and _onednn_available()


@functools.cache
def _onednn_available() -> bool:
    """torch.ops.mkldnn._linear_pointwise exists and agrees with ``mm`` on a small case."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 8, generator=generator)
    b = torch.randn(8, 5, generator=generator)
    try:
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False
    return got.shape == (6, 5) and bool(torch.allclose(got, a @ b, atol=1e-5))


def _offsets(counts: list[int], device: torch.device) -> Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def _grouped_ok(*operands: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: float32 on CPU; in each one's last
    two dimensions one stride 1 and the other a multiple of 16 bytes (4 elements), any
    batch stride and the storage offset multiples of 4, the output's rows too; and the op
    works at all."""
    for t in operands:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
        *batch, rows, cols = t.stride()
        if not ((cols == 1 and rows % 4 == 0) or (rows == 1 and cols % 4 == 0)):
            return False
        if any(s % 4 for s in batch) or t.storage_offset() % 4:
            return False
    if operands[-1].shape[-1] % 4:
        return False
    return _grouped_mm_available()


@functools.cache
def _grouped_mm_available() -> bool:
    """torch._grouped_mm exists and agrees with a loop of mm on a small case."""
    grouped = getattr(torch, "_grouped_mm", None)
    if grouped is None:
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 8, generator=generator)
    b = torch.randn(3, 8, 4, generator=generator)
    counts = [5, 0, 7]
    try:
        got = grouped(a, b, offs=_offsets(counts, a.device))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    expected = torch.cat([a[:5] @ b[0], a[5:] @ b[2]])
    return got.shape == expected.shape and bool(torch.allclose(got, expected, atol=1e-5))
