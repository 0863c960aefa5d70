"""Involution: shift-and-accumulate vs the unfold formulation, gradients, BN fold, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import reparam
from reparam.blocks.involution import (
    Involution,
    _CeilAvgPool2d,
    involution,
    involution_shift,
    involution_unfold,
)
from reparam.errors import UserInputError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

# (channels, kernel_size, stride, group_channels, reduction_ratio, height, width)
CONFIGS = [
    (8, 3, 1, 4, 2, 11, 9),
    (16, 5, 2, 8, 4, 11, 9),
    (8, 7, 3, 2, 4, 10, 13),
    (16, 1, 1, 16, 4, 9, 9),
    (16, 3, 2, 16, 4, 8, 8),
]
IDS = [f"c{c}-k{k}-s{s}-gc{gc}-r{r}-{h}x{w}" for c, k, s, gc, r, h, w in CONFIGS]
TOLERANCES = [(torch.float32, 1e-5), (torch.float64, 1e-10)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _block(config, dtype, seed=0):
    channels, kernel, stride, gc, ratio, _, _ = config
    torch.manual_seed(seed)
    block = Involution(channels, kernel, stride, group_channels=gc, reduction_ratio=ratio)
    return randomize_batchnorm(block, seed).to(dtype)


def _input(config, dtype, batch=2, seed=1):
    channels, *_, height, width = config
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forward_matches_unfold(config, dtype, tol):
    block = _block(config, dtype).eval()
    x = _input(config, dtype)
    with torch.no_grad():
        ours, reference = block(x), block.forward_unfold(x)
    stride = config[2]
    assert ours.shape == (2, config[0], -(-config[5] // stride), -(-config[6] // stride))
    assert _rel(ours, reference) <= tol


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradients_match_unfold(config, dtype, tol):
    block = _block(config, dtype).train()
    x = _input(config, dtype).requires_grad_()
    weights = torch.randn(block(x).shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    inputs = [x, *block.parameters()]
    ours = torch.autograd.grad((block(x) * weights).sum(), inputs)
    reference = torch.autograd.grad((block.forward_unfold(x) * weights).sum(), inputs)
    for got, want in zip(ours, reference, strict=True):
        assert _rel(got, want) <= tol


@pytest.mark.parametrize("config", CONFIGS[:3], ids=IDS[:3])
def test_gradcheck_of_the_operator(config):
    channels, kernel, stride, gc, *_ = config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 6, 5, dtype=torch.float64, generator=generator)
    out_h, out_w = (6 - 1) // stride + 1, (5 - 1) // stride + 1
    weight = torch.randn(
        1, channels // gc * kernel * kernel, out_h, out_w, dtype=torch.float64,
        generator=generator,
    )  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda a, b: involution(a, b, kernel, stride, gc),
        (x.requires_grad_(), weight.requires_grad_()),
    )
    with torch.no_grad():
        assert _rel(involution_shift(x, weight, kernel, stride, gc),
                    involution_unfold(x, weight, kernel, stride, gc)) <= 1e-12  # fmt: skip


def test_training_step_changes_weights():
    config = CONFIGS[1]
    block = _block(config, torch.float32).train()
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    loss = block(_input(config, torch.float32)).square().mean()
    loss.backward()
    optimizer.step()
    for name, p in block.named_parameters():
        assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fuse_folds_bn_and_deploy_loads_strictly(config, dtype, tol):
    block = _block(config, dtype)
    x = _input(config, dtype)
    fused, _ = assert_fuses_exactly(block, x, rtol=tol)
    assert fused.deploy and not hasattr(fused.conv1, "bn")
    assert set(fused.state_dict()) == {
        "conv1.conv.weight", "conv1.conv.bias", "conv2.conv.weight", "conv2.conv.bias",
    }  # fmt: skip
    channels, kernel, stride, gc, ratio, _, _ = config
    deployed = Involution(channels, kernel, stride, gc, ratio, deploy=True).to(dtype).eval()
    deployed.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(deployed(x), fused(x)) == 0.0
        state = {k: v.clone() for k, v in fused.state_dict().items()}
        again = reparam.fuse(fused)
        for key, value in again.state_dict().items():
            assert torch.equal(value, state[key])


def test_training_layout_matches_published_keys():
    block = Involution(32, 7)
    assert set(block.state_dict()) == {
        "conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias", "conv1.bn.running_mean",
        "conv1.bn.running_var", "conv1.bn.num_batches_tracked", "conv2.conv.weight",
        "conv2.conv.bias",
    }  # fmt: skip
    assert block.conv1.conv.bias is None
    assert block.conv2.conv.out_channels == 49 * 2


@pytest.mark.parametrize("stride", [2, 3])
def test_ceil_mode_pool(stride):
    for height in range(1, 10):
        x = torch.randn(2, 3, height, 7, dtype=torch.float64)
        expected = F.avg_pool2d(x, stride, stride, ceil_mode=True)
        assert _rel(_CeilAvgPool2d(stride)(x), expected) <= 1e-14


def test_export_with_dynamic_shapes():
    config = CONFIGS[1]
    block = _block(config, torch.float32).eval()
    dims = {
        0: Dim("batch", min=1, max=64),
        2: Dim("h", min=8, max=512),
        3: Dim("w", min=8, max=512),
    }
    program = torch.export.export(block, (_input(config, torch.float32),), dynamic_shapes=(dims,))
    x = torch.randn(3, 16, 23, 17)
    with torch.no_grad():
        assert _rel(program.module()(x), block.forward_unfold(x)) <= 1e-5


def test_errors():
    with pytest.raises(UserInputError, match="multiple of group_channels"):
        Involution(24, 3, group_channels=16)
    with pytest.raises(UserInputError, match="odd kernel_size"):
        Involution(16, 4)
    with pytest.raises(UserInputError, match="reduction_ratio"):
        Involution(16, 3, reduction_ratio=32)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        Involution(16, 3)(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        involution(torch.randn(1, 16, 5, 5), torch.randn(1, 8, 5, 5), 3, 1, 16)
