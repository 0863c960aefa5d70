"""Published checkpoint layouts load as they are: RepVGG and MobileOne whole models (training
and deploy forms), recognised by their keys; blocks refuse the other form with advice.

The expected key lists are generated here from the structure of the published model code
(https://github.com/DingXiaoH/RepVGG/blob/main/repvgg.py and
https://github.com/apple/ml-mobileone/blob/main/mobileone.py), independently of reparam's
models: names, shapes, which blocks have an identity/skip BN, group maps, SE placement.
"""

from __future__ import annotations

import math

import pytest
import torch

import reparam
from reparam.blocks import MobileOneBlock, RepVGGBlock
from reparam.errors import UserInputError
from reparam.models import create_model, list_models
from reparam.models.weights import load_weights
from reparam.summary import model_stats
from reparam.testing import randomize_batchnorm

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (channels,)) for n in BN}


def _conv_bn(prefix, cin, cout, k, groups):
    return {f"{prefix}.conv.weight": (cout, cin // groups, k, k), **_bn(f"{prefix}.bn", cout)}


def _head(cin: int, classes: int) -> dict:
    return {"linear.weight": (classes, cin), "linear.bias": (classes,)}


def published_repvgg_keys(depths, a, b, group_layers=(), groups=1, deploy=False, classes=1000):
    """Key → shape of the published RepVGG (stage0 = layer 0, groups on ``group_layers``)."""
    widths = [min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b)]
    blocks = [("stage0", 3, widths[0], 2, 1)]
    cin, layer = widths[0], 1
    for stage, depth in enumerate(depths, 1):
        for i in range(depth):
            g = groups if layer in group_layers else 1
            blocks.append((f"stage{stage}.{i}", cin, widths[stage], 2 if i == 0 else 1, g))
            cin, layer = widths[stage], layer + 1
    keys = {}
    for name, cin, cout, stride, g in blocks:
        if deploy:
            keys[f"{name}.rbr_reparam.weight"] = (cout, cin // g, 3, 3)
            keys[f"{name}.rbr_reparam.bias"] = (cout,)
            continue
        keys |= _conv_bn(f"{name}.rbr_dense", cin, cout, 3, g)
        keys |= _conv_bn(f"{name}.rbr_1x1", cin, cout, 1, g)
        if cin == cout and stride == 1:
            keys |= _bn(f"{name}.rbr_identity", cin)
    return keys | _head(widths[4], classes)


def published_mobileone_keys(mult, branches, use_se, deploy=False, classes=1000):
    """Key → shape of the published MobileOne (depths 2, 8, 10, 1; SE in stages 3–4)."""
    depths = (2, 8, 10, 1)
    widths = [min(64, int(64 * mult[0]))] + [
        int(c * m) for c, m in zip((64, 128, 256, 512), mult, strict=True)
    ]
    se_pairs = (0, 0, 5, 1) if use_se else (0, 0, 0, 0)
    blocks = [("stage0", 3, widths[0], 3, 2, 1, 1, False)]
    cin = widths[0]
    for stage, depth in enumerate(depths, 1):
        for i in range(depth):
            se = i >= depth - se_pairs[stage - 1]
            stride = 2 if i == 0 else 1
            blocks.append((f"stage{stage}.{2 * i}", cin, cin, 3, stride, cin, branches, se))
            blocks.append((f"stage{stage}.{2 * i + 1}", cin, widths[stage], 1, 1, 1, branches, se))
            cin = widths[stage]
    keys = {}
    for name, cin, cout, k, stride, g, n, se in blocks:
        if deploy:
            keys[f"{name}.reparam_conv.weight"] = (cout, cin // g, k, k)
            keys[f"{name}.reparam_conv.bias"] = (cout,)
        else:
            if cin == cout and stride == 1:
                keys |= _bn(f"{name}.rbr_skip", cin)
            for i in range(n):
                keys |= _conv_bn(f"{name}.rbr_conv.{i}", cin, cout, k, g)
            if k > 1:
                keys |= _conv_bn(f"{name}.rbr_scale", cin, cout, 1, g)
        if se:
            hidden = int(cout * 0.0625)
            keys[f"{name}.se.reduce.weight"] = (hidden, cout, 1, 1)
            keys[f"{name}.se.reduce.bias"] = (hidden,)
            keys[f"{name}.se.expand.weight"] = (cout, hidden, 1, 1)
            keys[f"{name}.se.expand.bias"] = (cout,)
    return keys | _head(widths[4], classes)


A, B, EVEN = (2, 4, 14, 1), (4, 6, 16, 1), tuple(range(2, 27, 2))
# name: (key-generator arguments, published (train, deploy) parameters in millions or None).
REPVGG = {
    "a0": ((A, 0.75, 2.5), (9.11, 8.30)),
    "a1": ((A, 1, 2.5), (14.09, 12.78)),
    "a2": ((A, 1.5, 2.75), (28.21, 25.49)),
    "b0": ((B, 1, 2.5), (15.82, 14.33)),
    "b1": ((B, 2, 4), (57.42, 51.82)),
    "b1g2": ((B, 2, 4, EVEN, 2), (45.78, 41.36)),
    "b1g4": ((B, 2, 4, EVEN, 4), (39.97, 36.12)),
    "b2": ((B, 2.5, 5), (89.02, 80.31)),
    "b2g4": ((B, 2.5, 5, EVEN, 4), (61.76, 55.77)),
    "b3": ((B, 3, 5), (123.09, 110.96)),
}
# name: ((width multipliers, branches, SE), published deploy parameters in millions).
MOBILEONE = {
    "s0": (((0.75, 1, 1, 2), 4, False), 2.1),
    "s1": (((1.5, 1.5, 2, 2.5), 1, False), 4.8),
    "s2": (((1.5, 2, 2.5, 4), 1, False), 7.8),
    "s3": (((2, 2.5, 3, 4), 1, False), 10.1),
    "s4": (((3, 3.5, 3.5, 4), 1, True), 14.8),
}


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta(name: str, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _millions(model, digits=2) -> float:
    """Parameters in millions, truncated as the papers' tables print them."""
    return math.floor(model_stats(model).parameters / 10 ** (6 - digits)) / 10**digits


@pytest.mark.parametrize("variant", list(REPVGG))
def test_repvgg_variants_have_the_published_keys_and_sizes(variant):
    args, (train_m, deploy_m) = REPVGG[variant]
    train, deploy = _meta(f"repvgg_{variant}"), _meta(f"repvgg_{variant}", deploy=True)
    assert _shapes(train) == published_repvgg_keys(*args)
    assert _shapes(deploy) == published_repvgg_keys(*args, deploy=True)
    assert _millions(deploy) == deploy_m
    assert abs(model_stats(train).parameters / 1e6 - train_m) < 0.006


@pytest.mark.parametrize("variant", list(MOBILEONE))
def test_mobileone_variants_have_the_published_keys_and_sizes(variant):
    args, deploy_m = MOBILEONE[variant]
    train, deploy = (
        _meta(f"mobileone_{variant}"),
        _meta(f"mobileone_{variant}", inference_mode=True),
    )
    assert _shapes(train) == published_mobileone_keys(*args)
    assert _shapes(deploy) == published_mobileone_keys(*args, deploy=True)
    assert round(model_stats(deploy).parameters / 1e6, 1) == deploy_m


def test_every_published_variant_is_registered():
    names = set(list_models())
    assert {f"repvgg_{v}" for v in REPVGG} | {f"mobileone_{v}" for v in MOBILEONE} <= names
    # The S0 published sizes: 5.29M parameters in training form, 2.08M fused.
    assert round(model_stats(_meta("mobileone_s0")).parameters / 1e6, 2) == 5.29


def _random_state(keys: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint as the published code would save it: random weights, BN statistics
    with γ ≈ 1 and variance in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var") or (
            key.endswith("weight") and (".bn." in key or "rbr_identity" in key or "rbr_skip" in key)
        ):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("repvgg_a0", lambda deploy: published_repvgg_keys(A, 0.75, 2.5, deploy=deploy)),
        (
            "mobileone_s0",
            lambda deploy: published_mobileone_keys((0.75, 1, 1, 2), 4, False, deploy=deploy),
        ),
    ],
    ids=["repvgg_a0", "mobileone_s0"],
)
def test_published_training_and_deploy_checkpoints_load(name, keys, dtype):
    """A training checkpoint loads into the model; the deploy checkpoint made from it loads
    into the deploy form, recognised by its keys; both compute the same."""
    trained = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in _random_state(keys(False), seed=0).items()
    }
    model, form = load_weights(create_model(name).to(dtype), trained, "train.pth")
    assert form == "training"
    model = model.eval()
    deployed_state = reparam.fuse(model).state_dict()
    assert set(deployed_state) == set(keys(True))
    deployed, form = load_weights(create_model(name).to(dtype), deployed_state, "deploy.pth")
    assert form == "deploy"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        expected, got = model(x), deployed(x)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-10)


def test_mismatched_checkpoints_name_the_keys():
    trained = randomize_batchnorm(create_model("repvgg_tiny"), seed=0).eval()
    state = reparam.fuse(trained).state_dict()
    state.pop("linear.bias")
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(UserInputError, match=r"looks like a deploy checkpoint") as info:
        load_weights(create_model("repvgg_tiny"), state, "ckpt.pth")
    assert "1 missing (e.g. linear.bias)" in str(info.value)
    assert "1 unexpected (e.g. head.weight)" in str(info.value)
    training = trained.state_dict()
    del training["stage0.rbr_dense.conv.weight"]
    with pytest.raises(UserInputError, match=r"closest: the training form\): 1 missing") as info:
        load_weights(create_model("repvgg_tiny"), training, "ckpt.pth")
    assert "deploy checkpoint" not in str(info.value)
    wrong = trained.state_dict() | {"linear.bias": torch.zeros(3)}
    with pytest.raises(UserInputError, match=r"linear.bias has shape \(3,\), the model expects"):
        load_weights(create_model("repvgg_tiny"), wrong, "ckpt.pth")


@pytest.mark.parametrize(
    ("cls", "flag", "deploy_key"),
    [(RepVGGBlock, "deploy", "rbr_reparam"), (MobileOneBlock, "inference_mode", "reparam_conv")],
)
def test_blocks_say_which_form_to_build(cls, flag, deploy_key):
    block = randomize_batchnorm(cls(8, 8, 3), seed=0).eval()
    fused = reparam.fuse(block).state_dict()
    assert any(key.startswith(deploy_key) for key in fused)
    with pytest.raises(UserInputError, match=rf"training form.*{flag}=True.*fuse it first"):
        cls(8, 8, 3).load_state_dict(fused)
    with pytest.raises(UserInputError, match=rf"deploy form.*{flag}=False"):
        cls(8, 8, 3, **{flag: True}).load_state_dict(block.state_dict())
    deployed = cls(8, 8, 3, **{flag: True})
    deployed.load_state_dict(fused)  # the right form still loads strictly
