"""Randomised: small models with shape-dependent control flow, exported with dynamic H/W.

Each model is drawn from Conv/BN/ReLU/ReLU6/SiLU stages, a residual, and a branch on the
input's height or width at a random threshold or on H == W; it is fused and exported with a
dynamic batch, height and width, then run at three random sizes, some on the other side of
the branch. Every run is exact against the training-time model (1e-5 relative, float32) or
refused with one line naming the axis and its valid range or the axis it must equal; an
export the model cannot honour (a guard comparing two axes) is refused with one line
(issue 19, case 1).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from reparam.errors import ExportError, UserInputError
from reparam.export import export_onnx
from reparam.runtime import load
from reparam.testing import randomize_batchnorm

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU)


def stage(rng: random.Random, channels: int) -> nn.Module:
    kernel = rng.choice((1, 3))
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
        nn.BatchNorm2d(channels),
        rng.choice(ACTIVATIONS)(),
    )


class Branchy(nn.Module):
    """stem → (one branch or the other, chosen by a spatial size) → optional residual → head."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        channels = rng.choice((4, 8))
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.small, self.large = stage(rng, channels), stage(rng, channels)
        self.axis = rng.choice((-1, -2))
        self.threshold = rng.randint(12, 28)
        self.square = rng.random() < 0.3  # branch on H == W instead of a threshold
        self.residual = rng.random() < 0.5
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        y = self.stem(x)
        if self.square:
            z = self.large(y) if x.shape[2] == x.shape[3] else self.small(y)
        else:
            z = self.large(y) if x.shape[self.axis] > self.threshold else self.small(y)
        if self.residual:
            z = z + y
        return self.head(z.mean((2, 3)))


@pytest.mark.parametrize("seed", range(8))
def test_dynamic_hw_is_exact_or_refused_at_every_size(seed, tmp_path):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = Branchy(rng).eval()
    randomize_batchnorm(model, seed)
    example = (2, 3, rng.randint(8, 36), rng.randint(8, 36))
    path = tmp_path / "m.onnx"
    try:
        export_onnx(model, path, torch.randn(example), dynamic_hw=True)
    except ExportError as error:  # refused: one line, nothing written
        assert "\n" not in str(error)
        assert not path.exists()
        return
    session = load(path)
    checked = refused = 0
    for _ in range(3):
        shape = (rng.randint(1, 3), 3, rng.randint(6, 40), rng.randint(6, 40))
        x = torch.randn(shape)
        try:
            (got,) = session.run(x.numpy()).values()
        except UserInputError as error:
            message = str(error)
            assert "\n" not in message, message
            if model.square:  # W was traced tied to H
                assert "axis 3" in message and "equal to input" in message, message
            else:  # the branch's axis is the one refused, with its valid range
                axis = 4 + model.axis
                assert f"axis {axis} has size {shape[axis]}" in message, message
                assert "valid for sizes" in message, message
            refused += 1
            continue
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        checked += 1
    assert checked + refused == 3
