"""MobileOneBlock: exact fusion over the configuration matrix, keys, inference_mode, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reparam import fuse
from reparam.blocks.mobileone import MobileOneBlock
from reparam.convert import fuse_with_report
from reparam.errors import FusionError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

CHANNELS = 4
INPUT_HW = (11, 9)


def _configs() -> list:
    configs = []
    for kernel in (1, 3, 5):
        for stride in (1, 2):
            for groups in ("1", "2", "dw"):
                for dilation in (1, 2) if kernel > 1 else (1,):
                    for padding in ("same", "small") if kernel > 1 else ("same",):
                        kwargs = dict(
                            kernel_size=kernel,
                            stride=stride,
                            groups=CHANNELS if groups == "dw" else int(groups),
                            dilation=dilation,
                            # MobileOne-S0 over-parameterises with 4 branches; vary it cheaply.
                            num_conv_branches=1 + 2 * (stride == 2),
                        )
                        if padding == "small":
                            kwargs["padding"] = dilation * (kernel // 2) - 1
                        ident = f"k{kernel}-s{stride}-g{groups}-d{dilation}-p{padding}"
                        configs.append(pytest.param(CHANNELS, CHANNELS, kwargs, id=ident))
    configs += [
        pytest.param(4, 8, dict(), id="in4-out8"),
        pytest.param(4, 8, dict(stride=2, groups=2, dilation=2), id="in4-out8-s2-g2-d2"),
        pytest.param(4, 4, dict(kernel_size=5, padding=0), id="k5-p0-crop2"),
        pytest.param(4, 4, dict(kernel_size=3, padding=2), id="k3-p2-larger"),
        pytest.param(4, 4, dict(num_conv_branches=0), id="no-conv-branch"),
        pytest.param(4, 4, dict(kernel_size=1, num_conv_branches=0), id="k1-skip-only"),
        pytest.param(16, 16, dict(use_se=True, num_conv_branches=2), id="se"),
        pytest.param(16, 16, dict(use_se=True, groups=16, stride=2), id="se-dw-s2"),
    ]
    return configs


CONFIGS = _configs()
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-10, id="fp64"),
]


def _block(in_channels: int, out_channels: int, kwargs: dict, seed: int = 0) -> MobileOneBlock:
    torch.manual_seed(seed)
    return randomize_batchnorm(MobileOneBlock(in_channels, out_channels, **kwargs), seed)


def _input(channels: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *INPUT_HW, generator=generator).to(dtype)


def _sgd_step(module: nn.Module, lr: float = 0.1) -> None:
    """A plain SGD step (torch.optim's first use costs seconds of imports)."""
    with torch.no_grad():
        for param in module.parameters():
            param -= lr * param.grad


@pytest.mark.parametrize(("dtype", "rtol"), DTYPES)
@pytest.mark.parametrize(("in_channels", "out_channels", "kwargs"), CONFIGS)
def test_fuses_exactly(in_channels, out_channels, kwargs, dtype, rtol):
    block = _block(in_channels, out_channels, kwargs).to(dtype)
    fused, _ = assert_fuses_exactly(block, _input(in_channels, dtype), rtol=rtol)
    assert fused.inference_mode and fused.deploy
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    conv = fused.reparam_conv
    assert conv.dilation == (block.dilation,) * 2
    assert conv.padding == (block.padding,) * 2
    assert conv.weight.dtype == dtype


def test_branches_follow_published_rules():
    block = MobileOneBlock(4, 4, num_conv_branches=3)
    assert len(block.rbr_conv) == 3
    assert block.rbr_scale is not None and block.rbr_skip is not None
    assert MobileOneBlock(4, 4, kernel_size=1).rbr_scale is None
    assert MobileOneBlock(4, 4, stride=2).rbr_skip is None
    assert MobileOneBlock(4, 8).rbr_skip is None
    assert MobileOneBlock(4, 4, padding=0).rbr_skip is None  # output smaller than input
    assert MobileOneBlock(4, 4, dilation=2).rbr_conv[0].conv.dilation == (2, 2)


def test_state_dict_keys_match_published_mobileone():
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    se = {"se.reduce.weight", "se.reduce.bias", "se.expand.weight", "se.expand.bias"}
    expected = {"rbr_conv.0.conv.weight", "rbr_conv.1.conv.weight", "rbr_scale.conv.weight"}
    for prefix in ("rbr_conv.0.bn", "rbr_conv.1.bn", "rbr_scale.bn", "rbr_skip"):
        expected |= {f"{prefix}.{name}" for name in bn}
    block = MobileOneBlock(32, 32, num_conv_branches=2, use_se=True)
    assert set(block.state_dict()) == expected | se
    assert block.se.reduce.out_channels == 2  # int(32 · 0.0625), as published
    deployed = MobileOneBlock(32, 32, use_se=True, inference_mode=True)
    assert set(deployed.state_dict()) == {"reparam_conv.weight", "reparam_conv.bias"} | se


def test_inference_mode_is_deploy():
    block = MobileOneBlock(4, 4)
    assert not block.inference_mode and not block.deploy
    block.eval().reparameterize()
    assert block.inference_mode and block.deploy
    assert MobileOneBlock(4, 4, inference_mode=True).deploy


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(stride=2, dilation=2, groups=2), dict(kernel_size=5, padding=1, use_se=True)],
    ids=["default", "s2-d2-g2", "k5-p1-se"],
)
def test_deploy_constructor_loads_fused_state_dict_strictly(kwargs):
    block = _block(16, 16, dict(num_conv_branches=2, **kwargs))
    fused = fuse(block)
    deployed = MobileOneBlock(16, 16, inference_mode=True, **kwargs)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = _input(16)
    with torch.no_grad():
        assert torch.equal(deployed.eval()(x), fused(x))


def test_fuse_is_idempotent():
    block = _block(4, 4, dict(dilation=2, num_conv_branches=2)).eval()
    block.reparameterize()
    state = copy.deepcopy(block.state_dict())
    block.reparameterize()
    block.switch_to_deploy()
    fused_again = fuse(block)
    assert set(fused_again.state_dict()) == set(state)
    for key, value in fused_again.state_dict().items():
        assert torch.equal(value, state[key])


def test_training_step_changes_every_weight_and_stays_fusable():
    block = _block(16, 16, dict(num_conv_branches=2, use_se=True, groups=4)).train()
    nn.init.constant_(block.se.reduce.bias, 1.0)  # keep the single hidden SE unit out of ReLU's 0
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    block(_input(16)).square().mean().backward()
    _sgd_step(block)
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    assert_fuses_exactly(block.double(), _input(16, torch.float64), rtol=1e-10)


def test_low_precision_stays_in_dtype():
    block = _block(4, 4, dict(groups=4, num_conv_branches=3)).to(torch.bfloat16).eval()
    fused = fuse(block)
    assert fused.reparam_conv.weight.dtype == torch.bfloat16
    x = _input(4, torch.bfloat16)
    with torch.no_grad():
        out = fused(x)
        reference = copy.deepcopy(block).double()(x.double())
    assert out.dtype == torch.bfloat16
    assert (out.double() - reference).abs().max() / reference.abs().max() < 2e-2


def test_reparam_fuse_fuses_block_inside_a_model():
    # A MobileOne unit: depthwise KxK block, then pointwise 1x1 block.
    model = nn.Sequential(
        MobileOneBlock(4, 4, groups=4, stride=2, num_conv_branches=2),
        MobileOneBlock(4, 8, kernel_size=1, num_conv_branches=2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
    )
    randomize_batchnorm(model)
    fused, _ = assert_fuses_exactly(model.double(), _input(4, torch.float64), rtol=1e-10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.inference_mode for m in fused.modules() if isinstance(m, MobileOneBlock))
    _, report = fuse_with_report(model)
    assert report.blocks["MobileOneBlock"] == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((4, 4), dict(kernel_size=4), "odd kernel_size"),
        ((4, 4), dict(groups=3), "divisible by groups"),
        ((4, 4), dict(padding=-1), "padding must be >= 0"),
        ((4, 4), dict(num_conv_branches=-1), "num_conv_branches must be >= 0"),
        ((4, 8), dict(kernel_size=1, num_conv_branches=0), "no branch left"),
    ],
    ids=["k4", "groups3", "negative-padding", "negative-branches", "no-branch"],
)
def test_unfusable_configurations_are_refused(args, kwargs, match):
    with pytest.raises(FusionError, match=match):
        MobileOneBlock(*args, **kwargs)
