"""DiverseBranchBlock: exact fusion over the configuration matrix, BN-bias border, keys, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reparam import fuse
from reparam.blocks.dbb import BNAndPadLayer, DilatedAvgPool2d, DiverseBranchBlock
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
        pytest.param(4, 8, dict(stride=2, groups=2, dilation=2), id="in4-out8-s2-g2-d2"),
        pytest.param(4, 4, dict(kernel_size=5, padding=0), id="k5-p0-crop2"),
        pytest.param(4, 4, dict(kernel_size=3, padding=3), id="k3-p3-larger"),
        pytest.param(4, 4, dict(groups=4, padding=3, dilation=2), id="dw-p3-d2-larger"),
        pytest.param(4, 4, dict(internal_channels_1x1_3x3=6, groups=2), id="internal6-g2"),
        pytest.param(4, 4, dict(internal_channels_1x1_3x3=4, groups=4), id="dw-idconv1"),
        pytest.param(4, 4, dict(nonlinear=nn.ReLU()), id="relu"),
    ]
    return configs


CONFIGS = _configs()
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-10, id="fp64"),
]


def _block(in_channels: int, out_channels: int, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    block = DiverseBranchBlock(in_channels, out_channels, **copy.deepcopy(kwargs))
    # idconv1's residual weight starts at zero; give it trained-looking values.
    for module in block.modules():
        if hasattr(module, "get_actual_kernel"):
            nn.init.normal_(module.weight, std=0.3)
    return randomize_batchnorm(block, seed)


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
    assert fused.deploy
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    conv = fused.dbb_reparam
    assert conv.dilation == (block.dilation,) * 2
    assert conv.padding == (block.padding,) * 2
    assert conv.weight.dtype == dtype


def test_zero_padding_the_intermediate_would_be_wrong(monkeypatch):
    """The BN-bias border is what makes the merge exact (DBB's BNAndPadLayer)."""
    block = _block(4, 4, dict()).double().eval()
    x = _input(4, torch.float64)
    with torch.no_grad():
        fused_out = fuse(block)(x)
        monkeypatch.setattr(BNAndPadLayer, "pad_values", lambda self: self.bn.running_mean * 0)
        zero_padded = block(x)
    assert (zero_padded - fused_out).abs().max() > 1e-2


def test_bn_and_pad_border_is_bn_of_zero():
    layer = randomize_batchnorm(BNAndPadLayer(2, 3)).eval()
    out = layer(torch.randn(1, 3, 5, 4))
    assert out.shape == (1, 3, 9, 8)
    expected = layer.bn(torch.zeros(1, 3, 1, 1)).reshape(3)
    for border in (out[0, :, :2, :], out[0, :, -2:, :], out[0, :, :, :2], out[0, :, :, -2:]):
        assert torch.allclose(border, expected.reshape(3, 1, 1).expand_as(border), atol=1e-7)


def test_dilated_avg_pool_matches_avg_pool_at_dilation_1():
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True)
    assert torch.allclose(DilatedAvgPool2d(3, stride=2, padding=1)(x), pool(x), atol=1e-15)


def test_branch_structure_follows_published_rules():
    dense = DiverseBranchBlock(4, 8)
    assert hasattr(dense, "dbb_1x1")
    assert hasattr(dense.dbb_1x1_kxk, "idconv1")  # internal channels == in_channels
    assert isinstance(dense.dbb_avg.avg, nn.AvgPool2d)
    depthwise = DiverseBranchBlock(4, 4, groups=4)
    assert not hasattr(depthwise, "dbb_1x1")
    assert not hasattr(depthwise.dbb_avg, "conv")
    assert depthwise.dbb_1x1_kxk.conv1.out_channels == 8  # 2·in_channels
    assert isinstance(DiverseBranchBlock(4, 4, dilation=2).dbb_avg.avg, DilatedAvgPool2d)


def test_state_dict_keys_match_published_dbb():
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def bn_keys(prefix: str) -> set[str]:
        return {f"{prefix}.{name}" for name in bn}

    expected = {
        "dbb_origin.conv.weight",
        "dbb_1x1.conv.weight",
        "dbb_avg.conv.weight",
        "dbb_1x1_kxk.idconv1.weight",
        "dbb_1x1_kxk.conv2.weight",
    }
    for prefix in ("dbb_origin.bn", "dbb_1x1.bn", "dbb_avg.bn.bn", "dbb_avg.avgbn"):
        expected |= bn_keys(prefix)
    expected |= bn_keys("dbb_1x1_kxk.bn1.bn") | bn_keys("dbb_1x1_kxk.bn2")
    assert set(DiverseBranchBlock(4, 8).state_dict()) == expected

    depthwise = {"dbb_origin.conv.weight", "dbb_1x1_kxk.conv1.weight", "dbb_1x1_kxk.conv2.weight"}
    for prefix in ("dbb_origin.bn", "dbb_avg.avgbn", "dbb_1x1_kxk.bn1.bn", "dbb_1x1_kxk.bn2"):
        depthwise |= bn_keys(prefix)
    assert set(DiverseBranchBlock(4, 4, groups=4).state_dict()) == depthwise

    deployed = DiverseBranchBlock(4, 8, deploy=True)
    assert set(deployed.state_dict()) == {"dbb_reparam.weight", "dbb_reparam.bias"}


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(stride=2, dilation=2, groups=2), dict(kernel_size=5, padding=1, groups=8)],
    ids=["default", "s2-d2-g2", "k5-p1-dw"],
)
def test_deploy_constructor_loads_fused_state_dict_strictly(kwargs):
    block = _block(8, 8, kwargs)
    fused = fuse(block)
    deployed = DiverseBranchBlock(8, 8, deploy=True, **kwargs)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = _input(8)
    with torch.no_grad():
        assert torch.equal(deployed.eval()(x), fused(x))


def test_fuse_is_idempotent():
    block = _block(4, 4, dict(dilation=2)).eval()
    block.switch_to_deploy()
    state = copy.deepcopy(block.state_dict())
    block.switch_to_deploy()
    block.reparameterize()
    fused_again = fuse(block)
    assert set(fused_again.state_dict()) == set(state)
    for key, value in fused_again.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("kwargs", [dict(), dict(groups=4, stride=2)], ids=["dense", "dw-s2"])
def test_training_step_changes_every_weight_and_stays_fusable(kwargs):
    block = DiverseBranchBlock(4, 4, **kwargs).train()
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    block(_input(4)).square().mean().backward()
    _sgd_step(block)
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    assert_fuses_exactly(block.double(), _input(4, torch.float64), rtol=1e-10)


def test_single_init_starts_as_the_kxk_branch():
    block = DiverseBranchBlock(4, 4, single_init=True).eval()
    x = _input(4)
    with torch.no_grad():
        assert torch.allclose(block(x), block.dbb_origin(x), atol=1e-6)


def test_low_precision_stays_in_dtype():
    block = _block(4, 4, dict(groups=2, dilation=2)).to(torch.bfloat16).eval()
    fused = fuse(block)
    assert fused.dbb_reparam.weight.dtype == torch.bfloat16
    x = _input(4, torch.bfloat16)
    with torch.no_grad():
        out = fused(x)
        reference = copy.deepcopy(block).double()(x.double())
    assert out.dtype == torch.bfloat16
    assert (out.double() - reference).abs().max() / reference.abs().max() < 2e-2


def test_reparam_fuse_fuses_block_inside_a_model():
    model = nn.Sequential(
        DiverseBranchBlock(4, 8, stride=2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        DiverseBranchBlock(8, 8, groups=8, dilation=2, nonlinear=nn.ReLU()),
    )
    randomize_batchnorm(model)
    fused, _ = assert_fuses_exactly(model.double(), _input(4, torch.float64), rtol=1e-10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.deploy for m in fused.modules() if isinstance(m, DiverseBranchBlock))
    _, report = fuse_with_report(model)
    assert report.blocks["DiverseBranchBlock"] == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((4, 4), dict(kernel_size=2), "odd kernel_size"),
        ((4, 4), dict(groups=3), "divisible by groups"),
        ((4, 4), dict(padding=-1), "padding must be >= 0"),
        ((8, 4), dict(groups=4), "in_channels .* must equal out_channels"),
        ((4, 4), dict(groups=2, internal_channels_1x1_3x3=5), "internal_channels_1x1_3x3"),
    ],
    ids=["k2", "groups3", "negative-padding", "depthwise-in-ne-out", "internal-groups"],
)
def test_unfusable_configurations_are_refused(args, kwargs, match):
    with pytest.raises(FusionError, match=match):
        DiverseBranchBlock(*args, **kwargs)
