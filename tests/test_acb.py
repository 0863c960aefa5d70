"""ACBlock: exact fusion over the configuration matrix, keys, deploy form, training."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.blocks import ACBlock
from reparam.errors import FusionError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
CHANNELS = 4


def configurations():
    """stride × groups × dilation × padding × kernel, as the foundation issue lists them."""
    for stride, groups, dilation, same_padding, kernel in itertools.product(
        (1, 2), (1, 2, CHANNELS), (1, 2), (True, False), (3, 5, 7)
    ):
        padding = dilation * (kernel // 2) if same_padding else kernel // 2 - 1
        name = f"k{kernel}-s{stride}-g{groups}-d{dilation}-p{padding}"
        yield pytest.param(kernel, stride, groups, dilation, padding, id=name)


def make_block(dtype=torch.float32, seed=0, **kwargs) -> ACBlock:
    torch.manual_seed(seed)
    block = ACBlock(CHANNELS, CHANNELS, **kwargs)
    return randomize_batchnorm(block, seed).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("kernel", "stride", "groups", "dilation", "padding"), list(configurations())
)
def test_fuses_exactly(kernel, stride, groups, dilation, padding, dtype):
    block = make_block(
        dtype, kernel_size=kernel, stride=stride, groups=groups, dilation=dilation, padding=padding
    )
    x = torch.randn(2, CHANNELS, 17, 13, dtype=dtype)  # non-square
    fused, _ = assert_fuses_exactly(block, x, rtol=TOLERANCE[dtype])
    assert fused.deploy and fused.fused_conv.weight.dtype == dtype
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_padding_none_means_dilated_same_padding():
    block = ACBlock(4, 4, kernel_size=5, dilation=2)
    assert block.padding == 4 and block(torch.randn(1, 4, 9, 7)).shape == (1, 4, 9, 7)


def test_crop_branch_uses_the_dilation():
    """padding < d·(k//2) crops the asymmetric branches' input by d·(k//2) − p."""
    block = ACBlock(4, 4, kernel_size=3, dilation=2, padding=1)
    assert block.crop == 1
    assert ACBlock(4, 4, kernel_size=5, padding=0).crop == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "options",
    [{"bias": True}, {"use_affine": False}, {"padding_mode": "reflect"}, {"reduce_gamma": True}],
    ids=["conv-bias", "no-affine", "reflect", "reduce-gamma"],
)
def test_fuses_exactly_with_options(options, dtype):
    block = make_block(dtype, kernel_size=3, **options)
    if options.get("bias"):
        with torch.no_grad():
            for conv in (block.square_conv, block.ver_conv, block.hor_conv):
                conv.bias.uniform_(-1, 1)
    assert_fuses_exactly(block, torch.randn(2, CHANNELS, 9, 11, dtype=dtype), rtol=TOLERANCE[dtype])


def test_different_in_and_out_channels_stride_2():
    torch.manual_seed(1)
    block = randomize_batchnorm(ACBlock(6, 10, 3, stride=2, groups=2)).eval()
    assert_fuses_exactly(block, torch.randn(3, 6, 15, 8), rtol=1e-5)


@pytest.mark.parametrize("kernel", [3, 5])
def test_bfloat16_stays_bfloat16_and_is_as_accurate_as_unfused(kernel):
    block64 = make_block(torch.float64, kernel_size=kernel, stride=2)
    x = torch.randn(2, CHANNELS, 16, 12, dtype=torch.float64)
    exact = block64(x)
    block16 = make_block(torch.bfloat16, kernel_size=kernel, stride=2)
    unfused_error = (block16(x.bfloat16()).double() - exact).abs().max()
    fused = reparam.fuse(block16)
    assert fused.fused_conv.weight.dtype == torch.bfloat16
    fused_error = (fused(x.bfloat16()).double() - exact).abs().max()
    # bf16 has 8 significant bits; fusing rounds once, so it is no worse than the branches.
    assert fused_error <= 2 * unfused_error + 1e-2 * exact.abs().max()


def test_state_dict_keys_match_acnet():
    train_keys = set(ACBlock(4, 4).state_dict())
    for prefix in ("square", "ver", "hor"):
        assert f"{prefix}_conv.weight" in train_keys
        assert {f"{prefix}_bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")} <= (
            train_keys
        )
    assert set(ACBlock(4, 4, deploy=True).state_dict()) == {"fused_conv.weight", "fused_conv.bias"}


def test_deploy_constructor_loads_fused_checkpoint_strictly():
    block = make_block(kernel_size=5, stride=2, dilation=2, padding=3, groups=2)
    fused = reparam.fuse(block)
    deployed = ACBlock(
        CHANNELS, CHANNELS, 5, stride=2, dilation=2, padding=3, groups=2, deploy=True
    ).eval()
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, CHANNELS, 13, 11)
    torch.testing.assert_close(deployed(x), block(x), rtol=1e-5, atol=1e-5)


def test_fuse_is_idempotent_and_leaves_the_original_untouched():
    block = make_block(kernel_size=3)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    once = reparam.fuse(block)
    twice = reparam.fuse(once)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert not block.deploy
    assert once.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(v, twice.state_dict()[k]) for k, v in once.state_dict().items())
    once.switch_to_deploy()  # a second call is a no-op
    assert once.deploy


def test_training_step_changes_every_branch():
    torch.manual_seed(0)
    block = ACBlock(4, 4).train()
    weights = {n: p.clone() for n, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    block(torch.randn(4, 4, 8, 8)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(weights[n], p) for n, p in block.named_parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 4}, "odd kernel_size"),
        ({"groups": 3}, "divisible by groups"),
        ({"padding": -1}, "padding must be"),
        ({"reduce_gamma": True, "gamma_init": 0.5}, "not both"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(FusionError, match=message):
        ACBlock(4, 4, **kwargs)


@settings(max_examples=25, deadline=None)
@given(
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    padding_delta=st.integers(-2, 1),
    height=st.integers(7, 14),
    width=st.integers(7, 14),
    groups=st.sampled_from([1, 2]),
)
def test_property_any_geometry_fuses_exactly_in_float64(
    kernel, stride, dilation, padding_delta, height, width, groups
):
    padding = max(0, dilation * (kernel // 2) + padding_delta)
    block = make_block(
        torch.float64,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
    )
    x = torch.randn(1, CHANNELS, height, width, dtype=torch.float64)
    if min(height, width) + 2 * padding < dilation * (kernel - 1) + 1:
        return  # the input is smaller than the dilated kernel: no output to compare
    assert_fuses_exactly(block, x, rtol=1e-10)
