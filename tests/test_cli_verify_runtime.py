"""`reparam verify --runtime` and `reparam run --runtime`, the recorded shape ranges refused
by run/verify/the runtime, graph inputs without a declared shape, non-UTF-8 file names, and
paths that collide refused before any work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from reparam.cli.app import app
from reparam.errors import UserInputError
from reparam.runtime import load
from reparam.runtime.openvino import EXTRA, OpenVinoModel

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def error_line(result) -> str:
    """Exit 1 with exactly one ``error:`` line on stderr (progress lines aside)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acnet_tiny exported as `reparam export` does (seed 0 BN statistics)."""
    path = tmp_path_factory.mktemp("rt") / "tiny.onnx"
    assert invoke("export", "acnet_tiny", "-o", path).exit_code == 0
    return path


def test_verify_all_runtimes(tiny: Path) -> None:
    result = invoke("verify", tiny, "-m", "acnet_tiny", "--runtime", "all", "--json",
                    "--batch-sizes", "1,2")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and set(data["runtimes"]) == {"onnxruntime", "openvino"}
    assert data["runtimes"]["openvino"]["batch_sizes"] == [1, 2]
    result = invoke("verify", tiny, "-m", "acnet_tiny", "--runtime", "openvino", "--seed", "1")
    line = error_line(result)  # other BN statistics: the graph is not that model
    assert "OpenVINO output differs" in line and "ORT" not in line
    assert data["errors"] == {}


def test_verify_reports_a_missing_runtime_and_still_checks_the_other(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    result = invoke("verify", tiny, "-m", "acnet_tiny", "--runtime", "all", "--batch-sizes", "1")
    line = error_line(result)
    assert EXTRA in line and "openvino" in line
    assert "[onnxruntime]" in result.stdout and "[openvino] error:" in result.stdout
    line = error_line(invoke("verify", tiny, "-m", "acnet_tiny", "--runtime", "tensorrt"))
    assert "tensorrt" in line


def test_verify_refuses_a_report_over_its_model_before_any_work(tiny: Path, tmp_path: Path) -> None:
    fused = tmp_path / "fused.pt"
    fused.write_bytes(b"the user's fused checkpoint")
    line = error_line(invoke("verify", tiny, "-m", fused, "--report", fused))
    assert "--report" in line and "fused.pt" in line
    assert fused.read_bytes() == b"the user's fused checkpoint"
    line = error_line(invoke("verify", tiny, "-m", "acnet_tiny", "--report", tiny))
    assert "--report" in line


def test_run_openvino_and_collisions(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "y.npz"
    result = invoke("run", tiny, "--runtime", "openvino", "--batch", "2", "--repeat", "1",
                    "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "OpenVINO" in result.stdout
    with np.load(out) as data:
        openvino_out = data[data.files[0]]
    assert invoke("run", tiny, "--batch", "2", "--repeat", "1", "-o", out).exit_code == 0
    with np.load(out) as data:
        ort_out = data[data.files[0]]
    assert np.abs(openvino_out - ort_out).max() <= 1e-5 * np.abs(ort_out).max()
    line = error_line(invoke("run", tiny, "-o", out, "--report", out))
    assert "same file" in line


def ranged_graph(path: Path) -> Path:
    """Relu over x (batch, 3, H, W) recorded as valid for H in 8..16 only."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "ranged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    helper.set_model_props(
        model,
        {
            "reparam.shape_ranges": json.dumps({"x": {"2": [8, 16]}}),
            "reparam.input_shapes": "[[1, 3, 12, 8]]",
        },
    )
    onnx.save(model, str(path))
    return path


def test_inputs_outside_the_recorded_range_are_refused(tmp_path: Path) -> None:
    path = ranged_graph(tmp_path / "ranged.onnx")
    inside, outside = np.ones((1, 3, 16, 8), np.float32), np.ones((1, 3, 24, 8), np.float32)
    for session in (load(path), OpenVinoModel(path)):
        assert session.run(inside)["y"].shape == (1, 3, 16, 8)
        with pytest.raises(UserInputError, match=r"'x' axis 2 has size 24.*8 to 16"):
            session.run(outside)
    np.save(tmp_path / "big.npy", outside)
    line = error_line(invoke("run", path, "-i", tmp_path / "big.npy"))
    assert "axis 2 has size 24" in line
    assert invoke("run", path, "--repeat", "1").exit_code == 0  # the example, 12, is valid


def test_run_takes_an_input_without_a_declared_shape(tmp_path: Path) -> None:
    """Legal ONNX that onnxruntime runs: the input's shape is left out."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "free",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "free.onnx"
    onnx.save(model, str(path))
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    result = invoke("run", path, "-i", tmp_path / "x.npy", "--repeat", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"]["y"]["shape"] == [1, 3]
    assert np.array_equal(load(path).run(x)["y"], np.maximum(x, 0))
    line = error_line(invoke("run", path))
    assert "no declared shape" in line and "input file" in line


def test_run_a_file_whose_name_is_not_utf8(tiny: Path, tmp_path: Path) -> None:
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"t\xe9st.onnx"))
    Path(odd).write_bytes(tiny.read_bytes())
    result = invoke("run", odd, "--repeat", "1")
    assert result.exit_code == 0, result.output
    assert "constructor" not in result.output


def test_verify_without_weights_says_the_model_has_its_initial_weights(tiny: Path) -> None:
    result = invoke("verify", tiny, "--model", "acnet_tiny")
    assert result.exit_code == 0, result.output
    assert "no --weights: verify used the model's initial weights" in result.output
