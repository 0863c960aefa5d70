"""Randomized fuse test (issue 19, Tests): small models from Conv/BN/Linear/ReLU/ReLU6/SiLU,
branches, shape- and data-dependent control flow, taps, pasted-layout blocks and deploy
methods, fused with and without example inputs. Each fused model must equal the original
(eval mode) at three input shapes and at several magnitudes and signs, in float32 (≤ 1e-5
relative) and float64, or the fuse must refuse with one line (a ReparamError).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import reparam
from reparam.compare import compare_outputs
from reparam.errors import ReparamError
from reparam.testing import randomize_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_foreign import UserACBlock, randomise_batchnorms

SHAPES = ((2, 3, 12, 12), (1, 3, 9, 14), (3, 3, 16, 7))
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def conv_bn(rng: random.Random, c_in: int, c_out: int) -> nn.Sequential:
    k = rng.choice((1, 3))
    groups = rng.choice([g for g in (1, 2) if c_in % g == 0 and c_out % g == 0])
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=rng.random() < 0.5),
        nn.BatchNorm2d(c_out),
    )


class Branch(nn.Module):
    """Two conv-BN paths of one input, summed."""

    def __init__(self, rng, c):
        super().__init__()
        self.a, self.b = conv_bn(rng, c, c), conv_bn(rng, c, c)

    def forward(self, x):
        return self.a(x) + self.b(x)


class ShapeIf(nn.Module):
    """Branches on the input width: fx cannot trace it; both sides hold a pair."""

    def __init__(self, rng, c):
        super().__init__()
        self.wide, self.narrow = conv_bn(rng, c, c), conv_bn(rng, c, c)

    def forward(self, x):
        return self.wide(x) if x.shape[-1] > 10 else self.narrow(x)


class DataIf(nn.Module):
    """Data-dependent control flow around an attribute pair."""

    def __init__(self, rng, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.mean() > -1e30 else -y


class Tap(nn.Module):
    """The conv output is read beside the BatchNorm: not a pair."""

    def __init__(self, rng, c):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        raw = self.seq[0](x)
        return self.seq[1](raw) + 0.5 * raw


class ReLU6Swap(nn.Module):
    """A deploy method that changes the function above 6."""

    def __init__(self, rng, c):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 1), nn.ReLU6()

    def forward(self, x):
        return self.act(self.conv(x))

    def switch_to_deploy(self):
        self.act = nn.ReLU()


class Head(nn.Module):
    """Global mean, then Linear→BatchNorm1d."""

    def __init__(self, rng, c):
        super().__init__()
        self.fc, self.bn = nn.Linear(c, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x.mean((2, 3))))


def build(seed: int) -> nn.Module:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c, layers = 4, []
    layers.append(conv_bn(rng, 3, c))
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(
            ("conv_bn", "act", "branch", "shape_if", "data_if", "tap", "acb", "swap", "bn")
        )
        if kind == "conv_bn":
            layers.append(conv_bn(rng, c, c))
        elif kind == "act":
            layers.append(rng.choice((nn.ReLU, nn.ReLU6, nn.SiLU))())
        elif kind == "acb":
            layers.append(UserACBlock(c, c, 3, padding=1))
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c))
        else:
            cls = {"branch": Branch, "shape_if": ShapeIf, "data_if": DataIf, "tap": Tap,
                   "swap": ReLU6Swap}[kind]  # fmt: skip
            layers.append(cls(rng, c))
    if rng.random() < 0.5:
        layers.append(Head(rng, c))
    model = nn.Sequential(*layers)
    randomise_batchnorms(model, seed)
    return randomize_batchnorm(model).eval()


@pytest.mark.parametrize("seed", range(24))
def test_random_model_is_exact_or_refused(seed):
    dtype = torch.float64 if seed % 3 == 0 else torch.float32
    model = build(seed).to(dtype)
    rng = random.Random(seed + 1000)
    example = torch.randn(rng.choice(SHAPES), dtype=dtype) if seed % 2 else None
    try:
        fused, report = reparam.fuse_with_report(model, example_inputs=example)
    except ReparamError as error:  # refused: one clear line
        assert "\n" not in str(error) and str(error)
        return
    torch.manual_seed(seed)
    with torch.no_grad():
        for shape in SHAPES:
            for scale in (1.0, -0.01, 30.0):
                x = scale * torch.randn(shape, dtype=dtype)
                (diff,) = compare_outputs(model(x), fused(x))
                assert diff.within(RTOL[dtype]), (seed, shape, scale, diff, str(report))
    # never silent: every BatchNorm left is in the report
    listed = {path for path, _ in report.not_fused}
    for path, module in fused.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert path in listed or any(path.startswith(f"{p}.") for p in listed), (path, listed)
