"""Users' own copies of the published blocks are adopted into reparam's blocks and fuse fully."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.adopt import adopt_foreign_blocks

try:
    import fixtures_foreign as ff
except ImportError:  # run from the repository root without tests/ on sys.path
    from tests import fixtures_foreign as ff


def _image(channels: int, size: int = 12, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, channels, size, size, generator=generator, dtype=dtype)


def _levels(dims, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    c0, c1, c2 = dims
    return [
        torch.randn(2, c, s, s, generator=generator, dtype=dtype)
        for c, s in ((c2, 16), (c1, 8), (c0, 4))
    ]


# (id, builder of the user's block, input builder taking a dtype, reparam class name,
#  convs left after fuse or None when the block is dynamic and keeps its convs)
CASES = [
    ("acb", lambda: ff.UserACBlock(8, 16, 3, padding=1), lambda d: _image(8, dtype=d),
     "ACBlock", 1),
    ("acb-crop", lambda: ff.UserACBlock(8, 8, 3, stride=2, padding=0), lambda d: _image(8, dtype=d),
     "ACBlock", 1),
    ("acb-k5-groups", lambda: ff.UserACBlock(8, 8, 5, padding=2, groups=2),
     lambda d: _image(8, dtype=d), "ACBlock", 1),
    ("repvgg", lambda: ff.UserRepVGGBlock(16, 16), lambda d: _image(16, dtype=d), "RepVGGBlock", 1),
    ("repvgg-stride-se-silu",
     lambda: ff.UserRepVGGBlock(16, 32, stride=2, use_se=True, act=nn.SiLU()),
     lambda d: _image(16, dtype=d), "RepVGGBlock", 3),
    ("dbb", lambda: ff.UserDBB(8, 8), lambda d: _image(8, dtype=d), "DiverseBranchBlock", 1),
    ("dbb-internal-stride", lambda: ff.UserDBB(8, 16, stride=2, internal=12, nonlinear=nn.ReLU()),
     lambda d: _image(8, dtype=d), "DiverseBranchBlock", 1),
    ("dbb-depthwise", lambda: ff.UserDBB(8, 8, groups=8), lambda d: _image(8, dtype=d),
     "DiverseBranchBlock", 1),
    ("mobileone", lambda: ff.UserMobileOneBlock(8, 8, 3, padding=1, groups=8, num_conv_branches=3),
     lambda d: _image(8, dtype=d), "MobileOneBlock", 1),
    ("mobileone-1x1", lambda: ff.UserMobileOneBlock(8, 16, 1, num_conv_branches=2),
     lambda d: _image(8, dtype=d), "MobileOneBlock", 1),
    ("involution", lambda: ff.UserInvolution(32, 3, 1), lambda d: _image(32, dtype=d), "Involution",
     None),
    ("involution-stride", lambda: ff.UserInvolution(32, 5, 2), lambda d: _image(32, dtype=d),
     "Involution", None),
    ("involution-yolov5", lambda: ff.UserInvolutionV5(32, 3, 1), lambda d: _image(32, dtype=d),
     "Involution", None),
    ("involution-yolov5-stride", lambda: ff.UserInvolutionV5(32, 5, 2),
     lambda d: _image(32, dtype=d), "Involution", None),
    ("drconv", lambda: ff.UserDRConv2d(4, 6, 3, region_num=4, padding=1),
     lambda d: _image(4, dtype=d), "DRConv2d", None),
    ("asff-0", lambda: ff.UserASFF(0), lambda d: _levels((64, 32, 16), d), "ASFF", None),
    ("asff-2-rfb", lambda: ff.UserASFF(2, rfb=True), lambda d: _levels((64, 32, 16), d), "ASFF",
     None),
]  # fmt: skip


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _user_model(build) -> nn.Module:
    """The user's block inside a model, as it would sit in a YOLOv5 fork."""
    return ff.randomise_batchnorms(nn.Sequential(build()), seed=3).eval()


@pytest.mark.parametrize(("build", "inputs", "target", "convs"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])  # fmt: skip
def test_copy_is_adopted_and_fuses_to_the_same_function(build, inputs, target, convs):
    original = _user_model(build)
    model = copy.deepcopy(original)
    notes = adopt_foreign_blocks(model)

    assert [(n.path, n.adopted_as) for n in notes] == [("0", target)], notes
    assert type(model[0]).__name__ == target
    assert type(model[0]).__module__.startswith("reparam.")
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = inputs(dtype)
        reference = copy.deepcopy(original).to(dtype)
        with torch.no_grad():
            expected = reference(x)
            adopted = copy.deepcopy(model).to(dtype)(x)
            fused_model = reparam.fuse(copy.deepcopy(model).to(dtype))
            fused = fused_model(x)
        assert _relative(expected, adopted) <= tolerance
        assert _relative(expected, fused) <= tolerance
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused_model.modules())
        if convs is not None:
            assert sum(isinstance(m, nn.Conv2d) for m in fused_model.modules()) == convs


def test_adoption_keeps_dtype_device_training_state_and_rng():
    model = ff.randomise_batchnorms(nn.Sequential(ff.UserRepVGGBlock(8, 8))).to(torch.float64)
    model.train()
    state = torch.random.get_rng_state()
    adopt_foreign_blocks(model)
    assert torch.equal(state, torch.random.get_rng_state())  # construction used a forked RNG
    block = model[0]
    assert type(block).__name__ == "RepVGGBlock" and block.training
    assert block.rbr_dense.conv.weight.dtype == torch.float64


def test_shared_copy_is_replaced_at_every_path_by_one_block():
    shared = ff.UserACBlock(4, 4, 3, padding=1)
    model = ff.randomise_batchnorms(nn.Sequential(shared, nn.ReLU(), shared)).eval()
    notes = adopt_foreign_blocks(model)
    assert len(notes) == 1 and notes[0].adopted_as == "ACBlock"
    assert model[0] is model[2] and type(model[0]).__name__ == "ACBlock"


@pytest.mark.parametrize(
    ("build", "channels", "expected"),
    [
        (lambda: ff.UserACBlockHalfHorizontal(8, 8, 3, padding=1), 8, "relative error"),
        (lambda: ff.UserRepVGGActPerBranch(8, 8), 8, "relative error"),
        # The block as one seed prints it: every branch padded alike, so shapes clash.
        (lambda: ff.UserACBlock(8, 8, 3, padding=1, dilation=2), 8, "forward fails"),
        # An SE with another width than RepVGG's out_channels // 16.
        (
            lambda: ff.UserRepVGGBlock(16, 16, use_se=True, se_ratio=4),
            16,
            "state dict does not load",
        ),
    ],
    ids=["acb-scaled-branch", "repvgg-act-per-branch", "acb-dilated", "repvgg-se-width"],
)
def test_copy_that_differs_is_left_alone_with_a_reason(build, channels, expected):
    model = _user_model(build)
    foreign = model[0]
    notes = adopt_foreign_blocks(model)
    assert model[0] is foreign
    assert len(notes) == 1 and notes[0].adopted_as is None and notes[0].path == "0"
    assert expected in notes[0].reason
    assert notes[0].foreign_type.endswith(type(foreign).__qualname__)


def test_look_alikes_are_reported_and_plain_blocks_are_not():
    model = nn.Sequential(
        ff.UserTwoBranch(4), ff.UserResidual(4), ff.UserOwnDeploy(4), ff.UserConv(4, 4, 3)
    )
    model.append(nn.Sequential(ff.UserPartialACBlock(4)))
    notes = {n.path: n for n in adopt_foreign_blocks(model)}
    assert set(notes) == {"0", "2", "4.0"}
    assert "sums 2 convolution branches" in notes["0"].reason
    assert "switch_to_deploy" in notes["2"].reason
    assert "square_conv" in notes["4.0"].reason and "lacks hor_conv, hor_bn" in notes["4.0"].reason
    assert all(n.adopted_as is None for n in notes.values())


def _counts(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return convs, norms


def yolov5_style_model() -> nn.Module:
    """Conv(conv+BN+SiLU) layers with a user ACBlock copy and a user RepVGG copy in between."""
    return nn.Sequential(
        ff.UserConv(3, 16, 3, 2),
        ff.UserACBlock(16, 16, 3, padding=1),
        nn.SiLU(),
        ff.UserConv(16, 32, 3, 2),
        ff.UserRepVGGBlock(32, 32, act=nn.SiLU()),
        ff.UserACBlock(32, 32, 3, padding=1),
        ff.UserConv(32, 64, 1),
    )


def test_yolov5_style_user_model_fuses_fully():
    original = ff.randomise_batchnorms(yolov5_style_model(), seed=5).eval()
    # 3 Conv + 2 ACBlocks × 3 + RepVGG 2 convs; 3 + 6 + 3 BatchNorms (RepVGG has an identity BN)
    assert _counts(original) == (11, 12)

    model = copy.deepcopy(original)
    notes = adopt_foreign_blocks(model)
    assert [(n.path, n.adopted_as) for n in notes] == [
        ("1", "ACBlock"), ("4", "RepVGGBlock"), ("5", "ACBlock")
    ]  # fmt: skip
    fused = reparam.fuse(model)
    # Every BatchNorm folded; each ACBlock's three convs and RepVGG's two are one conv.
    assert _counts(fused) == (6, 0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = _image(3, 32, dtype)
        with torch.no_grad():
            expected = copy.deepcopy(original).to(dtype)(x)
            got = reparam.fuse(copy.deepcopy(model).to(dtype))(x)
        assert _relative(expected, got) <= tolerance


def test_fuse_adopts_user_copies_itself():
    original = ff.randomise_batchnorms(yolov5_style_model(), seed=6).eval()
    fused, report = reparam.fuse_with_report(original)
    assert _counts(fused) == (6, 0)
    assert len(report.adopted) == 3, report.adopted
    assert type(original[1]).__name__ == "UserACBlock"  # the user's model is untouched
    x = _image(3, 32)
    with torch.no_grad():
        assert _relative(original(x), fused(x)) <= 1e-5


def test_adoption_wins_over_the_copy_own_deploy_method_in_bfloat16():
    original = ff.randomise_batchnorms(nn.Sequential(ff.UserRepVGGWithBrokenDeploy(8, 8)))
    original = original.eval().to(torch.bfloat16)
    fused, report = reparam.fuse_with_report(original)
    assert report.adopted and fused[0].rbr_reparam.weight.dtype == torch.bfloat16
    x = _image(8)
    with torch.no_grad():
        expected = copy.deepcopy(original).float()(x)
        got = fused.float()(x)
    # bfloat16 weights rounded once: within a few bfloat16 ulps of the float32 evaluation.
    assert _relative(expected, got) <= 2e-2


def test_importing_adopt_registers_nothing():
    """Registration is explicit (reparam.builtins, called by fuse): importing the package has
    no side effect on the registries, so fusing cannot depend on what was imported."""
    import subprocess
    import sys

    code = "import reparam.adopt, reparam.fusers as f; print(len(f.pre_fuse_passes()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
