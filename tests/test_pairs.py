"""Conv→BN and Linear→BN1d pairs found by Sequential adjacency, torch.fx and a probe forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import DRConv2d
from reparam.testing import randomize_batchnorm

DTYPES = pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def check_same(model: nn.Module, fused: nn.Module, *inputs: torch.Tensor, rtol: float) -> None:
    with torch.no_grad():
        expected, actual = model.eval()(*inputs), fused(*inputs)
    assert (actual - expected).abs().max() <= rtol * expected.abs().max()


def prepared(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(model).to(dtype).eval()


class ControlFlow(nn.Module):
    """Data-dependent branching: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if y.mean() > 0:
            return self.bn2(self.conv2(y))
        return -self.bn2(self.conv2(y))


class VarArgs(nn.Module):
    """``forward(self, *xs)`` with a bare assert: fx cannot trace it either."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, *xs):
        assert isinstance(xs[0], torch.Tensor)
        return sum(self.bn(self.conv(x)) for x in xs)


@DTYPES
def test_probe_folds_pairs_in_a_model_fx_cannot_trace(dtype, rtol):
    model = prepared(ControlFlow(), dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    fused, report = reparam.fuse_with_report(model, example_inputs=x)
    assert report.traced is False and report.probed is True
    assert count(fused, nn.BatchNorm2d) == 0 and report.blocks["Conv+BatchNorm"] == 2
    check_same(model, fused, x, rtol=rtol)
    check_same(model, fused, -x, rtol=rtol)


def test_without_example_inputs_untraceable_pairs_stay():
    model = prepared(ControlFlow(), torch.float32)
    fused, report = reparam.fuse_with_report(model)
    assert report.probed is None and count(fused, nn.BatchNorm2d) == 2


def test_bare_assert_does_not_crash_and_varargs_fold_with_a_probe():
    model = prepared(VarArgs(), torch.float64)
    _, report = reparam.fuse_with_report(model)
    assert report.traced is False and report.trace_error.startswith("AssertionError")
    # called once per positional input: a module called twice is never folded
    xs = (torch.randn(1, 3, 5, 5, dtype=torch.float64),)
    fused, report = reparam.fuse_with_report(model, example_inputs=xs)
    assert isinstance(fused.bn, nn.Identity)
    check_same(model, fused, *xs, rtol=1e-10)
    two = xs * 2
    fused_twice = reparam.fuse(model, example_inputs=two)
    assert isinstance(fused_twice.bn, nn.BatchNorm2d)


class SecondReader(nn.Module):
    """The conv output is read again after the BatchNorm: folding would change that read."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.functional = functional

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if out.sum() > -1e9:  # untraceable on purpose
            return out * y.mean() if self.functional else out + y
        return out


@pytest.mark.parametrize("functional", [False, True])
def test_probe_never_folds_a_conv_output_with_another_reader(functional):
    model = prepared(SecondReader(functional), torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fused, report = reparam.fuse_with_report(model, example_inputs=x)
    assert isinstance(fused.bn, nn.BatchNorm2d) and not report.blocks
    check_same(model, fused, x, rtol=1e-12)


@DTYPES
@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_batchnorm_fold(dims, dtype, rtol):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    norm = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
    model = prepared(nn.Sequential(conv(3, 4, 3, groups=1), norm(4), nn.ReLU()), dtype)
    x = torch.randn(2, 3, *([6] * dims), dtype=dtype)
    fused = reparam.fuse(model)
    assert count(fused, norm) == 0
    check_same(model, fused, x, rtol=rtol)


class LinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return y if y.sum() > -1e9 else -y  # untraceable on purpose


@DTYPES
def test_linear_batchnorm1d_folds_in_sequential_and_by_probe(dtype, rtol):
    x = torch.randn(3, 5, dtype=dtype)
    seq = prepared(nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)), dtype)
    # The trace holds no rank: BatchNorm1d on a 3-D Linear output normalises another axis.
    fused, report = reparam.fuse_with_report(seq)
    assert (
        isinstance(fused[1], nn.BatchNorm1d)
        and "pass example_inputs" in dict(report.not_fused)["1"]
    )
    fused, report = reparam.fuse_with_report(seq, example_inputs=x)
    assert isinstance(fused[1], nn.Identity) and report.blocks["Linear+BatchNorm1d"] == 1
    check_same(seq, fused, x, rtol=rtol)
    head = prepared(LinearHead(), dtype)
    fused = reparam.fuse(head, example_inputs=x)
    assert isinstance(fused.bn, nn.Identity)
    check_same(head, fused, x, rtol=rtol)


def test_linear_on_sequences_is_not_folded_into_batchnorm1d():
    """(N, L, C) Linear output: BatchNorm1d normalises dim 1 (L), not the Linear's features."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    model = prepared(Tokens(), torch.float64)
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, example_inputs=x)
    assert isinstance(fused.bn, nn.BatchNorm1d)
    check_same(model, fused, x, rtol=1e-12)


class WithDRConv(nn.Module):
    """Four Conv→BN pairs around a DRConv2d, wired in forward (only fx can pair them)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.dr = DRConv2d(8, 8, 3, region_num=4, padding=1)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c4, self.b4 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = self.dr(x)
        return self.b4(self.c4(torch.relu(self.b3(self.c3(x)))))


def test_dynamic_blocks_are_fx_leaves_so_pairs_around_them_fold():
    model = prepared(WithDRConv(), torch.float32)
    fused, report = reparam.fuse_with_report(model)
    assert report.traced is True, report.trace_error
    assert count(fused, nn.BatchNorm2d) == 0 and report.blocks["Conv+BatchNorm"] == 4
    check_same(model, fused, torch.randn(2, 3, 12, 12), rtol=1e-5)
