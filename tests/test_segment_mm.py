"""reparam.ops.segment_mm: per-group products of consecutive rows, grouped op or loop."""

from __future__ import annotations

import pytest
import torch

import reparam.ops.segment_mm as segment
from reparam.ops.segment_mm import segment_mm, segment_outer


def _loop_mm(a, b, counts):
    parts, start = [], 0
    for group, count in enumerate(counts):
        parts.append(a[start : start + count] @ b[group])
        start += count
    return torch.cat(parts)


def _loop_outer(a, c, counts):
    parts, start = [], 0
    for count in counts:
        parts.append(a[start : start + count].t() @ c[start : start + count])
        start += count
    return torch.stack(parts)


COUNTS = [[5, 0, 7, 4], [0, 0, 16, 0], [3, 3, 3, 3], [0, 0, 0, 0]]
SHAPES = [(8, 4), (576, 64), (7, 5), (3, 6)]  # (K, N): aligned (grouped op) and not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"K{k}N{n}" for k, n in SHAPES])
@pytest.mark.parametrize("counts", COUNTS, ids=["mixed", "one", "even", "empty"])
def test_segment_products_match_the_loop(counts, shape, dtype):
    generator = torch.Generator().manual_seed(0)
    k, n = shape
    rows = sum(counts)
    a = torch.randn(rows, k, generator=generator, dtype=dtype)
    b = torch.randn(len(counts), k, n, generator=generator, dtype=dtype)
    c = torch.randn(rows, n, generator=generator, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    got = segment_mm(a, b, counts)
    assert got.shape == (rows, n)
    if rows:
        torch.testing.assert_close(got, _loop_mm(a, b, counts), rtol=tol, atol=tol)
    outer = segment_outer(a, c, counts)
    assert outer.shape == (len(counts), k, n)
    torch.testing.assert_close(outer, _loop_outer(a, c, counts), rtol=tol, atol=tol)
    for group, count in enumerate(counts):
        if count == 0:
            assert not outer[group].any()


def test_strided_operands(monkeypatch):
    """Transposed and sliced operands, as DRConv passes them."""
    generator = torch.Generator().manual_seed(1)
    big = torch.randn(4, 3, 8, 12, generator=generator)
    b = big[:, 1].transpose(1, 2)[:, :, :4]  # (4, 12, 4), non-contiguous
    a = torch.randn(20, 14, generator=generator)[:, 2:]  # (20, 12), offset rows
    counts = [6, 0, 9, 5]
    torch.testing.assert_close(segment_mm(a, b, counts), _loop_mm(a, b, counts))


def test_without_the_grouped_op_the_loop_runs(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    segment._grouped_mm_available.cache_clear()
    try:
        assert not segment._grouped_mm_available()
        a, b = torch.randn(12, 8), torch.randn(3, 8, 4)
        counts = [5, 0, 7]
        torch.testing.assert_close(segment_mm(a, b, counts), _loop_mm(a, b, counts))
    finally:
        monkeypatch.undo()
        segment._grouped_mm_available.cache_clear()


def test_the_grouped_op_is_used_where_it_applies():
    if not segment._grouped_mm_available():
        pytest.skip("torch._grouped_mm is not available in this torch")
    a, b = torch.randn(12, 8), torch.randn(3, 8, 4)
    assert segment._grouped_ok(a, b)
    assert not segment._grouped_ok(a.double(), b.double())
    assert not segment._grouped_ok(torch.randn(12, 7), torch.randn(3, 7, 4))
