"""Careless or hostile inputs to the fuse API: each is refused with a clear error or fused
exactly, and the input model is never changed."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import ACBlock
from reparam.compare import check_tolerance, compare_outputs
from reparam.errors import FusionError, UserInputError
from reparam.testing import randomize_batchnorm


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )


def conv_bn(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(dtype)


@pytest.mark.parametrize(
    ("value", "hint"),
    [(None, "NoneType"), (len, "function"), ({"0.weight": torch.zeros(1)}, "state dict")],
    ids=["none", "function", "state_dict"],
)
def test_non_modules_get_a_type_error_naming_nn_module(value, hint):
    with pytest.raises(TypeError, match=rf"torch\.nn\.Module.*{hint}"):
        reparam.fuse(value)


def test_a_model_deepcopy_cannot_copy_suggests_inplace():
    model = conv_bn()
    model.lock = threading.Lock()
    before = snapshot(model)
    with pytest.raises(FusionError, match=r"cannot copy.*inplace=True"):
        reparam.fuse(model)
    assert unchanged(model, before) and isinstance(model[1], nn.BatchNorm2d)
    fused = reparam.fuse(model, inplace=True)
    assert fused is model and isinstance(model[1], nn.Identity)


def test_torchscript_is_refused_with_the_reason():
    scripted = torch.jit.script(conv_bn().eval())
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    with pytest.raises(FusionError, match=r"TorchScript.*cannot be fused.*compiled"):
        reparam.fuse(scripted)
    assert all(torch.equal(scripted.state_dict()[k], v) for k, v in before.items())


class TiedConvs(nn.Module):
    """Two convs sharing one weight Parameter, each followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.seq_a = nn.Sequential(self.a, nn.BatchNorm2d(4))
        self.seq_b = nn.Sequential(self.b, nn.BatchNorm2d(4))
        del self.a, self.b

    def forward(self, x):
        return self.seq_a(x) - self.seq_b(x)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
def test_shared_weights_are_untied_and_fused_exactly(dtype, rtol):
    torch.manual_seed(0)
    model = randomize_batchnorm(TiedConvs()).to(dtype).eval()
    before = snapshot(model)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    fused = reparam.fuse(model)
    diff = compare_outputs(model(x), fused(x))[0]
    assert diff.max_rel <= rtol
    assert fused.seq_a[0].weight is not fused.seq_b[0].weight
    assert unchanged(model, before) and model.seq_a[0].weight is model.seq_b[0].weight
    # in place too: the second fold must not write into the first conv's weight
    reference = model(x)
    reparam.fuse(model, inplace=True)
    assert compare_outputs(reference, model(x))[0].max_rel <= rtol


@pytest.mark.parametrize("where", ["bn_forward", "bn_pre", "conv_forward", "conv_pre"])
def test_hooked_pairs_are_skipped_and_reported(where):
    model = conv_bn().eval()
    module = model[1] if where.startswith("bn") else model[0]
    if where.endswith("pre"):
        module.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        module.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(1, 3, 6, 6)
    fused, report = reparam.fuse_with_report(model)
    torch.testing.assert_close(fused(x), model(x))
    assert isinstance(fused[1], nn.BatchNorm2d) and not report.blocks
    (path, reason), *_ = report.not_fused
    assert path == "0 -> 1" and "hook" in reason
    assert "not fused:" in report.summary() and "0 -> 1" in str(report)


def test_hooked_block_is_skipped_and_reported():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(ACBlock(3, 4))).eval()
    model[0].ver_bn.register_forward_hook(lambda m, args, out: out * 3)
    x = torch.randn(1, 3, 6, 6)
    fused, report = reparam.fuse_with_report(model)
    torch.testing.assert_close(fused(x), model(x))
    assert not fused[0].deploy and report.not_fused[0][0] == "0"
    assert "ver_bn" in report.not_fused[0][1]


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    model = randomize_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), ACBlock(4, 4))
    )
    model.requires_grad_(False)
    fused = reparam.fuse(model)
    assert [p.requires_grad for p in fused.parameters()] == [False] * 4
    trainable = reparam.fuse(model.requires_grad_(True))
    assert all(p.requires_grad for p in trainable.parameters())


def test_fp16_fold_that_overflows_is_refused_naming_the_batchnorm():
    model = conv_bn(torch.float16)
    with torch.no_grad():
        model[0].weight.fill_(1000.0)
        model[1].running_var.fill_(1e-4)
    before = snapshot(model)
    with pytest.raises(FusionError, match=r"^1 \(BatchNorm2d\).*65504|^1 \(BatchNorm2d\).*float16"):
        reparam.fuse(model)
    assert unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_eps_and_zero_variance_is_refused(dtype):
    model = conv_bn(dtype)
    model[1].eps = 0.0
    with torch.no_grad():
        model[1].running_var[2] = 0.0
    with pytest.raises(FusionError, match=r"^1 \(BatchNorm2d\): running_var \+ eps is 0 .*eps=0"):
        reparam.fuse(model)


def test_negative_running_var_is_named_negative():
    """Issue 19: a negative running_var was reported as "a running_var of 0"."""
    model = conv_bn(torch.float32)
    with torch.no_grad():
        model[1].running_var[1] = -0.5
    with pytest.raises(FusionError, match=r"^1 \(BatchNorm2d\): running_var is negative") as info:
        reparam.fuse(model)
    assert "-0.5" in str(info.value) and "of 0" not in str(info.value)


def test_block_whose_fused_kernel_overflows_is_refused():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(ACBlock(3, 4))).half()
    with torch.no_grad():
        for conv in (model[0].square_conv, model[0].ver_conv, model[0].hor_conv):
            conv.weight.fill_(60000.0)
    with pytest.raises(FusionError, match=r"^0 \(ACBlock\)"):
        reparam.fuse(model)


def test_nan_and_inf_differences_fail_the_comparison():
    reference = torch.tensor([1.0, 2.0, 3.0])
    for bad in (float("nan"), float("inf")):
        candidate = reference.clone()
        candidate[1] = bad
        (diff,) = compare_outputs(reference, candidate)
        assert not diff.within(1e-3) and diff.max_rel > 1e-3
    # Issue 19: NaN at the same place is no agreement (an all-NaN model passed its check).
    same_nan = torch.tensor([1.0, float("nan")])
    (diff,) = compare_outputs(same_nan, same_nan.clone())
    assert not diff.within(1.0) and diff.max_rel == float("inf")
    same_inf = torch.tensor([1.0, float("inf")])
    assert compare_outputs(same_inf, same_inf.clone())[0].within(0.0)
    assert not compare_outputs(reference, torch.full((3,), float("nan")))[0].within(1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-3, "abc", None])
def test_tolerances_must_be_finite_and_non_negative(value):
    with pytest.raises(UserInputError, match="rtol"):
        check_tolerance(value)
    (diff,) = compare_outputs(torch.ones(2), torch.ones(2))
    with pytest.raises(UserInputError):
        diff.within(value)
