"""Issue 19 case 7: whatever path folded a model, its fused checkpoint reads back.

A model torch.fx cannot trace has its Conv→BN pairs folded by the probe forward that
``reparam fuse -s`` runs; :func:`reparam.load` must fuse the rebuilt model with the same
probe (recorded in the file) instead of strict-loading into a differently fused model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import reparam
from reparam.checkpoint import ModelSpec, save_fused
from reparam.cli._common import load_model
from reparam.cli.app import app
from reparam.convert import fuse
from reparam.errors import UserInputError
from reparam.testing import randomize_batchnorm

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    import factories_for_tests as factories
except ImportError:
    from tests import factories_for_tests as factories

FACTORY = f"{factories.MODULE}:untraceable_net"
SHAPE = (1, 3, 16, 16)


def _original(seed: int = 0) -> nn.Module:
    """The model ``reparam fuse FACTORY`` fuses without -w: seeded build, randomised BN."""
    torch.manual_seed(seed)
    return randomize_batchnorm(factories.untraceable_net(), seed).eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_probe_folded_checkpoint_reads_back_with_the_same_outputs(tmp_path: Path, dtype):
    path = tmp_path / "f.pt"
    result = CliRunner().invoke(app, ["fuse", FACTORY, "-s", "1,3,16,16", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "does not trace" in result.output  # the probe, not fx, folded the pairs
    # Issue 19 case 12: the note says so, not "only pairs inside nn.Sequential were folded".
    assert "found by a probe forward" in result.output
    assert "only Conv→BN pairs inside nn.Sequential" not in result.output

    loaded = reparam.load(path, model=FACTORY)
    assert _batchnorms(loaded) == 0
    original = _original().to(dtype)
    x = torch.randn(2, 3, 20, 12, generator=torch.Generator().manual_seed(5), dtype=dtype)
    with torch.no_grad():
        expected, got = original(x), loaded.to(dtype)(x)
    # The file holds float32 weights: 1e-5 relative in float64 too (the rounding of the file).
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    # `reparam export ./f.pt --model FACTORY` reads the file through the same loader.
    via_cli = load_model(str(path), model_override=FACTORY)
    assert via_cli.input_shapes == [SHAPE]
    with torch.no_grad():
        assert torch.equal(via_cli.model.to(dtype)(x), got)


def test_a_file_whose_architecture_cannot_be_reproduced_is_refused_in_one_line(tmp_path):
    # Fused with a probe, saved as if without one: load cannot fold the pairs again.
    model = _original()
    fused = fuse(model, example_inputs=torch.randn(SHAPE))
    path = save_fused(fused, tmp_path / "f.pt", ModelSpec(FACTORY), input_shapes=[])
    with pytest.raises(UserInputError) as caught:
        reparam.load(path, model=FACTORY)
    message = str(caught.value)
    assert "\n" not in message
    assert (
        "do not match" in message and "missing" in message and "run reparam fuse again" in message
    )


def test_files_without_a_recorded_probe_seed_still_load(tmp_path):
    """Files of the previous writer record shapes but no probe seed (fused with seed 0)."""
    model = _original()
    from reparam.checkpoint import probe_inputs

    fused = fuse(model, example_inputs=tuple(probe_inputs([SHAPE], 0)))
    path = save_fused(fused, tmp_path / "f.pt", ModelSpec(FACTORY), input_shapes=[SHAPE])
    payload = torch.load(path, weights_only=True)
    assert "probe_seed" not in payload["reparam"]
    loaded = reparam.load(path, model=FACTORY)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_adopted_pasted_copies_reads_back_identically(tmp_path):
    factory = f"{factories.MODULE}:pasted_repvgg_net"
    path = tmp_path / "f.pt"
    result = CliRunner().invoke(app, ["fuse", factory, "-s", "2,3,16,16", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "adopted" in result.output
    loaded = reparam.load(path, model=factory)
    assert _batchnorms(loaded) == 0
    torch.manual_seed(0)
    original = randomize_batchnorm(factories.pasted_repvgg_net(), 0).eval()
    x = torch.randn(3, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = original(x), loaded(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_export_of_the_fused_file_gives_the_outputs_of_load(tmp_path):
    """`reparam export ./f.pt --model FACTORY`: the same architecture and outputs as load."""
    ort = pytest.importorskip("onnxruntime")
    path, onnx_path = tmp_path / "f.pt", tmp_path / "f.onnx"
    runner = CliRunner()
    result = runner.invoke(app, ["fuse", FACTORY, "-s", "1,3,16,16", "-o", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(path), "--model", FACTORY, "-o", str(onnx_path)])
    assert result.exit_code == 0, result.output
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = reparam.load(path, model=FACTORY)(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(got - expected).max() <= 1e-5 * abs(expected).max()
