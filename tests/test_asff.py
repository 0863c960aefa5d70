"""ASFF (YOLOv5 variant): every level, multiplier, rfb and vis setting fuses exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks.asff import ASFF
from reparam.blocks.conv import Conv
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

SMALL = (32, 16, 8)  # level widths at multiplier 1, instead of (1024, 512, 256)
MATRIX = list(itertools.product((0, 1, 2), (0.5, 1), (False, True), (False, True)))


def _inputs(dims: tuple[int, int, int], size=(3, 2), batch: int = 2, seed: int = 0) -> list:
    """(x2, x1, x0): level 0 (x[2]) at ``size``, level 1 at twice it, level 2 at four times."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    return [
        torch.randn(batch, dims[level], height * 2**level, width * 2**level, generator=generator)
        for level in (2, 1, 0)
    ]


@pytest.mark.parametrize(
    ("level", "multiplier", "rfb", "vis"),
    MATRIX,
    ids=[
        f"level{lv}-x{m}-{'rfb' if r else 'norfb'}-{'vis' if v else 'out'}"
        for lv, m, r, v in MATRIX
    ],
)
def test_fuse_is_exact(level: int, multiplier: float, rfb: bool, vis: bool) -> None:
    torch.manual_seed(0)
    block = randomize_batchnorm(ASFF(level, multiplier, rfb, vis, channels=SMALL), seed=1)
    dims = tuple(int(c * multiplier) for c in SMALL)
    assert block.dim == dims
    x = _inputs(dims)
    fused, diffs = assert_fuses_exactly(block, x, rtol=1e-5)
    assert len(diffs) == (3 if vis else 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.deploy for m in fused.modules() if isinstance(m, Conv))
    out = fused(x)
    if vis:
        out, weights, fused_sum = out
        assert weights.shape[1] == 3
        torch.testing.assert_close(weights.sum(1), torch.ones_like(weights[:, 0]))
        assert fused_sum.shape == weights[:, 0].shape
    assert out.shape == x[2 - level].shape
    assert_fuses_exactly(block.double(), [t.double() for t in x], rtol=1e-10)


@pytest.mark.parametrize("multiplier", [0.5, 1])
def test_published_widths_at_tiny_sizes(multiplier: float) -> None:
    torch.manual_seed(0)
    block = randomize_batchnorm(ASFF(2, multiplier, rfb=True))
    dims = (int(1024 * multiplier), int(512 * multiplier), int(256 * multiplier))
    assert block.dim == dims and block.inter_dim == dims[2]
    assert block.compress_level_0.conv.in_channels == dims[0]
    assert block.weight_levels.conv.in_channels == 8 * 3
    assert_fuses_exactly(block, _inputs(dims, size=(2, 2), batch=1), rtol=1e-5)


@pytest.mark.parametrize(
    ("level", "children"),
    [
        (0, {"stride_level_1", "stride_level_2"}),
        (1, {"compress_level_0", "stride_level_2"}),
        (2, {"compress_level_0", "compress_level_1"}),
    ],
)
def test_module_names_follow_the_published_asffv5(level: int, children: set) -> None:
    block = ASFF(level, channels=SMALL)
    common = {"expand", "weight_level_0", "weight_level_1", "weight_level_2", "weight_levels"}
    assert {name for name, _ in block.named_children()} == children | common
    assert all(isinstance(m, Conv) for m in block.children())
    assert block.weight_levels.conv.in_channels == 16 * 3


@pytest.mark.parametrize("level", [0, 1, 2])
def test_deploy_constructor_loads_fused_state_dict_strictly(level: int) -> None:
    torch.manual_seed(0)
    block = randomize_batchnorm(ASFF(level, 0.5, channels=SMALL)).eval()
    fused = reparam.fuse(block)
    deployed = ASFF(level, 0.5, channels=SMALL, deploy=True)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = _inputs(block.dim)
    torch.testing.assert_close(deployed.eval()(x), block(x), rtol=1e-5, atol=1e-5)


def test_fuse_twice_is_a_no_op() -> None:
    block = randomize_batchnorm(ASFF(1, channels=SMALL))
    once, report = reparam.fuse_with_report(block)
    assert report.blocks["ASFF"] == 1
    assert report.details == ["<model> (ASFF): folded the BatchNorm of 7 Conv layers"]
    twice, report = reparam.fuse_with_report(once)
    assert not report.blocks
    for key, value in once.state_dict().items():
        assert torch.equal(value, twice.state_dict()[key])


def test_training_step_changes_weights() -> None:
    torch.manual_seed(0)
    block = ASFF(1, channels=SMALL)
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    block(_inputs(block.dim, size=(4, 4))).square().mean().backward()
    optimizer.step()
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), name


class Neck(nn.Module):
    """Three feature maps → ASFF at every level, inside a model: fused by ``reparam.fuse``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 4, 3)
        self.asff = nn.ModuleList(ASFF(level, 0.5, channels=SMALL) for level in range(3))

    def forward(self, x2, x1, x0):
        features = [self.stem(x2), x1, x0]
        return [asff(features) for asff in self.asff]


def test_asff_inside_a_model_fuses_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(Neck(), seed=5)
    x2, x1, x0 = _inputs((16, 8, 4), size=(2, 3))
    x2 = torch.randn(2, 3, *x2.shape[-2:])
    fused, _ = assert_fuses_exactly(model, x2, x1, x0, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="level must be 0, 1 or 2"):
        ASFF(3)
    with pytest.raises(ValueError, match="positive multiplier"):
        ASFF(0, multiplier=0, channels=SMALL)
    with pytest.raises(ValueError, match="leaves a level empty"):
        ASFF(0, multiplier=0.01, channels=SMALL)
    block = ASFF(1, channels=SMALL)
    with pytest.raises(TypeError, match="three feature maps"):
        block(torch.randn(1, 8, 4, 4))
    x = _inputs(block.dim, size=(2, 2))
    x[0] = x[0][..., :6, :6]  # level 2 no longer twice level 1
    with pytest.raises(ValueError, match="twice the size"):
        block(x)
