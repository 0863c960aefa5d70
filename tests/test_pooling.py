"""Exact adaptive average pooling built from the runtime size (P_h · x · P_wᵀ)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from reparam.ops.pooling import AdaptiveAvgPool2dExact, adaptive_avg_pool2d_exact, pooling_matrix

OUTPUT_SIZES = [1, 2, 3, 5, 7, (2, 3), (7, 4)]
INPUT_SIZES = [(1, 1), (2, 3), (3, 3), (5, 7), (7, 7), (9, 11), (10, 16), (13, 4), (17, 23)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("output_size", OUTPUT_SIZES, ids=str)
@pytest.mark.parametrize("size", INPUT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_adaptive_avg_pool_float64(size, output_size):
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (
        _rel(adaptive_avg_pool2d_exact(x, output_size), F.adaptive_avg_pool2d(x, output_size))
        <= 1e-12
    )


@pytest.mark.parametrize("size", INPUT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_adaptive_avg_pool_float32_and_gradient(size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ours = AdaptiveAvgPool2dExact(3)(x)
    theirs = nn.AdaptiveAvgPool2d(3)(x)
    assert _rel(ours, theirs) <= 1e-6
    weights = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(2))
    (grad_ours,) = torch.autograd.grad(ours, x, weights)
    (grad_theirs,) = torch.autograd.grad(theirs, x, weights)
    assert _rel(grad_ours, grad_theirs) <= 1e-6


def test_pooling_matrix_rows_average_the_windows():
    matrix = pooling_matrix(7, 3, torch.empty(0, dtype=torch.float64))
    # windows [0, 3), [2, 5), [4, 7)
    expected = torch.zeros(3, 7, dtype=torch.float64)
    expected[0, 0:3] = expected[1, 2:5] = expected[2, 4:7] = 1 / 3
    torch.testing.assert_close(matrix, expected)


def test_state_dict_empty_and_drop_in():
    pool = AdaptiveAvgPool2dExact((3, 3))
    assert pool.state_dict() == {}
    ours = nn.Sequential(pool, nn.Conv2d(4, 5, 1))
    theirs = nn.Sequential(nn.AdaptiveAvgPool2d((3, 3)), nn.Conv2d(4, 5, 1))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 4, 10, 7)
    assert _rel(ours(x), theirs(x)) <= 1e-6
    assert "output_size=(3, 3)" in repr(pool)


def test_errors():
    with pytest.raises(ValueError, match="positive"):
        AdaptiveAvgPool2dExact(0)
    with pytest.raises(ValueError, match="positive"):
        adaptive_avg_pool2d_exact(torch.randn(1, 1, 4, 4), (2, 0))


class _Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = AdaptiveAvgPool2dExact(3)

    def forward(self, x):
        return self.pool(x)


def _dynamic():
    return (
        {
            0: Dim("batch", min=1, max=64),
            2: Dim("h", min=4, max=512),
            3: Dim("w", min=4, max=512),
        },
    )


def test_export_keeps_sizes_dynamic():
    program = torch.export.export(_Pool(), (torch.randn(2, 3, 11, 9),), dynamic_shapes=_dynamic())
    for size in [(16, 16), (5, 7), (33, 20)]:
        x = torch.randn(3, 3, *size)
        assert _rel(program.module()(x), F.adaptive_avg_pool2d(x, 3)) <= 1e-6


# torch's pytree emits a FutureWarning from copyreg (outside torch.*) during ONNX export.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_onnx_export_exact_at_other_sizes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "pool.onnx"
    program = torch.onnx.export(
        _Pool().eval(), (torch.randn(2, 3, 11, 9),), dynamic_shapes=_dynamic(), dynamo=True,
        verbose=False,
    )  # fmt: skip
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for size in [(16, 16), (11, 9), (5, 7), (33, 20)]:
        x = torch.randn(2, 3, *size)
        (out,) = session.run(None, {name: x.numpy()})
        assert _rel(torch.from_numpy(out), F.adaptive_avg_pool2d(x, 3)) <= 1e-6
