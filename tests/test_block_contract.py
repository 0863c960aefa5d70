"""The block protocol, checked once for every block in :mod:`reparam.blocks`.

Every :class:`~reparam.blocks.ReparamBlock` subclass must: build its deploy form directly
(so fused checkpoints load with strict keys), fuse exactly in float32 and float64, fuse
idempotently, round-trip its deploy state dict strictly, and train (finite gradients, a
step changes the weights). A new block without a case here fails ``test_every_block_has_a_case``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import reparam
from reparam import blocks
from reparam.blocks.qarepvgg import QARepVGGBlock
from reparam.compare import compare_outputs
from reparam.testing import randomize_batchnorm

ASFF_WIDTHS = (16, 8, 8)


@dataclass(frozen=True)
class BlockCase:
    """How to build one block in training and deploy form, and feed it."""

    block_type: type
    build: Callable[..., nn.Module]  # build(deploy: bool) -> block
    inputs: Callable[[torch.Generator], tuple]  # positional inputs of one forward call


def _image(channels: int, size: int = 9) -> Callable[[torch.Generator], tuple]:
    return lambda generator: (torch.randn(2, channels, size, size, generator=generator),)


def _octave_pair(generator: torch.Generator) -> tuple:
    high = torch.randn(2, 4, 10, 10, generator=generator)
    low = torch.randn(2, 4, 5, 5, generator=generator)
    return ((high, low),)


def _asff_levels(generator: torch.Generator) -> tuple:
    """(x2, x1, x0): level 0 (the widest) at 3x3, level 1 at 6x6, level 2 at 12x12."""
    maps = [
        torch.randn(2, ASFF_WIDTHS[level], 3 * 2**level, 3 * 2**level, generator=generator)
        for level in (2, 1, 0)
    ]
    return (maps,)


CASES = [
    BlockCase(blocks.ACBlock, lambda deploy: blocks.ACBlock(4, 6, 3, deploy=deploy), _image(4)),
    BlockCase(
        blocks.RepVGGBlock, lambda deploy: blocks.RepVGGBlock(6, 6, 3, deploy=deploy), _image(6)
    ),
    BlockCase(QARepVGGBlock, lambda deploy: QARepVGGBlock(6, 6, 3, deploy=deploy), _image(6)),
    BlockCase(
        blocks.DiverseBranchBlock,
        lambda deploy: blocks.DiverseBranchBlock(4, 6, 3, deploy=deploy),
        _image(4),
    ),
    BlockCase(
        blocks.MobileOneBlock,
        lambda deploy: blocks.MobileOneBlock(6, 6, 3, num_conv_branches=2, inference_mode=deploy),
        _image(6),
    ),
    BlockCase(
        blocks.HetConv,
        lambda deploy: blocks.HetConv(8, 8, 4, fuse_mode="dense", deploy=deploy),
        _image(8),
    ),
    BlockCase(
        blocks.OctaveConv,
        lambda deploy: blocks.OctaveConv(8, 8, 3, bias=True, deploy=deploy),
        _octave_pair,
    ),
    BlockCase(
        blocks.OctaveConvBN,
        lambda deploy: blocks.OctaveConvBN(8, 8, 3, deploy=deploy),
        _octave_pair,
    ),
    BlockCase(blocks.Conv, lambda deploy: blocks.Conv(4, 6, 3, deploy=deploy), _image(4)),
    BlockCase(
        blocks.ASFF,
        lambda deploy: blocks.ASFF(1, channels=ASFF_WIDTHS, deploy=deploy),
        _asff_levels,
    ),
    BlockCase(
        blocks.Involution, lambda deploy: blocks.Involution(16, 3, deploy=deploy), _image(16)
    ),
]
IDS = [case.block_type.__name__ for case in CASES]


def _trained_block(case: BlockCase, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    block = randomize_batchnorm(case.build(False), seed=1)
    return block.to(dtype).eval()


def _inputs(case: BlockCase, dtype: torch.dtype = torch.float32) -> tuple:
    def cast(value):
        if isinstance(value, Tensor):
            return value.to(dtype)
        return type(value)(cast(item) for item in value)

    return tuple(cast(value) for value in case.inputs(torch.Generator().manual_seed(2)))


def _max_rel(reference, candidate) -> float:
    return max(diff.max_rel for diff in compare_outputs(reference, candidate))


def test_every_block_has_a_case() -> None:
    exported = {
        value
        for value in vars(blocks).values()
        if isinstance(value, type)
        and issubclass(value, blocks.ReparamBlock)
        and value is not blocks.ReparamBlock
    }
    # Blocks whose export from reparam.blocks is pending are covered by their own module.
    assert exported | {QARepVGGBlock} == {case.block_type for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
def test_fuses_exactly(case: BlockCase, dtype: torch.dtype, rtol: float) -> None:
    block = _trained_block(case, dtype)
    inputs = _inputs(case, dtype)
    with torch.no_grad():
        reference = block(*inputs)
        fused = reparam.fuse(block)
        assert _max_rel(reference, fused(*inputs)) <= rtol
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fuse_is_idempotent(case: BlockCase) -> None:
    block = _trained_block(case)
    inputs = _inputs(case)
    fused = reparam.fuse(block)
    again = reparam.fuse(fused)
    assert fused.state_dict().keys() == again.state_dict().keys()
    with torch.no_grad():
        assert _max_rel(fused(*inputs), again(*inputs)) == 0.0
    fused.switch_to_deploy()  # a second conversion is a no-op
    assert fused.state_dict().keys() == again.state_dict().keys()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_deploy_constructor_loads_the_fused_state_dict_strictly(case: BlockCase) -> None:
    block = _trained_block(case)
    inputs = _inputs(case)
    fused = reparam.fuse(block)
    deployed = case.build(True).eval()
    expected = {key: value.shape for key, value in fused.state_dict().items()}
    assert {key: value.shape for key, value in deployed.state_dict().items()} == expected
    deployed.load_state_dict(copy.deepcopy(fused.state_dict()), strict=True)
    with torch.no_grad():
        assert _max_rel(fused(*inputs), deployed(*inputs)) == 0.0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_step_has_finite_gradients_and_moves_weights(case: BlockCase) -> None:
    torch.manual_seed(0)
    block = case.build(False).train()
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    outputs = block(*_inputs(case))
    tensors = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    loss = sum((t.square().mean() for t in tensors if t is not None), torch.zeros(()))
    loss.backward()
    grads = {name: p.grad for name, p in block.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values())
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    moved = [name for name, p in block.named_parameters() if not torch.equal(p, before[name])]
    assert moved
