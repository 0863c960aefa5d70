"""Model-wide ``reparam.fuse``: blocks, Conv→BN pairs, third-party blocks, registry, safety."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks import ACBlock
from reparam.errors import FusionError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


class ConvBNAttributes(nn.Module):
    """Conv and BN as attributes, wired in forward: only torch.fx can pair them."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.ac1 = ACBlock(8, 8, 3)
        self.body = ConvBNAttributes(8)
        self.ac2 = nn.Sequential(ACBlock(8, 16, 5, stride=2, groups=2), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.ac2(self.body(self.ac1(self.stem(x)))))


def mixed_net(dtype=torch.float32) -> MixedNet:
    torch.manual_seed(0)
    return randomize_batchnorm(MixedNet()).to(dtype).eval()


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
def test_mixed_network_fuses_exactly_and_leaves_no_batchnorm(dtype, rtol):
    model = mixed_net(dtype)
    fused, _ = assert_fuses_exactly(model, torch.randn(2, 3, 12, 10, dtype=dtype), rtol=rtol)
    assert count(fused, nn.BatchNorm2d) == 0
    assert all(block.deploy for block in fused.modules() if isinstance(block, ACBlock))
    assert type(fused) is MixedNet and next(fused.parameters()).dtype == dtype


def test_report_counts_blocks_and_pairs():
    _, report = reparam.fuse_with_report(mixed_net())
    assert report.blocks == {"ACBlock": 2, "Conv+BatchNorm": 2}
    assert report.traced is True


def test_idempotent():
    once = reparam.fuse(mixed_net())
    twice, report = reparam.fuse_with_report(once)
    assert not report.blocks
    assert all(torch.equal(v, twice.state_dict()[k]) for k, v in once.state_dict().items())


def test_training_model_is_fused_on_an_eval_copy():
    model = mixed_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparam.fuse(model)
    assert model.training and not fused.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count(model, nn.BatchNorm2d) == 8


def test_inplace_modifies_the_model_itself():
    model = mixed_net()
    assert reparam.fuse(model, inplace=True) is model
    assert count(model, nn.BatchNorm2d) == 0


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(FusionError, match=r"'1'.*running statistics"):
        reparam.fuse(model)


def test_acblock_without_running_stats_names_the_block():
    model = nn.Sequential(ACBlock(4, 4))
    model[0].ver_bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(FusionError, match=r"^0 \(ACBlock\):.*running statistics"):
        reparam.fuse(model)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.seq(x)
        if y.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            return self.bn(self.conv(y))
        return self.bn(self.conv(-y))


def test_untraceable_model_folds_pairs_only_where_the_probe_proves_them():
    """Sequential adjacency alone proves nothing in a model fx cannot trace (the forward may
    call the members one by one): without example inputs nothing is folded and every
    BatchNorm is listed with "pass example_inputs"; with them, the probe folds both."""
    torch.manual_seed(0)
    model = randomize_batchnorm(Branchy()).eval()
    fused, report = reparam.fuse_with_report(model)
    assert report.traced is False and "TraceError" in report.trace_error
    assert count(fused, nn.BatchNorm2d) == 2 and not report.blocks
    left = dict(report.not_fused)
    assert set(left) == {"seq.1", "bn"} and all("pass example_inputs" in w for w in left.values())
    x = torch.randn(1, 3, 8, 8)
    fused, report = reparam.fuse_with_report(model, example_inputs=x)
    assert count(fused, nn.BatchNorm2d) == 0 and report.blocks["Conv+BatchNorm"] == 2
    torch.testing.assert_close(fused(x), model(x))


def test_shared_modules_are_not_folded():
    conv, bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Sequential(conv, bn), nn.Sequential(conv, nn.ReLU()))
    randomize_batchnorm(model)
    fused = reparam.fuse(model)
    assert count(fused, nn.BatchNorm2d) == 1
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(fused(x), model.eval()(x))


def test_conv_called_twice_is_not_folded_by_tracing():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    model = randomize_batchnorm(Reuse()).eval()
    fused = reparam.fuse(model)
    assert isinstance(fused.bn, nn.BatchNorm2d)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(fused(x), model(x))


def test_conv_transpose_batchnorm_in_sequential():
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4))
    randomize_batchnorm(model)
    fused, _ = assert_fuses_exactly(model.double(), torch.randn(2, 8, 5, 4).double(), rtol=1e-10)
    assert count(fused, nn.BatchNorm2d) == 0


@pytest.mark.parametrize("method", ["switch_to_deploy", "reparameterize", "fuse"])
def test_third_party_deploy_methods_are_honoured(method):
    class ThirdParty(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.calls = 0

        def forward(self, x):
            return self.bn(self.conv(x)) if self.bn is not None else self.conv(x)

        def _deploy(self):
            self.calls += 1
            if self.bn is not None:
                reparam.module_fusion.fold_bn_into_conv(self.conv, self.bn)
                self.bn = None

    setattr(ThirdParty, method, ThirdParty._deploy)
    model = nn.Sequential(randomize_batchnorm(ThirdParty()))
    fused, report = reparam.fuse_with_report(model)
    assert fused[0].calls == 1 and fused[0].bn is None
    assert report.blocks["ThirdParty"] == 1
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(fused(x), model.eval()(x))


def test_methods_needing_arguments_are_not_called():
    class NeedsArgs(nn.Module):
        def forward(self, x):
            return x

        def fuse(self, modules_to_fuse):  # e.g. a quantisation-style API
            raise AssertionError("must not be called")

    reparam.fuse(nn.Sequential(NeedsArgs()))


class UserBlock(nn.Module):
    """A user's block: two parallel 1x1 convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_registered_fuser_replaces_the_block_and_reports_its_note():
    def fuse_user_block(block):
        kernel, bias = reparam.fusion.add_branches(
            (block.a.weight, block.a.bias), (block.b.weight, block.b.bias)
        )
        return reparam.FuseOutcome(reparam.module_fusion.make_conv(kernel, bias), "summed 2")

    reparam.register_fuser(UserBlock, fuse_user_block)
    try:
        model = nn.Sequential(UserBlock(), nn.ReLU())
        fused, report = reparam.fuse_with_report(model)
        assert isinstance(fused[0], nn.Conv2d) and "UserBlock" in reparam.list_fusers()
        assert report.blocks["UserBlock"] == 1 and report.details == ["0 (UserBlock): summed 2"]
        x = torch.randn(1, 3, 4, 4)
        torch.testing.assert_close(fused(x), model(x))
        with pytest.warns(UserWarning, match="replacing"):
            reparam.register_fuser(UserBlock, lambda block: None)
    finally:
        reparam.convert.unregister_fuser(UserBlock)


def test_fuser_error_names_the_module_path():
    class Broken(nn.Module):
        def forward(self, x):
            return x

    @reparam.register_fuser(Broken)
    def refuse(block):
        raise FusionError("stride 3 is not supported")

    model = nn.Module()
    model.inner = nn.Sequential(Broken())
    try:
        with pytest.raises(FusionError, match=r"^inner\.0 \(Broken\): stride 3"):
            reparam.fuse(model)
    finally:
        reparam.convert.unregister_fuser(Broken)


def test_bundled_acnet_tiny_fuses_to_plain_convs():
    from reparam.models import create_model

    model = randomize_batchnorm(create_model("acnet_tiny")).eval()
    fused, _ = assert_fuses_exactly(model, torch.randn(2, 3, 32, 32), rtol=1e-5)
    assert count(fused, nn.BatchNorm2d) == 0 and count(fused, ACBlock) == 4


def test_report_text_lists_adopted_and_not_fused_modules():
    report = reparam.FuseReport()
    report.record("ACBlock")
    report.adopted.append("neck.0: MyACB -> ACBlock")
    report.skip("head.conv -> head.bn", "BatchNorm2d at head.bn has a forward hook")
    report.skip("head.conv -> head.bn", "listed once")
    text = report.summary()
    assert text.splitlines()[0] == "fused: ACBlock x1"
    assert "neck.0: MyACB -> ACBlock" in text and "head.bn has a forward hook" in text
    assert len(report.not_fused) == 1 and str(report) == text
