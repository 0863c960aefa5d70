"""ExecuTorch: a .pte lowered to XNNPACK with a dynamic batch, checked in ExecuTorch's own
runtime before it is written; batches beyond the planned bound refused with one line; the
one-line error when ExecuTorch is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reparam.errors import ExportError, UserInputError
from reparam.export import executorch as et
from reparam.runtime.openvino import RuntimeNotInstalledError
from reparam.testing import randomize_batchnorm


def small_net() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return randomize_batchnorm(model, seed=2).eval()


def test_executorch_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(RuntimeNotInstalledError) as caught:
        et.require_executorch()
    assert et.EXTRA in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra")
    model = small_net()
    path = tmp_path_factory.mktemp("et") / "net.pte"
    et.export_executorch(model, (torch.randn(1, 3, 16, 16),), path, dynamic_batch=True)
    return model, path


def test_dynamic_batch_program_matches_the_model(program) -> None:
    model, path = program
    loaded = et.ExecuTorchModel(path)
    assert loaded.planned is not None and loaded.planned >= 3
    for batch in (1, 3, loaded.planned):
        x = torch.randn(batch, 3, 16, 16, dtype=torch.float64)
        with torch.no_grad():
            want = model.double()(x)
            model.float()
        got = loaded.run(x.float())[0].double()
        assert got.shape == want.shape
        assert (got - want).abs().max() / want.abs().max() < 1e-5
    with pytest.raises(UserInputError, match=f"batch {loaded.planned + 1} is larger"):
        loaded.run(torch.randn(loaded.planned + 1, 3, 16, 16))


def test_bad_suffix_and_failed_check_write_nothing(
    program, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = program
    with pytest.raises(UserInputError, match=r"should end in \.pte"):
        et.export_executorch(model, (torch.randn(1, 3, 16, 16),), tmp_path / "x.onnx",
                             dynamic_batch=False)  # fmt: skip
    target = tmp_path / "kept.pte"
    target.write_bytes(b"old")
    monkeypatch.setattr(et, "CHECK_RTOL", -1.0)  # every program now "differs"
    with pytest.raises(ExportError, match="nothing was written"):
        et.export_executorch(model, (torch.randn(2, 3, 16, 16),), target, dynamic_batch=False)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pte"]


def test_drconv_model_exact_with_static_and_dynamic_batch(tmp_path: Path) -> None:
    """digits_net (ACBlock, RepVGG, DRConv, DBB, MobileOne): exact with a static batch, and
    with a dynamic one at batch sizes other than the example's (DRConv's standard-op graph
    computes its region layout's size in the graph, so no traced batch size stays inside)."""
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra")
    from reparam.models.registry import create_model

    model = randomize_batchnorm(create_model("digits_net"), seed=4).eval()
    x = torch.randn(2, 1, 8, 8)
    for dynamic in (False, True):
        path = tmp_path / f"digits-{dynamic}.pte"
        et.export_executorch(model, (x,), path, dynamic_batch=dynamic)
        program = et.ExecuTorchModel(path)
        for batch in (1, 3) if dynamic else (2,):
            inputs = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
            got = program.run(inputs)[0]
            with torch.no_grad():
                want = model(inputs)
            assert got.shape == want.shape
            assert (got - want).abs().max() / want.abs().max() < 1e-5
