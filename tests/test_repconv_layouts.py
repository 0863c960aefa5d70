"""The YOLO family's reparameterized blocks are adopted and fuse exactly (issue 22 items 3, 4):
YOLOv6 RepVGGBlock and QARepVGGBlock, YOLOv7 RepConv, ultralytics RepConv."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.adopt import adopt_foreign_blocks

try:
    import fixtures_foreign as ff
    import fixtures_yolo as fy
except ImportError:  # run from the repository root without tests/ on sys.path
    from tests import fixtures_foreign as ff
    from tests import fixtures_yolo as fy


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


# (id, builder, input channels, reparam class name)
CASES = [
    ("yolov6-repvgg", lambda: fy.YOLOv6RepVGGBlock(8, 8), 8, "RepVGGBlock"),
    ("yolov6-repvgg-stride", lambda: fy.YOLOv6RepVGGBlock(8, 16, stride=2), 8, "RepVGGBlock"),
    ("yolov6-qarepvgg", lambda: fy.YOLOv6QARepVGGBlock(8, 8), 8, "QARepVGGBlock"),
    ("yolov6-qarepvgg-stride", lambda: fy.YOLOv6QARepVGGBlock(8, 16, stride=2), 8,
     "QARepVGGBlock"),
    ("yolov6-qarepvgg-groups", lambda: fy.YOLOv6QARepVGGBlock(8, 8, groups=4), 8,
     "QARepVGGBlock"),
    ("yolov7-repconv", lambda: fy.YOLOv7RepConv(8, 8), 8, "RepVGGBlock"),
    ("yolov7-repconv-stride", lambda: fy.YOLOv7RepConv(8, 16, s=2), 8, "RepVGGBlock"),
    ("yolov7-repconv-groups-relu", lambda: fy.YOLOv7RepConv(8, 8, g=2, act=nn.ReLU()), 8,
     "RepVGGBlock"),
    ("ultralytics-repconv", lambda: fy.UltralyticsRepConv(8, 8), 8, "RepVGGBlock"),
    ("ultralytics-repconv-bn", lambda: fy.UltralyticsRepConv(8, 8, bn=True), 8, "RepVGGBlock"),
    ("ultralytics-repconv-stride", lambda: fy.UltralyticsRepConv(8, 16, s=2, bn=True), 8,
     "RepVGGBlock"),
]  # fmt: skip


def _user_model(build) -> nn.Module:
    torch.manual_seed(0)
    return ff.randomise_batchnorms(nn.Sequential(build()), seed=7).eval()


@pytest.mark.parametrize(("build", "channels", "target"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_yolo_block_is_adopted_and_fuses_exactly(build, channels, target):
    original = _user_model(build)
    model = copy.deepcopy(original)
    notes = adopt_foreign_blocks(model)
    assert [(n.path, n.adopted_as) for n in notes] == [("0", target)], notes
    assert type(model[0]).__module__.startswith("reparam.")
    generator = torch.Generator().manual_seed(3)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = 3 * torch.randn(2, channels, 13, 10, generator=generator, dtype=dtype)
        with torch.no_grad():
            expected = copy.deepcopy(original).to(dtype)(x)
            fused = reparam.fuse(copy.deepcopy(model).to(dtype))
            assert _relative(expected, fused(x)) <= tolerance
        assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_fuse_adopts_every_yolo_layout_in_one_model():
    original = _user_model(
        lambda: nn.Sequential(
            fy.UltralyticsConv(3, 8, 3, 2),
            fy.YOLOv6QARepVGGBlock(8, 8),
            fy.YOLOv7RepConv(8, 8),
            fy.UltralyticsRepConv(8, 16, s=2),
            fy.YOLOv6RepVGGBlock(16, 16),
        )
    )
    fused, report = reparam.fuse_with_report(original)
    assert len(report.adopted) == 4, report.adopted
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 5
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        assert _relative(original(x), fused(x)) <= 1e-5


def test_bottleneck_with_repconv_names_is_left_alone_silently():
    """conv1 → conv2 in sequence with activations has RepConv's names but not its layout."""
    model = _user_model(lambda: fy.UltralyticsBottleneck(8))
    foreign = model[0]
    assert adopt_foreign_blocks(model) == []
    assert model[0] is foreign


def test_qarepvgg_copy_with_a_1x1_bias_is_adopted_with_it():
    block = fy.YOLOv6QARepVGGBlock(8, 8)
    block.rbr_1x1 = nn.Conv2d(8, 8, 1, bias=True)
    original = _user_model(lambda: block)
    model = copy.deepcopy(original)
    notes = adopt_foreign_blocks(model)
    assert [n.adopted_as for n in notes] == ["QARepVGGBlock"]
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = original.double()(x)
        assert _relative(expected, reparam.fuse(model.double())(x)) <= 1e-12


def test_qarepvgg_copy_with_a_1x1_bn_is_refused_with_the_key():
    block = fy.YOLOv6QARepVGGBlock(8, 8)
    block.rbr_1x1 = nn.Conv2d(8, 8, 1, bias=False)
    block.rbr_1x1.bn = nn.BatchNorm2d(8)  # a stray submodule: its keys have no place
    notes = adopt_foreign_blocks(_user_model(lambda: block))
    assert [n.adopted_as for n in notes] == [None]
    assert "unexpected rbr_1x1.bn." in notes[0].reason


def test_yolov7_repconv_keys_are_renamed_not_lost():
    original = _user_model(lambda: fy.YOLOv7RepConv(8, 8))
    model = copy.deepcopy(original)
    adopt_foreign_blocks(model)
    ours = model[0].state_dict()
    theirs = original[0].state_dict()
    assert torch.equal(ours["rbr_dense.conv.weight"], theirs["rbr_dense.0.weight"])
    assert torch.equal(ours["rbr_1x1.bn.running_var"], theirs["rbr_1x1.1.running_var"])
    assert torch.equal(ours["rbr_identity.weight"], theirs["rbr_identity.weight"])
