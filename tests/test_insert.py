"""convert_to_acblocks: plug ACBlocks into an existing network without changing its outputs."""

from __future__ import annotations

import torch
from torch import nn

import reparam
from reparam.blocks import ACBlock
from reparam.insert import convert_to_acblocks
from reparam.models import create_model
from reparam.testing import randomize_batchnorm


def test_resnet18_converts_every_3x3_pair_and_keeps_its_outputs():
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("resnet18", num_classes=10)).eval()
    converted, count = convert_to_acblocks(model)
    assert count == 17  # the 16 3x3 convs of the residual blocks and the 7x7 stem
    assert sum(isinstance(m, ACBlock) for m in converted.modules()) == 17
    assert converted.stem[0].block.kernel_size == 7
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(converted.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_converted_network_trains_then_fuses_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=2), nn.BatchNorm2d(8),
    )  # fmt: skip
    converted, count = convert_to_acblocks(model)
    assert count == 2 and isinstance(converted[0].block, ACBlock)
    assert converted[3].block.groups == 2
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted.train()
    for _ in range(3):
        optimizer.zero_grad()
        converted(torch.randn(4, 3, 12, 12)).square().mean().backward()
        optimizer.step()
    assert converted[0].block.ver_bn.weight.abs().sum() > 0  # the new branches learnt something
    converted.eval()
    fused = reparam.fuse(converted)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fused(x), converted(x), rtol=1e-5, atol=1e-5)


def test_1x1_and_even_or_asymmetric_kernels_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 2), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, (3, 1)), nn.BatchNorm2d(4),
    )  # fmt: skip
    converted, count = convert_to_acblocks(model)
    assert count == 0 and not any(isinstance(m, ACBlock) for m in converted.modules())
    assert isinstance(model[1], nn.BatchNorm2d)  # the input model is untouched
