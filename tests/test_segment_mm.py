"""reparam.ops.segment_mm: per-group products of consecutive rows, grouped op or loop."""

from __future__ import annotations

import pytest
import torch

import reparam.ops.segment_mm as segment
from reparam.ops.segment_mm import segment_mm


def _loop_mm(a, b, counts):
    parts, start = [], 0
    for group, count in enumerate(counts):
        parts.append(a[start : start + count] @ b[group])
        start += count
    return torch.cat(parts)


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
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    got = segment_mm(a, b, counts)
    assert got.shape == (rows, n)
    if rows:
        torch.testing.assert_close(got, _loop_mm(a, b, counts), rtol=tol, atol=tol)


def test_strided_operands_take_the_grouped_op():
    """Transposed, sliced and offset operands, as DRConv passes them (a band's sorted rows,
    one sample's kernels out of the (r, B, K·K·C, O) tensor)."""
    generator = torch.Generator().manual_seed(1)
    kernels = torch.randn(4, 3, 12, 8, generator=generator)
    b = kernels[:, 1]  # (4, 12, 8): batch stride 3·12·8, offset 96
    a = torch.randn(24, 16, generator=generator)[2:22, 4:]  # (20, 12), row stride 16
    counts = [6, 0, 9, 5]
    if segment._grouped_mm_available():
        assert segment._grouped_ok(a, b)
    torch.testing.assert_close(segment_mm(a, b, counts), _loop_mm(a, b, counts))
    bt = torch.randn(4, 8, 12, generator=generator).transpose(1, 2)  # column-major
    torch.testing.assert_close(segment_mm(a, bt, counts), _loop_mm(a, bt, counts))


def test_single_column_operands_take_the_loop():
    """K = 1 (a 1x1 DRConv on one channel): row strides of 1 element, which the grouped op
    refuses."""
    a, b = torch.randn(9, 1), torch.randn(3, 1, 4)
    assert not segment._grouped_ok(a, b)
    torch.testing.assert_close(segment_mm(a, b, [2, 3, 4]), _loop_mm(a, b, [2, 3, 4]))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("counts", COUNTS, ids=["mixed", "one", "even", "empty"])
def test_segment_weight_gradients_are_per_group_transposed_products(counts, dtype):
    """segment_tmm: out[g] = A_gᵀ · B_g, zeros for an empty group, written into ``out``
    whatever its stride between groups (a slice of a larger tensor, pre-filled with NaN)."""
    generator = torch.Generator().manual_seed(0)
    rows = sum(counts)
    a = torch.randn(rows, 6, generator=generator, dtype=dtype)
    b = torch.randn(rows, 5, generator=generator, dtype=dtype)
    storage = torch.full((len(counts), 2, 6, 5), float("nan"), dtype=dtype)
    out = storage[:, 1]  # group stride 2·6·5
    got = segment.segment_tmm(a, b, counts, out=out)
    assert got.data_ptr() == out.data_ptr()
    start = 0
    for group, count in enumerate(counts):
        want = a[start : start + count].t() @ b[start : start + count]
        torch.testing.assert_close(out[group], want)
        start += count
    assert storage[:, 0].isnan().all()  # nothing written outside ``out``
