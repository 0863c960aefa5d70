"""A network mixing every fusable block with plain Conv-BN pairs, fused in one call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam import blocks
from reparam.blocks.base import ReparamBlock
from reparam.cli.fuse_cmd import render_report
from reparam.summary import fuse_and_check
from reparam.testing import randomize_batchnorm

WIDTH = 8


class Everything(nn.Module):
    """stem Conv-BN → ACBlock → RepVGG → DBB → MobileOne → HetConv ×2 → octave chain →
    three scales (YOLOv5 Conv) → ASFF → Conv-BN head."""

    def __init__(self):
        super().__init__()
        w = WIDTH
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.body = nn.Sequential(
            blocks.ACBlock(w, w, 3),
            blocks.RepVGGBlock(w, w, 3),
            blocks.DiverseBranchBlock(w, w, 3),
            blocks.MobileOneBlock(w, w, 3, num_conv_branches=2),
            blocks.HetConv(w, w, 2, fuse_mode="dense"),
            nn.ReLU(),
            blocks.HetConv(w, w, 4, fuse_mode="separate"),
        )
        self.octave_first = blocks.OctaveConvBN(w, w, 3, alpha_in=0, alpha_out=0.5)
        self.octave_mid = blocks.OctaveConvBN(w, w, 3, alpha_in=0.5, alpha_out=0.5)
        self.octave_last = blocks.OctaveConvBN(w, w, 3, alpha_in=0.5, alpha_out=0)
        self.down1 = blocks.Conv(w, 2 * w, 3, 2)
        self.down2 = blocks.Conv(2 * w, 4 * w, 3, 2)
        self.asff = blocks.ASFF(level=1, channels=(4 * w, 2 * w, w))
        self.head_conv = nn.Conv2d(2 * w, 4, 1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.body(self.stem(x))
        x = self.octave_last(self.octave_mid(self.octave_first(x)))
        level1 = self.down1(x)
        level0 = self.down2(level1)
        return self.head_bn(self.head_conv(self.asff([x, level1, level0])))


def everything(dtype: torch.dtype) -> Everything:
    torch.manual_seed(0)
    return randomize_batchnorm(Everything()).to(dtype).eval()


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
def test_everything_fuses_exactly_with_no_batchnorm_or_branches_left(dtype, rtol):
    model = everything(dtype)
    run = fuse_and_check(model, [torch.randn(2, 3, 16, 12, dtype=dtype)])
    assert run.max_rel <= rtol
    fused = run.fused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.deploy for m in fused.modules() if isinstance(m, ReparamBlock))
    for name in ("square_conv", "rbr_dense", "dbb_origin", "rbr_conv", "bn_h", "bn_l"):
        assert not any(hasattr(m, name) for m in fused.modules()), name
    kept = fused.body[6]
    assert hasattr(kept, "gwc") and hasattr(kept, "pwc")  # HetConv forced to stay 2 convs
    assert hasattr(fused.body[4], "fused_conv")


def test_fuse_report_names_every_block_type():
    run = fuse_and_check(everything(torch.float32), [torch.randn(1, 3, 16, 12)])
    assert run.report.blocks == {
        "ACBlock": 1,
        "RepVGGBlock": 1,
        "DiverseBranchBlock": 1,
        "MobileOneBlock": 1,
        "HetConv": 2,
        "OctaveConvBN": 3,
        "Conv": 2,  # the two downsampling Convs
        "ASFF": 1,  # folds its own seven Convs
        "Conv+BatchNorm": 2,  # stem (Sequential) and head (found by tracing)
    }
    text = render_report("everything", [(1, 3, 16, 12)], run)
    for kind, count in run.report.blocks.items():
        assert any(line.split() == [*kind.split(), str(count)] for line in text.splitlines())
    assert "kept 2 convs" in text or "separate" in text
    assert "folded the BatchNorm of 7 Conv layers" in text


def test_fusing_everything_twice_changes_nothing():
    once = reparam.fuse(everything(torch.float32))
    twice, report = reparam.fuse_with_report(once)
    assert not report.blocks
    assert all(torch.equal(v, twice.state_dict()[k]) for k, v in once.state_dict().items())
