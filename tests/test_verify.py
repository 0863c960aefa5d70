"""verify_onnx: the training-time model against the graph, ORT optimisations off and on,
several batch sizes, explicit inputs, multiple outputs, and failures carrying the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reparam.blocks.acb import ACBlock
from reparam.errors import UserInputError
from reparam.export import export_onnx, verify_onnx
from reparam.testing import randomize_batchnorm


def acb() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ACBlock(4, 8), seed=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "acb.onnx"
    export_onnx(acb(), path, torch.randn(2, 4, 11, 9))
    return path


def test_passes_with_small_numbers_at_every_batch_size(exported: Path) -> None:
    model = acb().train()
    report = verify_onnx(model, exported, batch_sizes=(1, 2, 3, 7))
    assert report.ok and report.failures() == []
    assert report.batch_sizes == [1, 2, 3, 7]
    assert {case.optimization for case in report.cases} == {"disable", "all"}
    assert len(report.cases) == 8
    (worst,) = report.worst()
    assert worst.name == "output" and worst.max_rel < 1e-6 and worst.cosine > 1 - 1e-12
    assert model.training  # the reference ran in eval mode, its mode is restored


def test_explicit_inputs_numpy_and_torch(exported: Path) -> None:
    x = torch.randn(4, 4, 11, 9)
    for inputs in (x, x.numpy(), [x]):
        report = verify_onnx(acb(), exported, inputs, batch_sizes=(1,))
        assert report.ok
        assert [case.input_shapes[0][0] for case in report.cases] == [4, 4, 1, 1]


def test_divergence_fails_with_the_numbers(exported: Path) -> None:
    model = acb()
    with torch.no_grad():
        model.square_conv.weight[0, 0, 1, 1] += 0.5  # the graph no longer matches
    report = verify_onnx(model, exported)
    assert not report.ok
    failures = report.failures()
    assert len(failures) == 6  # every case: 2 optimisation levels x 3 batch sizes
    assert "max abs" in failures[0] and "max rel" in failures[0] and "cosine" in failures[0]
    assert "ONNX output differs" in report.failure_summary()
    assert report.worst()[0].max_abs > 1e-2


def test_tolerances_are_respected(exported: Path) -> None:
    model = acb()
    with torch.no_grad():
        model.square_bn.bias += 1e-3  # a uniform shift of 1e-3 everywhere
    assert not verify_onnx(model, exported).ok
    assert verify_onnx(model, exported, rtol=0, atol=2e-3).ok
    assert verify_onnx(model, exported, rtol=1e-2, atol=0).ok


def test_static_batch_checks_the_one_size(tmp_path: Path) -> None:
    path = tmp_path / "static.onnx"
    export_onnx(acb(), path, torch.randn(3, 4, 11, 9), dynamic_batch=False, exporter="legacy")
    report = verify_onnx(acb(), path)
    assert report.ok and report.batch_sizes == [3]


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x).relu()


def test_multiple_outputs_by_name(tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    model = TwoOutputs()
    export_onnx(
        model, path, torch.randn(1, 3, 8, 8), output_names=["feat", "aux"], exporter="legacy"
    )
    report = verify_onnx(model, path)
    assert report.ok and [d.name for d in report.worst()] == ["feat", "aux"]
    with torch.no_grad():
        model.b.bias += 1.0
    report = verify_onnx(model, path)
    assert not report.ok and all("'aux'" in line for line in report.failures())


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.zeros((1, 3, 11, 9), np.float32), "needs 4 channels"),
        (np.zeros((4, 11, 9), np.float32), "needs rank 4"),
        ((np.zeros((1, 4, 11, 9)), np.zeros((1, 4, 11, 9))), "takes 1 input"),
    ],
    ids=["channels", "rank", "count"],
)
def test_bad_inputs(exported: Path, inputs: object, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        verify_onnx(acb(), exported, inputs)


def test_model_that_does_not_fit_the_graph(exported: Path) -> None:
    with pytest.raises(UserInputError, match="PyTorch model does not run"):
        verify_onnx(ACBlock(3, 8), exported)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        verify_onnx(acb(), tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 20)
    with pytest.raises(UserInputError, match="ONNX"):
        verify_onnx(acb(), corrupt)
