"""The RepVGG, MobileOne and DBB bundled models: build, run, fuse exactly, load deploy forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam.convert import fuse
from reparam.models import create_model, get_model_info, list_models
from reparam.models.mobileone_nets import mobileone_s0, mobileone_tiny
from reparam.models.repvgg_nets import repvgg_a0, repvgg_tiny
from reparam.summary import model_stats
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

# (name, probe shape, classes): the ImageNet-size ones on one small image, to stay fast.
MODELS = [
    ("repvgg_tiny", (2, 3, 32, 32), 10),
    ("mobileone_tiny", (2, 3, 32, 32), 10),
    ("dbb_tiny", (2, 3, 11, 9), 10),
    ("repvgg_a0", (1, 3, 64, 64), 1000),
    ("mobileone_s0", (1, 3, 64, 64), 1000),
    ("dbb_resnet18", (1, 3, 32, 32), 1000),
]
TINY = [entry for entry in MODELS if entry[0].endswith("_tiny")]


def _probe(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize(("name", "shape", "classes"), MODELS, ids=[m[0] for m in MODELS])
def test_registered_builds_and_fuses_exactly(name, shape, classes):
    assert name in list_models()
    info = get_model_info(name)
    assert info.description and len(info.input_shapes) == 1 and info.input_shapes[0][1] == 3
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name), seed=1)
    fused, diffs = assert_fuses_exactly(model, _probe(shape), rtol=1e-5)
    assert diffs[0].shape == (shape[0], classes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert model_stats(fused).parameters < model_stats(model).parameters


@pytest.mark.parametrize(("name", "shape", "classes"), TINY, ids=[m[0] for m in TINY])
def test_tiny_models_fuse_exactly_in_float64(name, shape, classes):
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name), seed=2).double()
    assert_fuses_exactly(model, _probe(shape, torch.float64), rtol=1e-10)


@pytest.mark.parametrize(
    ("factory", "flag"),
    [(repvgg_tiny, "deploy"), (mobileone_tiny, "inference_mode")],
    ids=["repvgg_tiny", "mobileone_tiny"],
)
def test_deploy_constructor_loads_fused_state_dict_strictly(factory, flag):
    torch.manual_seed(0)
    model = randomize_batchnorm(factory(), seed=3).eval()
    fused = fuse(model)
    deployed = factory(**{flag: True})
    deployed.load_state_dict(fused.state_dict(), strict=True)
    x = _probe((2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(deployed.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_paper_sizes():
    """Deploy-form parameter counts of the published models: 8.31M (A0) and 2.08M (S0)."""
    with torch.device("meta"):
        a0, s0 = repvgg_a0(deploy=True), mobileone_s0(inference_mode=True)
    assert round(model_stats(a0).parameters / 1e6, 2) == 8.31
    assert round(model_stats(s0).parameters / 1e6, 2) == 2.08
    widths = [a0.stage0.out_channels] + [stage[0].out_channels for stage in a0.stages]
    assert widths == [48, 48, 96, 192, 1280]
    assert [1] + [len(stage) for stage in a0.stages] == [1, 2, 4, 14, 1]
    assert [len(stage) // 2 for stage in s0.stages] == [2, 8, 10, 1]


def test_training_step_changes_weights():
    torch.manual_seed(0)
    model = create_model("mobileone_tiny").train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(_probe((4, 3, 32, 32))), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed == len(before)
