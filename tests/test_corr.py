"""The per-sample correlation operator: custom op, standard-op form, dispatcher, export."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from reparam.ops.corr import (
    corr,
    corr_mode,
    corr_output_size,
    corr_reference,
    corr_standard,
    get_corr_mode,
)

# (groups, stride, padding, dilation, kh, kw)
CONFIGS = [
    (1, 1, 0, 1, 3, 3),
    (1, 1, 1, 1, 3, 3),
    (2, 2, 1, 1, 3, 3),
    (1, 1, 2, 2, 3, 3),
    (4, 3, 1, 2, 3, 3),
    (2, 1, 1, 1, 1, 3),
    (1, 2, 0, 1, 2, 2),
]
IDS = [f"g{g}-s{s}-p{p}-d{d}-k{kh}x{kw}" for g, s, p, d, kh, kw in CONFIGS]


def _inputs(config, dtype, batch=3, channels=8, out_channels=4, size=(11, 9), seed=0):
    groups, _, _, _, kh, kw = config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=generator, dtype=dtype)
    kernel = torch.randn(
        batch, out_channels, channels // groups, kh, kw, generator=generator, dtype=dtype
    )
    return x, kernel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_op_and_standard_match_reference(config, dtype, tol):
    x, kernel = _inputs(config, dtype)
    args = config[:4]
    expected = corr_reference(x, kernel, *args)
    op = torch.ops.reparam.corr(x, kernel, *args)
    standard = corr_standard(x, kernel, *args)
    assert op.shape == expected.shape == standard.shape
    _, stride, padding, dilation, kh, kw = config
    assert expected.shape[2] == corr_output_size(11, kh, stride, padding, dilation)
    assert expected.shape[3] == corr_output_size(9, kw, stride, padding, dilation)
    assert _rel(op, expected) <= tol
    assert _rel(standard, expected) <= tol


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradcheck(config):
    groups = config[0]
    x, kernel = _inputs(config, torch.float64, batch=2, channels=4, out_channels=4, size=(6, 5))
    x.requires_grad_()
    kernel.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.reparam.corr(a, b, groups, *config[1:4]), (x, kernel)
    )


@pytest.mark.parametrize("config", CONFIGS[2:5], ids=IDS[2:5])
def test_gradients_of_op_and_standard_agree(config):
    x, kernel = _inputs(config, torch.float64)
    x.requires_grad_()
    kernel.requires_grad_()
    grads = []
    for fn in (torch.ops.reparam.corr, corr_standard, corr_reference):
        out = fn(x, kernel, *config[:4])
        grads.append(torch.autograd.grad(out, (x, kernel), torch.ones_like(out)))
    for other in grads[1:]:
        for got, want in zip(grads[0], other, strict=True):
            assert _rel(got, want) <= 1e-10


def test_opcheck():
    x, kernel = _inputs(CONFIGS[2], torch.float32, batch=2, channels=8, size=(7, 6))
    torch.library.opcheck(torch.ops.reparam.corr.default, (x, kernel, 2, 2, 1, 1))


def test_dispatcher_follows_mode():
    assert get_corr_mode() == "op"
    with corr_mode("standard"):
        assert get_corr_mode() == "standard"
        with corr_mode("op"):
            assert get_corr_mode() == "op"
        assert get_corr_mode() == "standard"
    assert get_corr_mode() == "op"
    with pytest.raises(ValueError, match="corr mode"), corr_mode("fast"):
        pass
    with pytest.raises(RuntimeError), corr_mode("standard"):
        raise RuntimeError("boom")
    assert get_corr_mode() == "op"


class _Corr(torch.nn.Module):
    def forward(self, x, kernel):
        return corr(x, kernel, 2, 2, 1, 2)


@pytest.mark.parametrize("mode", ["op", "standard"])
def test_export_with_dynamic_batch_and_size(mode):
    config = (2, 2, 1, 2, 3, 3)
    x, kernel = _inputs(config, torch.float32)
    batch = Dim("batch", min=1, max=64)
    shapes = (
        {0: batch, 2: Dim("h", min=8, max=256), 3: Dim("w", min=8, max=256)},
        {0: batch},
    )
    with corr_mode(mode):
        program = torch.export.export(_Corr(), (x, kernel), dynamic_shapes=shapes)
    targets = {str(node.target) for node in program.graph.nodes}
    assert ("reparam.corr.default" in targets) == (mode == "op")
    x2, kernel2 = _inputs(config, torch.float32, batch=5, size=(20, 13), seed=1)
    assert _rel(program.module()(x2, kernel2), corr_reference(x2, kernel2, *config[:4])) <= 1e-5


def test_errors():
    x = torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        corr(x[0], torch.randn(2, 4, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, O, C/groups"):
        corr(x, torch.randn(2, 4, 6, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        corr(x, torch.randn(2, 4, 2, 3, 3), groups=4)
    with pytest.raises(ValueError, match="input channels per group"):
        corr(x, torch.randn(2, 4, 5, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        corr(x, torch.randn(2, 4, 6, 3, 3), stride=0)
    with pytest.raises(ValueError, match="kernel batch 3 differs"):
        corr(x, torch.randn(3, 4, 6, 3, 3))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("seed", range(6))
def test_pointwise_fast_path_matches_reference(seed, dtype, tol):
    """1×1, stride 1, no padding (DRConv's exported region products): one batched matmul
    instead of the batch-folded grouped convolution; random groups and sizes."""
    generator = torch.Generator().manual_seed(seed)
    groups = int(torch.randint(1, 5, (1,), generator=generator))
    batch, per_in, per_out, height, width = (
        int(n) for n in torch.randint(1, 7, (5,), generator=generator)
    )
    x = torch.randn(batch, groups * per_in, height, width, generator=generator, dtype=dtype)
    kernel = torch.randn(batch, groups * per_out, per_in, 1, 1, generator=generator, dtype=dtype)
    expected = corr_reference(x, kernel, groups)
    got = torch.ops.reparam.corr(x, kernel, groups)
    assert got.shape == expected.shape
    assert _rel(got, expected) <= tol
    # dilation changes nothing for a 1×1 kernel; stride or padding leave the fast path
    assert _rel(torch.ops.reparam.corr(x, kernel, groups, 1, 0, 3), expected) <= tol
    padded = torch.ops.reparam.corr(x, kernel, groups, 2, 1)  # may read padding only: zeros
    torch.testing.assert_close(padded, corr_reference(x, kernel, groups, 2, 1), rtol=tol, atol=tol)
