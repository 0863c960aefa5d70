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
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from reparam.ops.threads import modes_active

__all__ = ["segment_mm", "segment_tmm"]


def segment_mm(a: Tensor, b: Tensor, counts: list[int]) -> Tensor:
    """(rows, N): each group of consecutive rows of ``a`` (rows, K) times its ``b[g]`` (K, N)."""
    if _grouped_ok(a, b) and not modes_active():
        return torch._grouped_mm(a, b, offs=_offsets(counts, a.device))
    out = a.new_empty((a.shape[0], b.shape[2]))
    start = 0
    for group, count in enumerate(counts):
        if count:
            torch.mm(a[start : start + count], b[group], out=out[start : start + count])
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
