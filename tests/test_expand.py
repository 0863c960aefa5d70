"""reparam.expansion.expand: every family, exact at step 0, trainable, fuses back to the
original architecture; what is left alone and why; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import reparam
from reparam.errors import UserInputError
from reparam.expansion import (
    ExpandedConv,
    NothingToExpandError,
    expand,
    expand_with_report,
)
from reparam.expansion_blocks import FAMILIES
from reparam.models import create_model
from reparam.testing import randomize_batchnorm

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    import expand_fixtures as fixtures
except ImportError:
    from tests import expand_fixtures as fixtures

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _randomised(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """BN statistics and affine randomised (γ ~ 1), conv biases too, in ``dtype``, eval."""
    randomize_batchnorm(model, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model.to(dtype).eval()


def _structure(model: nn.Module) -> list[tuple]:
    """Every module's path and type, with each conv's geometry and parameter shapes."""
    rows = []
    for path, module in model.named_modules():
        row: tuple = (path, type(module).__name__)
        if isinstance(module, nn.Conv2d):
            row += (module.kernel_size, module.stride, module.padding, module.dilation,
                    module.groups, module.padding_mode)  # fmt: skip
        rows.append(row + tuple(tuple(p.shape) for p in module.parameters(recurse=False)))
    return rows


MODELS = {
    "resnet18": (lambda: create_model("resnet18", num_classes=10), (1, 3, 32, 32)),
    "yolo": (lambda: fixtures.yolo_net(), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_zero_is_exact_and_fuses_back_to_the_original(name, family, dtype):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = _randomised(build(), dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        want = model(x)
        expanded, report = expand_with_report(model, family)
        assert report.expanded and all(isinstance(expanded.get_submodule(c), ExpandedConv)
                                       for c, _ in report.expanded)  # fmt: skip
        assert _relative(expanded.eval()(x), want) <= RTOL[dtype]
        # Fuse back: the original architecture, same outputs. Checked in float32 only: DBB's
        # fold of ResNet-18's 512-channel 1x1→3x3 branches costs seconds in float64.
        if dtype is torch.float32:
            fused, original = reparam.fuse(expanded), reparam.fuse(model)
            assert _structure(fused) == _structure(original)
            count = sum(p.numel() for p in fused.parameters())
            assert count == sum(p.numel() for p in original.parameters())
            assert _relative(fused(x), want) <= RTOL[dtype]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qarepvgg"])
def test_training_mode_matches_too_and_a_step_trains_the_added_branches(family):
    torch.manual_seed(0)
    model = _randomised(fixtures.yolo_net(), torch.float64).train()
    # The head conv has no BatchNorm: its block adds one, which in training mode normalises
    # with batch statistics, so it is left out here (the docstring says so).
    expanded = expand(model, family, exclude="detect")
    assert expanded.training
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    # With batch statistics too: the added branches' BNs have γ = β = 0 and output 0.
    block = expanded.down.conv.block
    before = {k: v.clone() for k, v in block.state_dict().items()}
    torch.testing.assert_close(expanded(x), model(x), rtol=1e-10, atol=1e-10)
    added = _added_bns(block)
    assert added and all(float(bn.weight.detach().abs().max()) == 0 for bn in added)
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        expanded(x).square().mean().backward()
        if step == 0:  # γ and β get gradients at once; the branch convs only once γ ≠ 0
            assert all(float(bn.weight.grad.abs().max()) > 0 for bn in added)
            assert all(float(bn.bias.grad.abs().max()) > 0 for bn in added)
        optimizer.step()
    moved = [k for k, v in block.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]  # fmt: skip
    added_names = {name for name, m in block.named_modules() if m in added}
    assert any(k.rpartition(".")[0] in added_names and k.endswith(".weight") for k in moved)
    branch_convs = [m for m in _added_convs(block)]
    assert branch_convs and any(float(c.weight.grad.abs().max()) > 0 for c in branch_convs)


def test_qarepvgg_bare_1x1_branch_trains_from_the_first_step():
    torch.manual_seed(0)
    model = _randomised(fixtures.yolo_net(), torch.float64).train()
    expanded = expand(model, "qarepvgg", exclude="detect")
    block = expanded.c3.m[0].cv2.conv.block  # 3x3, in == out, stride 1: identity branch
    assert block.rbr_identity is not None and not block.rbr_1x1.weight.detach().any()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expanded.eval()
    torch.testing.assert_close(expanded(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    expanded.train()
    expanded(x).square().mean().backward()
    assert float(block.rbr_1x1.weight.grad.abs().max()) > 0  # no γ = 0 in front of it
    assert float(block.rbr_dense.conv.weight.grad.abs().max()) > 0


def _added_bns(block: nn.Module) -> list[_BatchNorm]:
    return [m for m in block.modules() if isinstance(m, _BatchNorm) and m.affine
            and float(m.weight.detach().abs().max()) == 0]  # fmt: skip


def _added_convs(block: nn.Module) -> list[nn.Conv2d]:
    """Convs of the block other than the main branch's (which holds the original kernel)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return [c for c in convs if c.weight.grad is not None][1:]


def test_what_each_family_leaves_alone_and_why():
    model = fixtures.coverage_net()
    reasons = {}
    for family in FAMILIES:
        expanded, report = expand_with_report(model, family)
        reasons[family] = dict(report.left_alone)
        done = {conv for conv, _ in report.expanded}
        assert done | set(reasons[family]) == {
            p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)
        }
        x = torch.randn(2, 4, 16, 16)
        torch.testing.assert_close(expanded.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    for family in FAMILIES:
        r = reasons[family]
        assert "no bias" in r["body.2"]  # a conv without BN and bias would gain a bias
        assert "even kernel" in r["body.14"] and "not square" in r["body.16"]
        assert "body.0" not in r and "body.4" not in r and "body.6" not in r  # bias, stride, dil.
        assert "body.20" not in r  # padding 0
    assert "1x1" in reasons["acnet"]["body.12"] and "body.12" not in reasons["repvgg"]
    assert "body.18" not in reasons["acnet"]  # ACBlock pads like the conv does
    assert all("padding_mode" in reasons[f]["body.18"] for f in FAMILIES[1:])
    assert "body.8" not in reasons["dbb"]  # depthwise, in == out
    assert "body.10" not in reasons["dbb"]  # groups 8, 8 -> 16 channels
    grouped = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
    with pytest.raises(NothingToExpandError, match=r"0: .*in_channels \(16\) must equal"):
        expand(grouped, "dbb")  # groups == out_channels: DBB's pool branch needs in == out


def test_input_model_untouched_and_include_exclude():
    model = fixtures.yolo_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = expand_with_report(model, "repvgg", include="c3.*", exclude="*.cv3.*")
    assert all(conv.startswith("c3.") and ".cv3." not in conv for conv, _ in report.expanded)
    assert dict(report.left_alone)["stem.conv"] == "not matched by include"
    assert dict(report.left_alone)["c3.cv3.conv"] == "matched by exclude"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.c3.cv1.conv, nn.Conv2d) and isinstance(model.c3.cv1.bn, nn.BatchNorm2d)


def test_a_frozen_conv_becomes_a_frozen_block():
    model = fixtures.yolo_net()
    model.down.requires_grad_(False)
    expanded = expand(model, "dbb")
    assert not any(p.requires_grad for p in expanded.down.parameters())
    assert all(p.requires_grad for p in expanded.c3.parameters())


def test_already_expanded_blocks_are_left_alone():
    once = expand(fixtures.yolo_net(), "dbb")
    with pytest.raises(NothingToExpandError, match=r"nothing to expand into acnet.*already"):
        expand(once, "acnet")
    _, report = expand_with_report(create_model("digits_net"), "repvgg")
    assert any("RepVGGBlock" in why for _, why in report.left_alone)


def test_bad_input_is_one_clear_error():
    with pytest.raises(UserInputError, match=r"unknown family 'repvg' \(did you mean 'repvgg'\?\)"
                       r"; known: acnet, repvgg, dbb, mobileone, qarepvgg"):  # fmt: skip
        expand(fixtures.yolo_net(), "repvg")
    with pytest.raises(NothingToExpandError, match=r"nothing to expand into dbb.*no Conv2d"):
        expand(nn.Sequential(nn.Linear(3, 4)), "dbb")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        expand({"weight": torch.zeros(1)}, "dbb")
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(UserInputError, match="TorchScript modules cannot be expanded"):
        expand(scripted, "repvgg")
    with pytest.raises(UserInputError, match="num_conv_branches"):
        expand(fixtures.yolo_net(), "mobileone", num_conv_branches=0)


def test_untraceable_model_is_expanded_through_the_probe():
    model = _randomised(fixtures.untraceable_net(), torch.float32)
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(NothingToExpandError, match=r"conv1: no BatchNorm.*pass example_inputs"):
        expand(model, "repvgg")
    expanded, report = expand_with_report(model, "repvgg", example_inputs=x)
    assert report.probed and {c for c, _ in report.expanded} == {"conv1", "conv2"}
    torch.testing.assert_close(expanded.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_report_to_dict_is_plain():
    _, report = expand_with_report(fixtures.coverage_net(), "acnet")
    data = report.to_dict()
    assert data["family"] == "acnet" and data["traced"] is True
    assert {"conv": "body.0", "bn": None} in data["expanded"]
    assert {"conv": "body.4", "bn": "body.5"} in data["expanded"]
    assert any(row["path"] == "body.14" for row in data["left_alone"])
    assert "left alone:" in report.summary()
