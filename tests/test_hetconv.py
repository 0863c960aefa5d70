"""HetConv: the heterogeneous filter, both deploy forms, and the automatic choice between them."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.blocks.hetconv import HetConv, choose_form
from reparam.errors import FusionError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

MATRIX = list(itertools.product((1, 2, 4), (1, 2), (False, True), ("dense", "separate")))
EXTRA = [  # (in, out, p, kwargs)
    (8, 12, 4, dict(kernel_size=5)),
    (8, 8, 2, dict(dilation=2)),
    (8, 8, 2, dict(padding=0, stride=2)),  # the 1x1 branch reads a cropped input
    (8, 8, 4, dict(padding=2)),
    (4, 8, 2, dict(use_bn=False, bias=True, exact=True)),
]


def _x(channels: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, channels, 11, 9, generator=torch.Generator().manual_seed(seed))


def _check(block: HetConv, x: torch.Tensor) -> nn.Module:
    randomize_batchnorm(block, seed=1)
    fused, _ = assert_fuses_exactly(block, x, rtol=1e-5)
    assert_fuses_exactly(block.double(), x.double(), rtol=1e-10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    return fused


@pytest.mark.parametrize(
    ("p", "stride", "exact", "mode"),
    MATRIX,
    ids=[f"p{p}-s{s}-{'exact' if e else 'common'}-{m}" for p, s, e, m in MATRIX],
)
def test_fuse_is_exact(p: int, stride: int, exact: bool, mode: str) -> None:
    torch.manual_seed(0)
    block = HetConv(8, 8, p, stride=stride, exact=exact, fuse_mode=mode)
    fused = _check(block, _x())
    assert fused.deploy_form == mode
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (1 if mode == "dense" else 2)
    if mode == "dense":
        assert fused.fused_conv.groups == 1 and fused.fused_conv.kernel_size == (3, 3)


@pytest.mark.parametrize(
    ("cin", "cout", "p", "kwargs"), EXTRA, ids=[str(e[3]).replace(" ", "") for e in EXTRA]
)
@pytest.mark.parametrize("mode", ["dense", "separate"])
def test_fuse_is_exact_other_shapes(cin: int, cout: int, p: int, kwargs: dict, mode: str) -> None:
    torch.manual_seed(0)
    _check(HetConv(cin, cout, p, fuse_mode=mode, **kwargs), _x(cin))


def _reference_kernel(block: HetConv) -> torch.Tensor:
    """The dense 3x3 of a BN-free HetConv, built filter by filter from the definition."""
    cout, cin, p = block.out_channels, block.in_channels, block.p
    kernel = torch.zeros(cout, cin, 3, 3, dtype=torch.float64)
    for o in range(cout):
        own = range(o // (cout // p) * (cin // p), (o // (cout // p) + 1) * (cin // p))
        for i in range(cin):
            if i in own:
                kernel[o, i] = block.gwc.weight[o, i - own.start]
            if i not in own or not block.exact:
                kernel[o, i, 1, 1] += block.pwc.weight[o, i, 0, 0]
    return kernel


@pytest.mark.parametrize("exact", [False, True], ids=["common", "exact"])
@pytest.mark.parametrize("p", [2, 4])
def test_matches_the_heterogeneous_filter_definition(p: int, exact: bool) -> None:
    torch.manual_seed(0)
    block = HetConv(8, 8, p, use_bn=False, exact=exact).double()
    x = _x().double()
    expected = F.conv2d(x, _reference_kernel(block), padding=1)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_exact_filter_never_trains_the_own_group_1x1() -> None:
    torch.manual_seed(0)
    block = HetConv(8, 8, 4, exact=True)
    before = block.pwc.weight.detach().clone()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    block(_x()).square().mean().backward()
    optimizer.step()
    changed = block.pwc.weight.detach() != before
    assert torch.equal(changed[:, :, 0, 0], block.pwc_mask[:, :, 0, 0].bool())


def test_training_step_changes_weights() -> None:
    torch.manual_seed(0)
    block = HetConv(8, 8, 2)
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    block(_x()).square().mean().backward()
    optimizer.step()
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), name


@pytest.mark.parametrize("exact", [False, True], ids=["common", "exact"])
@pytest.mark.parametrize("mode", ["dense", "separate"])
def test_deploy_constructor_loads_fused_state_dict_strictly(mode: str, exact: bool) -> None:
    torch.manual_seed(0)
    kwargs = dict(stride=2, exact=exact, fuse_mode=mode)
    block = randomize_batchnorm(HetConv(8, 8, 4, **kwargs)).eval()
    fused = reparam.fuse(block)
    deployed = HetConv(8, 8, 4, deploy=True, **kwargs)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = _x()
    torch.testing.assert_close(deployed.eval()(x), block(x), rtol=1e-5, atol=1e-5)


def test_fuse_twice_is_a_no_op() -> None:
    block = randomize_batchnorm(HetConv(8, 8, 2, fuse_mode="separate"))
    once = reparam.fuse(block)
    twice, report = reparam.fuse_with_report(once)
    assert not report.blocks
    keys = {"gwc.weight", "gwc.bias", "pwc.weight"}
    assert once.state_dict().keys() == twice.state_dict().keys() == keys
    for key, value in once.state_dict().items():
        assert torch.equal(value, twice.state_dict()[key])


def test_auto_fuses_when_dense_is_not_more_work() -> None:
    block = HetConv(8, 8, 1)
    assert choose_form(block)[0] == "dense"
    fused, report = reparam.fuse_with_report(block)
    assert fused.deploy_form == "dense"
    assert "HetConv" in report.details[0] and "fused to dense 3x3" in report.details[0]


def test_auto_cost_model_keeps_two_convs() -> None:
    form, detail = choose_form(HetConv(8, 8, 4), measure=False)
    assert form == "separate"
    assert detail == "kept 2 convs: dense 3x3 costs 9.0 vs 3.25 MACs per Cin·Cout (cost model)"


def test_auto_does_not_time_large_layers() -> None:
    form, detail = choose_form(HetConv(512, 512, 4))
    assert form == "separate" and detail.endswith("(cost model)")


def test_auto_measures_small_layers_quickly_and_fuses_exactly() -> None:
    torch.manual_seed(0)
    block = HetConv(8, 8, 4, exact=True)
    choose_form(block)  # first call warms up the conv kernels
    start = time.perf_counter()
    form, detail = choose_form(block)
    assert time.perf_counter() - start < 0.5  # ~30 ms budget; slack for a loaded machine
    assert form in ("dense", "separate")
    assert "measured" in detail or "cost model" in detail
    fused = _check(block, _x())
    assert fused.deploy_form in ("dense", "separate")
    assert fused.fuse_detail.startswith(("kept 2 convs", "fused to dense 3x3"))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((6, 8, 4), {}, "divisible by p"),
        ((8, 8, 2), dict(kernel_size=4), "odd kernel_size"),
        ((8, 8, 2), dict(fuse_mode="fastest"), "fuse_mode must be one of"),
        ((8, 8, 2), dict(deploy=True), "needs fuse_mode='dense' or 'separate'"),
        ((8, 8, 2), dict(padding=-1), "padding must be >= 0"),
    ],
    ids=["channels", "even-kernel", "mode", "deploy-auto", "padding"],
)
def test_bad_configurations_are_refused(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(FusionError, match=match):
        HetConv(*args, **kwargs)
