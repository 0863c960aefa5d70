"""The block suite: each block's training form (eval) vs its fused form vs a plain conv.

A plain conv of the fused conv's shape, followed by what the fused block keeps after its
conv, is the physical limit: a fused block cannot beat the conv it becomes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reparam.bench.timing import Timing, time_candidates
from reparam.blocks.acb import ACBlock
from reparam.blocks.conv import Conv
from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.mobileone import MobileOneBlock
from reparam.blocks.repvgg import RepVGGBlock
from reparam.compare import compare_outputs
from reparam.convert import fuse
from reparam.errors import UserInputError
from reparam.summary import model_stats
from reparam.testing import randomize_batchnorm

__all__ = ["BlockResult", "BlockSpec", "bench_blocks", "block_specs", "list_blocks", "select"]


@dataclass(frozen=True)
class BlockSpec:
    """A block to benchmark: its training-time form and the plain layer it fuses into.

    ``build(channels)`` returns the training-time block; ``plain(channels)`` a plain
    ``nn.Conv2d`` of the fused conv's shape followed by whatever the fused block keeps after
    its conv (an activation), i.e. the fastest the fused block could possibly be.
    """

    name: str
    build: Callable[[int], nn.Module]
    plain: Callable[[int], nn.Module]
    description: str


def _conv(channels: int, kernel_size: int, groups: int = 1, act: nn.Module | None = None):
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups)
    return nn.Sequential(conv, act) if act is not None else conv


def block_specs() -> list[BlockSpec]:
    """Every block the suite knows, in report order."""
    return [
        BlockSpec(
            "ACBlock",
            lambda c: ACBlock(c, c, 3),
            lambda c: _conv(c, 3),
            "3x3 + 3x1 + 1x3 conv-BN",
        ),
        BlockSpec(
            "RepVGGBlock",
            lambda c: RepVGGBlock(c, c, 3),
            lambda c: _conv(c, 3, act=nn.ReLU()),
            "3x3 + 1x1 conv-BN + BN identity, ReLU",
        ),
        BlockSpec(
            "DiverseBranchBlock",
            lambda c: DiverseBranchBlock(c, c, 3),
            lambda c: _conv(c, 3),
            "3x3, 1x1, 1x1→3x3, 1x1→avg branches",
        ),
        BlockSpec(
            "MobileOneBlock dw",
            lambda c: MobileOneBlock(c, c, 3, groups=c, num_conv_branches=4),
            lambda c: _conv(c, 3, groups=c, act=nn.ReLU()),
            "depthwise, 4 × 3x3 + 1x1 conv-BN + BN skip, ReLU",
        ),
        BlockSpec(
            "MobileOneBlock pw",
            lambda c: MobileOneBlock(c, c, 1, num_conv_branches=4),
            lambda c: _conv(c, 1, act=nn.ReLU()),
            "pointwise, 4 × 1x1 conv-BN + BN skip, ReLU",
        ),
        BlockSpec(
            "Conv (YOLOv5)",
            lambda c: Conv(c, c, 3),
            lambda c: _conv(c, 3, act=nn.SiLU()),
            "3x3 conv-BN-SiLU",
        ),
    ]


def list_blocks() -> list[str]:
    """Names of the blocks :func:`bench_blocks` knows."""
    return [spec.name for spec in block_specs()]


def select(names: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """``names`` checked against ``known`` (all of ``known`` for None).

    Raises:
        UserInputError: a name not in ``known``, with the choices.
    """
    if names is None:
        return list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserInputError(
            f"unknown {what} {', '.join(repr(n) for n in unknown)}; choose from {', '.join(known)}"
        )
    return list(names)


@dataclass
class BlockResult:
    """One block's training-time, fused and plain-conv timings on one input shape."""

    name: str
    description: str
    shape: tuple[int, ...]
    train: Timing
    fused: Timing
    plain: Timing
    max_rel: float
    params_train: int
    params_fused: int

    @property
    def fused_vs_plain(self) -> float:
        return self.fused.median / self.plain.median

    @property
    def speedup(self) -> float:
        return self.train.median / self.fused.median

    @property
    def spread(self) -> float:
        """The largest spread of the row's timings."""
        return max(t.spread for t in (self.train, self.fused, self.plain))


def bench_blocks(
    names: Sequence[str] | None = None,
    *,
    batch: int = 8,
    channels: int = 64,
    size: int = 56,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> list[BlockResult]:
    """Time each block's training-time form (eval), fused form and a plain conv, interleaved.

    Args:
        names: blocks to run (see :func:`list_blocks`); default all.
        batch, channels, size: the input is batch × channels × size × size; the blocks map
            channels to channels at stride 1.
        repeats, warmup: rounds per comparison (see :func:`time_candidates`).
        seed: for weights, BN statistics and the input.

    Raises:
        UserInputError: an unknown block name.
    """
    specs = {spec.name: spec for spec in block_specs()}
    shape = (batch, channels, size, size)
    return [
        _bench_block(specs[name], shape, repeats, warmup, seed)
        for name in select(names, list(specs), "block")
    ]


def _bench_block(
    spec: BlockSpec, shape: tuple[int, ...], repeats: int, warmup: int, seed: int
) -> BlockResult:
    channels = shape[1]
    torch.manual_seed(seed)
    block = randomize_batchnorm(spec.build(channels), seed).eval()
    fused = fuse(block)
    plain = spec.plain(channels).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        max_rel = max(d.max_rel for d in compare_outputs(block(x), fused(x)))
    timings = time_candidates(
        {"train": lambda: block(x), "fused": lambda: fused(x), "plain": lambda: plain(x)},
        repeats=repeats,
        warmup=warmup,
    )
    return BlockResult(
        name=spec.name,
        description=spec.description,
        shape=shape,
        train=timings["train"],
        fused=timings["fused"],
        plain=timings["plain"],
        max_rel=max_rel,
        params_train=model_stats(block).parameters,
        params_fused=model_stats(fused).parameters,
    )
