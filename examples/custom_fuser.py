"""Register the fuser of your own block so that ``reparam.fuse`` converts it everywhere.

python examples/custom_fuser.py [--fast]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import reparam
from reparam.fusion import add_branches, centre_kernel
from reparam.module_fusion import conv_bn_kernel, make_conv
from reparam.testing import randomize_batchnorm


class CrossBlock(nn.Module):
    """A user's block: 3x3 conv-BN plus a 1x1 conv-BN, summed (RepVGG without identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))


@reparam.register_fuser(CrossBlock)
def fuse_cross_block(block: CrossBlock) -> nn.Conv2d:
    """W = W3' + centre(W1'), b = b3' + b1' (' marks the BN-folded kernels)."""
    kernel3, bias3 = conv_bn_kernel(block.conv3, block.bn3)
    kernel1, bias1 = conv_bn_kernel(block.conv1, block.bn1)
    kernel, bias = add_branches((kernel3, bias3), (centre_kernel(kernel1, 3), bias1))
    return make_conv(kernel, bias, padding=1)


def main(fast: bool = False) -> None:
    torch.manual_seed(0)
    channels = 4 if fast else 32
    model = nn.Sequential(CrossBlock(channels), nn.ReLU(), CrossBlock(channels))
    randomize_batchnorm(model).eval()
    fused, report = reparam.fuse_with_report(model)
    print(f"fused: {dict(report.blocks)}")
    assert report.blocks["CrossBlock"] == 2 and isinstance(fused[0], nn.Conv2d)
    x = torch.randn(2, channels, 16, 16)
    error = (fused(x) - model(x)).abs().max().item()
    print(f"max abs difference after fusing: {error:.2e}")
    assert error < 1e-4


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes, for tests")
    main(parser.parse_args().fast)
