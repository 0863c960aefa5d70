"""``reparam demo``: train, fuse, export both Corr modes, verify and run — one short epoch."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from reparam.cli import app
from reparam.demo import load_digits_split

pytest.importorskip("sklearn", reason="the demo data set ships with scikit-learn (reparam[demo])")
runner = CliRunner()


def test_digits_split_is_real_data_and_deterministic():
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.min() >= 0 and x_train.max() <= 1 and set(y_test.tolist()) == set(range(10))
    assert (load_digits_split(seed=0)[1] == y_train).all()


def test_demo_runs_every_stage_and_they_agree(tmp_path):
    # A wide terminal: one table row per stage (a narrow one gets a block per stage).
    result = runner.invoke(
        app, ["demo", "--epochs", "1", "-o", str(tmp_path)], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    stages = [
        "training-time model",
        "fused (torch)",
        "ONNX, Corr standard",
        "ONNX, Corr custom",
        "ONNX INT8",
    ]
    for stage in stages:
        assert any(line.startswith(stage) for line in lines), stage
    assert result.output.count("360/360 same predictions") == 3
    assert result.output.count("verify ok") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_net-custom.onnx",
        "digits_net-int8.onnx",
        "digits_net-standard.onnx",
    ]
    int8 = next(line for line in lines if line.startswith("ONNX INT8"))
    assert "same as fp32" in int8 and "cosine" in int8
    # Piped (not a terminal): one progress line per epoch, with the epoch's loss.
    assert re.search(r"^… training: epoch 1/1 \(loss \d+\.\d+\)$", result.stderr, re.MULTILINE)


def test_demo_outputs_that_are_one_file_are_refused_before_any_work(tmp_path):
    (tmp_path / "digits_net-standard.onnx").write_bytes(b"user's file")
    (tmp_path / "digits_net-int8.onnx").symlink_to(tmp_path / "digits_net-standard.onnx")
    result = runner.invoke(app, ["demo", "-o", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.startswith("error:"), result.output
    assert "same file" in result.stderr and "training" not in result.stderr
    assert (tmp_path / "digits_net-standard.onnx").read_bytes() == b"user's file"


def test_demo_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["demo", "-o", str(target)])
    assert result.exit_code == 1 and result.stderr.startswith("error:")
    assert "Traceback" not in result.output
