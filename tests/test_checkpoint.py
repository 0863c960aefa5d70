"""Checkpoint IO: reading training checkpoints safely, the fused-checkpoint round trip, and
atomic output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import reparam
from reparam._io import atomic_write
from reparam.checkpoint import (
    FORMAT_VERSION,
    ModelSpec,
    apply_state_dict,
    build_model,
    is_fused_checkpoint,
    load,
    load_state_dict_file,
    save_fused,
)
from reparam.errors import FusionError, UnsafeInputError, UserInputError
from reparam.models import create_model
from reparam.testing import randomize_batchnorm

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    import factories_for_tests as factories
except ImportError:  # tests/ became a package
    from tests import factories_for_tests as factories

TINY_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """acnet_tiny (width 8) with seeded weights and randomised BN statistics."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("acnet_tiny", width=8)
    return randomize_batchnorm(model, seed=3).eval()


def probe(dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = TINY_SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------- fused round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_save_fused_then_load_round_trips(tiny: nn.Module, tmp_path: Path, dtype: torch.dtype):
    fused = reparam.fuse(tiny).to(dtype)
    spec = ModelSpec("acnet_tiny", {"width": 8})
    path = save_fused(fused, tmp_path / "fused.pt", spec, input_shapes=[TINY_SHAPE])
    assert path == tmp_path / "fused.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pt"]

    loaded = load(path)
    assert not loaded.training
    assert loaded.reparam_spec == spec
    assert loaded.reparam_input_shapes == [TINY_SHAPE]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    expected, actual = fused.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key
    assert torch.equal(run(loaded, probe(dtype)), run(fused, probe(dtype)))


def test_round_trip_of_a_factory_model_with_kwargs(tmp_path: Path):
    spec = ModelSpec(f"{factories.MODULE}:small_net", {"widths": [4, 6], "num_classes": 5})
    with torch.random.fork_rng():
        torch.manual_seed(1)
        fused = reparam.fuse(randomize_batchnorm(build_model(spec), seed=4))
    save_fused(fused, tmp_path / "small.pt", spec, input_shapes=[(2, 3, 11, 9)])
    # A factory recorded in a file is imported only when the caller names it or trusts code.
    with pytest.raises(UnsafeInputError, match=r"--model .*small_net.*--trust-code"):
        load(tmp_path / "small.pt")
    assert load(tmp_path / "small.pt", trust_code=True).reparam_spec == spec
    loaded = load(tmp_path / "small.pt", model=spec.name)
    assert loaded.reparam_note is None
    assert loaded.reparam_spec == spec
    assert loaded.reparam_input_shapes == [(2, 3, 11, 9)]
    x = probe(shape=(2, 3, 11, 9))
    assert run(loaded, x).shape == (2, 5)
    assert torch.equal(run(loaded, x), run(fused, x))


def test_load_matches_keys_strictly(tiny: nn.Module, tmp_path: Path):
    fused = reparam.fuse(tiny)
    path = save_fused(fused, tmp_path / "fused.pt", ModelSpec("acnet_tiny", {"width": 8}))
    payload = torch.load(path, weights_only=True)

    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, tmp_path / "extra.pt")
    with pytest.raises(UserInputError, match=r"1 unexpected \(e\.g\. extra\.weight\)"):
        load(tmp_path / "extra.pt")

    del payload["state_dict"]["extra.weight"]
    first = next(iter(payload["state_dict"]))
    del payload["state_dict"][first]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(UserInputError, match=rf"1 missing \(e\.g\. {first}\)"):
        load(tmp_path / "missing.pt")


def test_load_refuses_a_checkpoint_that_is_not_fused(tiny: nn.Module, tmp_path: Path):
    torch.save(tiny.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(UserInputError, match="not a fused checkpoint written by reparam"):
        load(tmp_path / "weights.pt")
    with pytest.raises(UserInputError, match="does not exist"):
        load(tmp_path / "missing.pt")


def test_load_refuses_a_format_from_the_future(tiny: nn.Module, tmp_path: Path):
    path = save_fused(reparam.fuse(tiny), tmp_path / "fused.pt", ModelSpec("acnet_tiny"))
    payload = torch.load(path, weights_only=True)
    payload["reparam"]["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(UserInputError, match=rf"format {FORMAT_VERSION + 1}.*upgrade reparam"):
        load(tmp_path / "future.pt")


def test_is_fused_checkpoint(tiny: nn.Module, tmp_path: Path):
    save_fused(reparam.fuse(tiny), tmp_path / "fused.pt", ModelSpec("acnet_tiny"))
    torch.save(tiny.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    assert is_fused_checkpoint(tmp_path / "fused.pt")
    assert not is_fused_checkpoint(tmp_path / "weights.pt")
    assert not is_fused_checkpoint(tmp_path / "garbage.pt")
    assert not is_fused_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- training checkpoints


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 1}, id="state_dict"),
        pytest.param(lambda sd: {"model": sd, "optimizer": {}}, id="model"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="dataparallel"),
        pytest.param(
            lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
            id="dataparallel-wrapped",
        ),
    ],
)
def test_load_state_dict_file_unwraps(wrap, tiny: nn.Module, tmp_path: Path):
    state = tiny.state_dict()
    torch.save(wrap(state), tmp_path / "w.pt")
    loaded = load_state_dict_file(tmp_path / "w.pt")
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_module_prefix_is_kept_unless_every_key_has_it(tmp_path: Path):
    state = {"module.weight": torch.ones(2), "head.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "w.pt")
    assert list(load_state_dict_file(tmp_path / "w.pt")) == list(state)


def test_pickled_module_needs_trust(tiny: nn.Module, tmp_path: Path):
    torch.save(tiny, tmp_path / "full.pt")
    with pytest.raises(UserInputError, match="--trust-pickle"):
        load_state_dict_file(tmp_path / "full.pt")
    loaded = load_state_dict_file(tmp_path / "full.pt", trust_pickle=True)
    assert all(torch.equal(loaded[k], v) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize(
    "content",
    [b"", b"plain text, not a checkpoint\n", bytes(range(256)), b"PK\x03\x04broken zip"],
    ids=["empty", "text", "bytes", "broken-zip"],
)
def test_a_file_that_is_not_a_checkpoint_is_named_so(content: bytes, tmp_path: Path):
    (tmp_path / "w.pt").write_bytes(content)
    with pytest.raises(UserInputError, match=r"'.*w\.pt' is not a PyTorch checkpoint \(") as info:
        load_state_dict_file(tmp_path / "w.pt")
    assert "\n" not in str(info.value)


def test_apply_state_dict_names_a_shape_mismatch_and_leaves_the_model(tiny: nn.Module):
    model = create_model("acnet_tiny", width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(tiny.state_dict())
    state["fc.weight"] = torch.zeros(3, 16)
    with pytest.raises(
        UserInputError,
        match=r"'ckpt\.pt': fc\.weight has shape \(3, 16\), the model expects \(10, 16\)",
    ):
        apply_state_dict(model, state, "ckpt.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_apply_state_dict_names_missing_and_unexpected_keys(tiny: nn.Module):
    state = {f"renamed.{k}": v for k, v in tiny.state_dict().items()}
    keys = list(tiny.state_dict())
    with pytest.raises(UserInputError) as info:
        apply_state_dict(create_model("acnet_tiny", width=8), state, "ckpt.pt")
    message = str(info.value)
    assert f"{len(keys)} missing (e.g. {', '.join(keys[:5])})" in message
    assert f"{len(keys)} unexpected (e.g. {', '.join('renamed.' + k for k in keys[:5])})" in message


# --------------------------------------------------------------------------- model factories


def test_build_model_reports_a_module_that_fails_on_import(tmp_path, monkeypatch):
    (tmp_path / "broken_factory_module.py").write_text("raise ValueError('half-written')\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(UserInputError, match=r"cannot import module.*ValueError: half-written"):
        build_model(ModelSpec("broken_factory_module:net"))


def test_build_model_lets_fusion_errors_through():
    spec = ModelSpec(f"{factories.MODULE}:small_net", {"kernel_size": 4})
    with pytest.raises(FusionError, match="odd kernel_size"):
        build_model(spec)


# --------------------------------------------------------------------------- atomic output


def test_atomic_write_replaces_the_target(tmp_path: Path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"new")) == target
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize(
    ("error", "raised"),
    [(RuntimeError("boom"), RuntimeError), (OSError(28, "No space left"), UserInputError)],
    ids=["runtime-error", "os-error"],
)
def test_atomic_write_failure_leaves_no_partial_file(tmp_path: Path, error, raised):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise error

    with pytest.raises(raised):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    fresh = tmp_path / "fresh.bin"
    with pytest.raises(raised):
        atomic_write(fresh, writer)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_refuses_missing_directory_and_directory_target(tmp_path: Path):
    with pytest.raises(UserInputError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "out.bin", lambda tmp: tmp.write_bytes(b"x"))
    with pytest.raises(UserInputError, match="is a directory"):
        atomic_write(tmp_path, lambda tmp: tmp.write_bytes(b"x"))
    assert list(tmp_path.iterdir()) == []


def test_save_fused_turns_a_failed_torch_save_into_a_user_error(
    tiny: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fused = reparam.fuse(tiny)

    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UserInputError, match=r"writing '.*fused\.pt' failed: torch\.save failed"):
        save_fused(fused, tmp_path / "fused.pt", ModelSpec("acnet_tiny"))
    assert os.listdir(tmp_path) == []


def test_load_refuses_metadata_without_state_dict(tmp_path):
    from reparam.checkpoint import FORMAT, FORMAT_VERSION

    path = tmp_path / "broken.pt"
    torch.save(
        {"reparam": {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "acnet_tiny"}},
        path,
    )
    with pytest.raises(UserInputError, match="no state_dict"):
        reparam.load(path)
