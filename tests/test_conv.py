"""YOLOv5-style Conv: BN folding, YOLOv5 keys, deploy-form loading."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks.conv import Conv, autopad
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

ACTS = ("silu", "none", "relu")
CONFIGS = [
    dict(k=k, s=s, g=g, d=d, p=None, act=ACTS[i % 3])
    for i, (k, s, g, d) in enumerate(itertools.product((1, 3, (3, 1)), (1, 2), (1, 2), (1, 2)))
    if not (k == 1 and d == 2)
] + [dict(k=3, s=1, g=1, d=1, p=0, act="silu"), dict(k=5, s=2, g=1, d=1, p=1, act="none")]


def _act(name: str) -> bool | nn.Module:
    return {"silu": True, "none": False, "relu": nn.ReLU()}[name]


def _config_id(config: dict) -> str:
    return "-".join(f"{key}{value}" for key, value in config.items()).replace(" ", "")


def _build(config: dict, c1: int = 4, c2: int = 6, **kwargs) -> Conv:
    torch.manual_seed(0)
    args = {key: value for key, value in config.items() if key != "act"}
    return Conv(c1, c2, act=_act(config["act"]), **args, **kwargs)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_fuse_is_exact(config: dict) -> None:
    block = randomize_batchnorm(_build(config), seed=1)
    x = torch.randn(2, 4, 11, 9, generator=torch.Generator().manual_seed(2))
    fused, _ = assert_fuses_exactly(block, x, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fused.conv.bias is not None and fused.deploy
    assert_fuses_exactly(block.double(), x.double(), rtol=1e-10)


def test_autopad_follows_yolov5() -> None:
    assert autopad(3) == 1
    assert autopad(1) == 0
    assert autopad(3, d=2) == 2
    assert autopad((3, 5)) == [1, 2]
    assert autopad((3, 5), d=2) == [2, 4]
    assert autopad(3, 0) == 0


def test_yolov5_state_dict_keys() -> None:
    block = Conv(3, 8, 3, 2)
    assert set(block.state_dict()) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert block.conv.bias is None and block.conv.padding == (1, 1)
    assert isinstance(block.act, nn.SiLU)
    assert isinstance(Conv(3, 8, act=False).act, nn.Identity)
    fused = reparam.fuse(block)
    assert set(fused.state_dict()) == {"conv.weight", "conv.bias"}


def test_deploy_constructor_loads_fused_state_dict_strictly() -> None:
    config = dict(k=3, s=2, g=2, d=2, p=None, act="silu")
    block = randomize_batchnorm(_build(config), seed=3).eval()
    fused = reparam.fuse(block)
    deployed = _build(config, deploy=True)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 4, 10, 7)
    torch.testing.assert_close(deployed.eval()(x), block(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deployed.forward_fuse(x), deployed(x))


def test_fuse_twice_is_a_no_op() -> None:
    block = randomize_batchnorm(Conv(4, 4, 3), seed=4)
    once = reparam.fuse(block)
    twice, report = reparam.fuse_with_report(once)
    assert not report.blocks
    for key, value in once.state_dict().items():
        assert torch.equal(value, twice.state_dict()[key])
    once.switch_to_deploy()  # direct call on a deployed block: nothing happens
    assert set(once.state_dict()) == {"conv.weight", "conv.bias"}


def test_fuse_report_counts_conv_blocks() -> None:
    model = nn.Sequential(Conv(3, 4, 3), Conv(4, 4, 1, act=False))
    _, report = reparam.fuse_with_report(model)
    assert report.blocks["Conv"] == 2


def test_training_step_changes_weights() -> None:
    block = Conv(4, 6, 3)
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    block(torch.randn(2, 4, 9, 9)).square().mean().backward()
    optimizer.step()
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), name


def test_dtype_is_preserved() -> None:
    block = randomize_batchnorm(Conv(4, 4, 3)).to(torch.bfloat16)
    fused = reparam.fuse(block)
    assert fused.conv.weight.dtype == torch.bfloat16 and fused.conv.bias.dtype == torch.bfloat16


def test_bad_activation_is_refused() -> None:
    with pytest.raises(TypeError, match=r"act must be True, False or an nn\.Module"):
        Conv(3, 4, act="relu")
