"""Issue 19, fuse side: every conversion reparam makes is exact or refused, and never silent.

One test per case; each fails on the code before the fix (the issue's case number is in the
test name).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_case11_fuse_alone_sees_every_builtin_registration():
    """`from reparam.convert import fuse` in a fresh interpreter, nothing else of reparam
    imported: two pasted ACBlock copies (no conversion method of their own) are adopted and
    fused to one conv each (before: 6 convs left, nothing said)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        from torch import nn
        from reparam.convert import fuse_with_report
        from fixtures_foreign import UserACBlock, randomise_batchnorms
        model = randomise_batchnorms(nn.Sequential(UserACBlock(3, 4, 3, padding=1),
                                                   UserACBlock(4, 4, 3, padding=1))).eval()
        x = torch.randn(2, 3, 9, 9)
        fused, report = fuse_with_report(model)
        convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
        error = (fused(x) - model(x)).abs().max() / model(x).abs().max()
        print(convs, len(report.adopted), float(error))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    convs, adopted, error = result.stdout.split()
    assert (int(convs), int(adopted)) == (2, 2)
    assert float(error) <= 1e-5


# --------------------------------------------------------------------------- fixtures

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import reparam  # noqa: E402
from reparam.compare import compare_outputs  # noqa: E402
from reparam.errors import FusionError  # noqa: E402
from reparam.fusion import fold_batchnorm  # noqa: E402
from reparam.testing import randomize_batchnorm  # noqa: E402

sys.path.insert(0, str(TESTS))
from fixtures_foreign import UserDBB, UserRepVGGBlock, randomise_batchnorms  # noqa: E402

SHAPES = ((2, 3, 12, 12), (1, 3, 9, 14), (3, 3, 16, 7))


def agree(model: nn.Module, fused: nn.Module, shapes=SHAPES, rtol=1e-5, scale=1.0) -> None:
    """``fused`` computes what ``model`` computes at each shape (eval mode, ± and ×scale)."""
    torch.manual_seed(1)
    for shape in shapes:
        for factor in (scale, -scale):
            x = factor * torch.randn(shape, dtype=next(model.parameters()).dtype)
            (diff,) = compare_outputs(model(x), fused(x))
            assert diff.within(rtol), (shape, factor, diff)


def untraceable(y: torch.Tensor) -> torch.Tensor:
    """Data-dependent control flow: torch.fx cannot trace past it."""
    return y if y.sum() > -1e30 else -y


class DeployMergesOneByOne(UserRepVGGBlock):
    """A RepVGG copy whose forward drops the 1x1 branch, with a published-style
    switch_to_deploy that merges all three branches: "not adopted", and its own method
    changes the function (issue 19 case 2)."""

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + id_out)

    def switch_to_deploy(self):
        dense, one = self.rbr_dense, self.rbr_1x1
        merged = nn.Conv2d(dense.conv.in_channels, dense.conv.out_channels, 3, padding=1)
        kernel, bias = fold_batchnorm(
            dense.conv.weight, None, dense.bn.running_mean, dense.bn.running_var, dense.bn.eps,
            dense.bn.weight, dense.bn.bias,
        )  # fmt: skip
        k1, b1 = fold_batchnorm(
            one.conv.weight, None, one.bn.running_mean, one.bn.running_var, one.bn.eps,
            one.bn.weight, one.bn.bias,
        )  # fmt: skip
        merged.weight.data = kernel + F.pad(k1, [1, 1, 1, 1])
        merged.bias.data = bias + b1
        self.rbr_dense, self.rbr_identity = merged, None
        del self.rbr_1x1

    def extra_repr(self) -> str:
        return "look-alike"


class ReLU6Deploy(nn.Module):
    """Computes conv → ReLU6; its own ``fuse()`` swaps the activation for ReLU: equal on
    unit-variance inputs, 1.8 off at 4× (issue 19 case 3's kind, through a deploy method)."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU6()

    def forward(self, x):
        return self.act(self.conv(x))

    def fuse(self):
        self.act = nn.ReLU()
        return self


# --------------------------------------------------------------------------- case 2


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "example-inputs"])
def test_case2_lookalike_is_never_converted_by_its_own_method(with_inputs):
    torch.manual_seed(0)
    model = randomise_batchnorms(nn.Sequential(DeployMergesOneByOne(3, 3), nn.ReLU())).eval()
    example = torch.randn(2, 3, 10, 10) if with_inputs else None
    fused, report = reparam.fuse_with_report(model, example_inputs=example)
    agree(model, fused)
    paths = [path for path, _ in report.not_fused]
    assert paths.count("0") == 1, report.not_fused  # listed once, not also as fused
    assert "DeployMergesOneByOne" not in report.blocks
    assert "changes what it computes" in dict(report.not_fused)["0"]


def test_case2_deploy_method_checked_across_magnitudes():
    torch.manual_seed(0)
    model = nn.Sequential(ReLU6Deploy()).eval()
    fused, report = reparam.fuse_with_report(model)
    agree(model, fused, scale=100.0)
    assert isinstance(fused[0].act, nn.ReLU6) and "ReLU6Deploy" not in report.blocks
    assert "relative error" in dict(report.not_fused)["0"]


def test_case2_an_exact_deploy_method_is_fused_and_listed_once():
    class Exact(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

        def switch_to_deploy(self):
            kernel, bias = fold_batchnorm(self.conv.weight, self.conv.bias, self.bn.running_mean,
                                          self.bn.running_var, self.bn.eps, self.bn.weight,
                                          self.bn.bias)  # fmt: skip
            self.conv.weight.data, self.conv.bias.data = kernel, bias
            self.bn = nn.Identity()

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(Exact())).eval()
    fused, report = reparam.fuse_with_report(model)
    agree(model, fused)
    assert report.blocks["Exact"] == 1 and not report.not_fused


# --------------------------------------------------------------------------- case 5


class UntraceableWithDBBCopy(nn.Module):
    """A DBB copy reparam does not adopt (its 1x1 branch is counted twice), in a model fx
    cannot trace: the probe finds the BN inside BNAndPad, whose pad reads that BN's
    attributes, so the fold must be undone, not crash (issue 19 case 5)."""

    def __init__(self):
        super().__init__()
        self.block = DoubledDBB(3, 3)

    def forward(self, x):
        return untraceable(self.block(x))


class DoubledDBB(UserDBB):
    def forward(self, x):
        return super().forward(x) + self.dbb_1x1(x)


def test_case5_failed_probe_fold_is_undone_and_reported():
    torch.manual_seed(0)
    model = randomise_batchnorms(UntraceableWithDBBCopy()).eval()
    x = torch.randn(2, 3, 10, 10)
    fused, report = reparam.fuse_with_report(model, example_inputs=x)
    agree(model, fused)
    assert report.traced is False and report.probed is True
    left = dict(report.not_fused)
    assert any(path.endswith("dbb_1x1_kxk.bn1.bn") for path in left), left


# --------------------------------------------------------------------------- case 6


class LinearAfterPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.bn1 = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn1(self.fc(self.bn(self.conv(x)).mean((2, 3))))


def test_case6_linear_batchnorm1d_under_fx():
    torch.manual_seed(0)
    model = randomize_batchnorm(LinearAfterPool()).eval()
    fused, report = reparam.fuse_with_report(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert report.traced is True
    assert isinstance(fused.bn1, nn.Identity) and report.blocks["Linear+BatchNorm1d"] == 1
    agree(model, fused)
    fused, report = reparam.fuse_with_report(model)  # no inputs: left, and said so
    assert isinstance(fused.bn1, nn.BatchNorm1d)
    assert "pass example_inputs" in dict(report.not_fused)["bn1"]
    agree(model, fused)


# --------------------------------------------------------------------------- case 12


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(untraceable(self.seq(x))))


def test_case12_no_sequential_only_note_when_the_probe_folded_every_pair():
    torch.manual_seed(0)
    model = randomize_batchnorm(Branchy()).eval()
    fused, report = reparam.fuse_with_report(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert report.blocks["Conv+BatchNorm"] == 2
    agree(model, fused)
    text = str(report)
    assert "Sequential" not in text and "found by the probe forward" in text
    assert "Sequential" not in report.trace_note
    _, report = reparam.fuse_with_report(model)
    assert "pass example_inputs" in report.trace_note


# --------------------------------------------------------------------------- never silent


def test_every_batchnorm_left_is_listed_with_why_and_how():
    class Leftovers(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.BatchNorm2d(3)  # on the input: nothing to fold it into
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.act, self.post = nn.ReLU(), nn.BatchNorm2d(4)  # after an activation

        def forward(self, x):
            return self.post(self.act(self.bn(self.conv(self.pre(x)))))

    torch.manual_seed(0)
    model = randomize_batchnorm(Leftovers()).eval()
    fused, report = reparam.fuse_with_report(model)
    agree(model, fused)
    left = {path for path, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert left == {"pre", "post"}
    listed = {entry["path"]: entry["reason"] for entry in report.to_dict()["not_fused"]}
    assert left <= set(listed) and all("stays a BatchNorm" in listed[p] for p in left)
    assert all(p in str(report) for p in left)


# --------------------------------------------------------------------------- pairs that are not


class RawConvReused(nn.Module):
    """Calls the Sequential's members one by one and reuses the raw conv output."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        raw = self.seq[0](x)
        return untraceable(self.seq[1](raw)) + raw


class Taps(nn.Module):
    """FPN-style taps: every intermediate of a Sequential(Conv, BN, ReLU) is an output."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        taps = []
        for layer in self.seq:
            x = layer(x)
            taps.append(x)
        return tuple(untraceable(t) for t in taps)


class ConvOnly(nn.Module):
    """Holds a Sequential(Conv, BN) but runs only the conv."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return untraceable(self.seq[0](x))


class InstanceForward(nn.Module):
    """A BatchNorm whose forward was replaced on the instance."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        bn = self.seq[1]
        bn.forward = lambda x: nn.BatchNorm2d.forward(bn, x) * 2.0 + 1.0

    def forward(self, x):
        return self.seq(x)


def compare_any(model, fused, x):
    diffs = compare_outputs(model(x), fused(x))
    assert all(d.within(1e-5) for d in diffs), diffs


@pytest.mark.parametrize("kind", [RawConvReused, Taps, ConvOnly, InstanceForward])
@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "example-inputs"])
def test_pairs_that_are_not_pairs_are_never_folded(kind, with_inputs):
    torch.manual_seed(0)
    model = randomize_batchnorm(kind()).eval()
    example = torch.randn(2, 3, 8, 8) if with_inputs else None
    fused, report = reparam.fuse_with_report(model, example_inputs=example)
    for shape in SHAPES:
        for factor in (1.0, -3.0):
            compare_any(model, fused, factor * torch.randn(shape))
    assert isinstance(fused.seq[1], nn.BatchNorm2d)
    assert any(path.endswith("seq.1") for path, _ in report.not_fused), report.not_fused


# --------------------------------------------------------------------------- compare, meta, var


def test_all_nan_model_never_passes_the_check():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    x = torch.randn(1, 3, 6, 6)
    (diff,) = compare_outputs(model(x), model(x))
    assert not diff.within(1.0)


def test_meta_device_is_one_clear_line():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(FusionError, match="meta device") as info:
        reparam.fuse(model)
    assert "\n" not in str(info.value) and "item" not in str(info.value)


def test_negative_running_var_is_reported_as_negative():
    with pytest.raises(FusionError, match=r"running_var is negative \(-0\.25 at channel 1\)"):
        fold_batchnorm(torch.ones(2, 1, 1, 1), None, torch.zeros(2),
                       torch.tensor([1.0, -0.25]), 1e-5)  # fmt: skip


class ReadsBatchNormShift(nn.Module):
    """Traceable; beside bn(conv(x)) the forward reads the BN's shift directly, as DBB's
    BNAndPad pad does (an fx get_attr node)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        shift = self.bn.bias - self.bn.running_mean * self.bn.weight
        return self.bn(self.conv(x)) + shift.view(1, -1, 1, 1)


def test_traced_pair_whose_batchnorm_is_read_elsewhere_is_not_folded():
    """Traceable model, no example inputs: the BN's parameters are read outside its call, so
    it is not folded (before: folded, and the fused model raised AttributeError on its first
    forward)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ReadsBatchNormShift()).eval()
    fused, report = reparam.fuse_with_report(model)
    assert report.traced is True
    agree(model, fused)
    assert "reads its parameters or statistics directly" in dict(report.not_fused)["bn"]


class ReLU6BehindReLU(UserRepVGGBlock):
    """A RepVGG copy computing F.relu6 behind its nn.ReLU attribute (issue 19 case 3): the
    same on unit-variance inputs, not above 6."""

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return F.relu6(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "example-inputs"])
def test_case3_adoption_is_checked_across_magnitudes(with_inputs):
    torch.manual_seed(0)
    model = randomise_batchnorms(nn.Sequential(ReLU6BehindReLU(3, 3))).eval()
    example = torch.randn(2, 3, 10, 10) if with_inputs else None
    fused, report = reparam.fuse_with_report(model, example_inputs=example)
    agree(model, fused, scale=4.0)
    agree(model, fused, scale=100.0)
    assert not report.adopted and [path for path, _ in report.not_fused].count("0") == 1


def test_an_adoption_that_changes_the_function_is_undone(monkeypatch):
    """Whatever a pre-fuse pass adopts is checked again by the fuse (scaled probes): a pass
    that swaps a ReLU6 block for a ReLU one is undone and the copy listed, once."""
    from reparam.adopt import AdoptionNote

    def careless_pass(model):
        model[0] = nn.Sequential(model[0].conv, nn.ReLU())  # what a lax check would accept
        return [AdoptionNote("0", "ReLU6Deploy", "Sequential", "looked the same")]

    monkeypatch.setattr("reparam.fuse_walk.pre_fuse_passes", lambda: (careless_pass,))
    model = nn.Sequential(ReLU6Deploy()).eval()
    fused, report = reparam.fuse_with_report(model)
    agree(model, fused, scale=100.0)
    assert not report.adopted and isinstance(fused[0], ReLU6Deploy)
    assert "computes something else" in dict(report.not_fused)["0"]
