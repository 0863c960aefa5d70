"""segment_mm(..., onednn=True) and dense_mm: oneDNN's matmul where it applies, with row
buckets; the same products as the loop of mm up to float32 rounding of their scale."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import reparam.ops.segment_mm as segment
from reparam.ops.segment_mm import dense_mm, segment_mm

needs_onednn = pytest.mark.skipif(
    not segment._onednn_available(), reason="oneDNN's matmul is not available in this torch"
)


def _loop_mm(a, b, counts):
    parts, start = [], 0
    for group, count in enumerate(counts):
        parts.append(a[start : start + count] @ b[group])
        start += count
    return torch.cat(parts)


def _close_to_scale(got, want, tol):
    """Within ``tol`` of the result's largest magnitude (sums of 576 products rounded in
    another order differ by more than 1e-5 of a small element)."""
    scale = want.abs().max().clamp(min=1)
    assert (got - want).abs().max() <= tol * scale


# Totals below, at and above one bucket; a group ending near the end (its bucket starts
# earlier); empty groups first, last and between.
COUNTS = [[5, 0, 7, 4], [3, 3, 3, 3], [0, 17, 0], [40, 3, 1], [1, 30, 2, 0], [16, 16], [100]]


@pytest.mark.parametrize("counts", COUNTS, ids=[str(c) for c in COUNTS])
@pytest.mark.parametrize("shape", [(576, 64), (7, 5), (1, 3)], ids=["K576N64", "K7N5", "K1N3"])
def test_onednn_segments_match_the_loop(counts, shape):
    generator = torch.Generator().manual_seed(0)
    k, n = shape
    rows = sum(counts)
    a = torch.randn(rows + 3, k, generator=generator)[2:-1]  # offset rows
    b = torch.randn(len(counts), n, k, generator=generator).transpose(1, 2)  # column-major
    got = segment_mm(a, b, counts, onednn=True)
    assert got.shape == (rows, n)
    _close_to_scale(got, _loop_mm(a, b, counts), 1e-6)


@needs_onednn
def test_buckets_read_only_rows_of_a_and_keep_each_groups_own(monkeypatch):
    """One bucketed product per non-empty group, in order, whose rows land in place: groups
    whose bucket runs past the end (the last ones) read earlier rows instead."""
    calls = []
    real = segment._bucketed_product

    def spy(a, b, start, count, out):
        calls.append((a.shape[0], start, count))
        return real(a, b, start, count, out)

    monkeypatch.setattr(segment, "_bucketed_product", spy)
    a, b = torch.randn(37, 8), torch.randn(4, 8, 4)
    counts = [20, 1, 15, 1]
    _close_to_scale(segment_mm(a, b, counts, onednn=True), _loop_mm(a, b, counts), 1e-6)
    assert [(s, c) for _, s, c in calls] == [(0, 20), (20, 1), (21, 15), (36, 1)]


def test_float64_and_autograd_take_mm():
    a = torch.randn(20, 6, dtype=torch.float64)
    b = torch.randn(2, 6, 3, dtype=torch.float64)
    assert not segment._onednn_ok(a, b[0])
    torch.testing.assert_close(segment_mm(a, b, [9, 11], onednn=True), _loop_mm(a, b, [9, 11]))
    a32 = torch.randn(20, 6, requires_grad=True)
    w = torch.randn(6, 3)
    assert not segment._onednn_ok(a32, w)
    dense_mm(a32, w).sum().backward()  # torch.mm, with a gradient
    torch.testing.assert_close(a32.grad, w.sum(1).expand(20, 6))
    with torch.no_grad():
        assert segment._onednn_ok(a32, w) == segment._onednn_available()


def test_dense_mm_writes_into_out_and_counts_flops():
    a, b = torch.randn(33, 576), torch.randn(576, 64)
    out = torch.full((33, 64), float("nan"))
    assert dense_mm(a, b, out=out).data_ptr() == out.data_ptr()
    _close_to_scale(out, a @ b, 1e-6)
    with FlopCounterMode(display=False) as counter:  # under a mode: torch.mm, counted
        dense_mm(a, b)
    assert counter.get_total_flops() == 2 * 33 * 576 * 64


def test_without_onednn_the_products_are_the_loops(monkeypatch):
    monkeypatch.setattr(segment, "_onednn_available", lambda: False)
    a, b = torch.randn(12, 8), torch.randn(3, 8, 4)
    torch.testing.assert_close(segment_mm(a, b, [5, 0, 7], onednn=True), _loop_mm(a, b, [5, 0, 7]))
    torch.testing.assert_close(dense_mm(a, b[0]), a @ b[0])
