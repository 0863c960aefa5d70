"""RepVGGBlock: exact fusion over the configuration matrix, keys, dtypes, training, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reparam import fuse
from reparam.blocks.repvgg import RepVGGBlock
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
                        )
                        if padding == "small":
                            kwargs["padding"] = dilation * (kernel // 2) - 1
                        ident = f"k{kernel}-s{stride}-g{groups}-d{dilation}-p{padding}"
                        configs.append(pytest.param(CHANNELS, CHANNELS, kwargs, id=ident))
    configs += [
        pytest.param(4, 8, dict(), id="in4-out8"),
        pytest.param(4, 8, dict(stride=2, groups=2), id="in4-out8-s2-g2"),
        pytest.param(4, 4, dict(kernel_size=5, padding=0), id="k5-p0-crop2"),
        pytest.param(4, 4, dict(kernel_size=3, padding=2), id="k3-p2-larger"),
        pytest.param(4, 4, dict(kernel_size=1, padding=1), id="k1-p1"),
        pytest.param(16, 16, dict(use_se=True), id="se"),
        pytest.param(16, 32, dict(use_se=True, stride=2, dilation=2), id="se-s2-d2-in16-out32"),
    ]
    return configs


CONFIGS = _configs()


DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-10, id="fp64"),
]


def _block(in_channels: int, out_channels: int, kwargs: dict, seed: int = 0) -> RepVGGBlock:
    torch.manual_seed(seed)
    block = RepVGGBlock(in_channels, out_channels, **kwargs)
    return randomize_batchnorm(block, seed)


def _sgd_step(module: nn.Module, lr: float = 0.1) -> None:
    """A plain SGD step (torch.optim's first use costs seconds of imports)."""
    with torch.no_grad():
        for param in module.parameters():
            param -= lr * param.grad


def _input(channels: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *INPUT_HW, generator=generator).to(dtype)


@pytest.mark.parametrize(("dtype", "rtol"), DTYPES)
@pytest.mark.parametrize(("in_channels", "out_channels", "kwargs"), CONFIGS)
def test_fuses_exactly(in_channels, out_channels, kwargs, dtype, rtol):
    block = _block(in_channels, out_channels, kwargs).to(dtype)
    fused, _ = assert_fuses_exactly(block, _input(in_channels, dtype), rtol=rtol)
    assert fused.deploy
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    conv = fused.rbr_reparam
    assert conv.dilation == (block.dilation,) * 2
    assert conv.padding == (block.padding,) * 2
    assert conv.weight.dtype == dtype


def test_identity_branch_only_where_shapes_allow():
    assert RepVGGBlock(4, 4).rbr_identity is not None
    assert RepVGGBlock(4, 4, dilation=2).rbr_identity is not None
    assert RepVGGBlock(4, 4, stride=2).rbr_identity is None
    assert RepVGGBlock(4, 8).rbr_identity is None
    assert RepVGGBlock(4, 4, padding=0).rbr_identity is None  # output smaller than input


def test_state_dict_keys_match_published_repvgg():
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = {"rbr_dense.conv.weight", "rbr_1x1.conv.weight"}
    expected |= {f"{prefix}.{name}" for prefix in ("rbr_dense.bn", "rbr_1x1.bn") for name in bn}
    expected |= {f"rbr_identity.{name}" for name in bn}
    assert set(RepVGGBlock(4, 4).state_dict()) == expected

    se = {"se.down.weight", "se.down.bias", "se.up.weight", "se.up.bias"}
    block = RepVGGBlock(32, 32, use_se=True)
    assert se <= set(block.state_dict())
    assert block.se.down.out_channels == 2  # out_channels // 16, as published
    deployed = RepVGGBlock(32, 32, use_se=True, deploy=True)
    assert set(deployed.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"} | se


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(stride=2, dilation=2, groups=2), dict(kernel_size=5, padding=1, use_se=True)],
    ids=["default", "s2-d2-g2", "k5-p1-se"],
)
def test_deploy_constructor_loads_fused_state_dict_strictly(kwargs):
    block = _block(16, 16, kwargs)
    fused = fuse(block)
    deployed = RepVGGBlock(16, 16, deploy=True, **kwargs)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = _input(16)
    with torch.no_grad():
        assert torch.equal(deployed.eval()(x), fused(x))


def test_fuse_is_idempotent():
    block = _block(4, 4, dict(dilation=2)).eval()
    block.switch_to_deploy()
    state = copy.deepcopy(block.state_dict())
    block.switch_to_deploy()
    block.reparameterize()
    fused_again = fuse(block)
    for key, value in fused_again.state_dict().items():
        assert torch.equal(value, state[key])
    assert set(fused_again.state_dict()) == set(state)


def test_training_step_changes_every_weight_and_stays_fusable():
    block = _block(8, 8, dict(use_se=True, dilation=2)).train()
    nn.init.constant_(block.se.down.bias, 1.0)  # keep the single hidden SE unit out of ReLU's zero
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    block(_input(8)).square().mean().backward()
    _sgd_step(block)
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    assert_fuses_exactly(block.double(), _input(8, torch.float64), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_stays_in_dtype_and_rounds_once(dtype):
    block = _block(4, 4, dict(groups=2, dilation=2)).to(dtype).eval()
    fused = fuse(block)
    assert fused.rbr_reparam.weight.dtype == dtype
    assert fused.rbr_reparam.bias.dtype == dtype
    # Within one unit in the last place of the same parameters fused in float64.
    eps = torch.finfo(dtype).eps
    reference = copy.deepcopy(block).double().get_equivalent_kernel_bias()
    fused_pair = (fused.rbr_reparam.weight, fused.rbr_reparam.bias)
    for value, exact in zip(fused_pair, reference, strict=True):
        assert ((value.double() - exact).abs() <= eps * exact.abs()).all()
    x = _input(4, dtype)
    with torch.no_grad():
        out = fused(x)
        reference = copy.deepcopy(block).double()(x.double())
    assert out.dtype == dtype
    assert (out.double() - reference).abs().max() / reference.abs().max() < 2e-2


def test_reparam_fuse_fuses_block_inside_a_model():
    model = nn.Sequential(
        RepVGGBlock(4, 8, stride=2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        RepVGGBlock(8, 8, dilation=2, use_se=True),
    )
    randomize_batchnorm(model)
    x = _input(4, torch.float64)
    fused, _ = assert_fuses_exactly(model.double(), x, rtol=1e-10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(block.deploy for block in fused.modules() if isinstance(block, RepVGGBlock))
    _, report = fuse_with_report(model)
    assert report.blocks["RepVGGBlock"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kernel_size=2), "odd kernel_size"),
        (dict(kernel_size=4), "odd kernel_size"),
        (dict(groups=3), "divisible by groups"),
        (dict(padding=-1), "padding must be >= 0"),
    ],
    ids=["k2", "k4", "groups3", "negative-padding"],
)
def test_unfusable_configurations_are_refused(kwargs, match):
    with pytest.raises(FusionError, match=match):
        RepVGGBlock(4, 4, **kwargs)
