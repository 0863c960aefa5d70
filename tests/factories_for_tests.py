"""Model factories the CLI tests name as ``MODULE:callable`` (imported in-process by the CLI).

pytest's default "prepend" import mode puts ``tests/`` on ``sys.path``, so this module is
importable as ``factories_for_tests``; use :data:`MODULE` to name it on a command line.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from reparam.blocks.acb import ACBlock

__all__ = ["MODULE", "pasted_repvgg_net", "small_net", "small_net_with_shapes", "untraceable_net"]

MODULE = __name__
"""The name under which this module was imported (what ``MODULE:callable`` must say)."""


def small_net(
    widths: Sequence[int] = (4,), num_classes: int = 3, kernel_size: int = 3
) -> nn.Module:
    """ACBlock per width, then a Conv-BN pair, pooled into a linear classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for width in widths:
        layers += [ACBlock(channels, width, kernel_size), nn.ReLU()]
        channels = width
    layers += [
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    ]
    return nn.Sequential(*layers)


def small_net_with_shapes(num_classes: int = 3) -> nn.Module:
    """:func:`small_net` announcing its probe input shape, so the CLI needs no ``-s``."""
    model = small_net(num_classes=num_classes)
    model.example_input_shapes = [(1, 3, 9, 7)]
    return model


class _Untraceable(nn.Module):
    """Conv→BN pairs that are attributes, not a Sequential, behind a branch on a size:
    torch.fx cannot trace it, so only a probe forward finds the pairs."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        y = self.bn1(self.conv1(x)).relu()
        if y.shape[-1] > 1:  # a branch on a size: no torch.fx trace (torch.export takes it)
            y = self.bn2(self.conv2(y))
        return self.head(y.mean((2, 3)))


def untraceable_net(width: int = 4) -> nn.Module:
    """:class:`_Untraceable`: what ``reparam fuse`` folds only with a probe input."""
    return _Untraceable(width)


def pasted_repvgg_net() -> nn.Module:
    """Two pasted copies of the published RepVGG block (adopted by fuse) and a head."""
    try:
        from fixtures_foreign import UserRepVGGBlock
    except ImportError:
        from tests.fixtures_foreign import UserRepVGGBlock

    return nn.Sequential(
        UserRepVGGBlock(3, 8), UserRepVGGBlock(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
