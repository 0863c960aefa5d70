"""`reparam export`, `reparam verify` and `reparam run` through typer's CliRunner: normal runs
and every kind of bad input (one ``error:`` line on stderr, exit 1, no traceback)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from torch import nn
from typer.testing import CliRunner

from reparam.blocks.drconv import DRConv2d
from reparam.cli.app import app
from reparam.ops import corr_ort as ort_corr

MODULE = __name__  # tests/ is on sys.path: factories below are named MODULE:callable
runner = CliRunner()


def drconv_net() -> nn.Module:
    """A factory for the CLI: conv, DRConv, pooled classifier."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        DRConv2d(4, 4, 3, region_num=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model.example_input_shapes = [(1, 3, 12, 10)]
    return model


def pool_net() -> nn.Module:
    """nn.AdaptiveAvgPool2d((2, 2)): cannot have a dynamic H/W (REFERENCE.md §3)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2))


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def assert_ok(result) -> str:
    assert result.exit_code == 0, result.output
    # stderr holds nothing but progress lines ("… step"), printed when it is not a terminal
    assert all(line.startswith("… ") for line in result.stderr.splitlines()), result.stderr
    return result.stdout


def assert_error(result, *fragments: str) -> str:
    """Exit 1 with exactly one ``error:`` line on stderr naming every fragment."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    # besides progress lines ("… step"), printed when stderr is not a terminal
    lines = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    out = assert_ok(invoke("export", "acnet_tiny", "-o", path))
    assert "OK: within rtol" in out and f"wrote {path}" in out
    assert "Conv" in out and "custom operators" in out and "file size" in out
    assert "batch sizes 1,2,3" in out
    return path


def test_export_writes_a_verified_graph(tiny_onnx: Path) -> None:
    proto = onnx.load(str(tiny_onnx))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["reparam.source"] == "acnet_tiny" and meta["reparam.fused"] == "true"
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}


def test_verify_passes_with_the_same_seed_and_fails_with_numbers_otherwise(
    tiny_onnx: Path,
) -> None:
    out = assert_ok(invoke("verify", tiny_onnx, "--model", "acnet_tiny", "--batch-sizes", "1,4"))
    assert "OK: within rtol" in out and "batch sizes 1,4" in out and "max abs" in out
    # another seed randomises other BN statistics: the graph no longer matches the model
    result = invoke("verify", tiny_onnx, "--model", "acnet_tiny", "--seed", "1")
    line = assert_error(result, "ONNX output differs", "max abs", "max rel")
    assert "FAILED" in result.stdout and line


def test_verify_with_an_input_file(tiny_onnx: Path, tmp_path: Path) -> None:
    npz = tmp_path / "x.npz"
    np.savez(npz, input=np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("f4"))
    assert "OK" in assert_ok(invoke("verify", tiny_onnx, "-m", "acnet_tiny", "--input", npz))


def test_run_random_and_file_inputs(tiny_onnx: Path, tmp_path: Path) -> None:
    out = assert_ok(invoke("run", tiny_onnx, "--batch", "3", "--repeat", "2"))
    assert "3x3x32x32" in out and "output output" in out and "time per run" in out
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("f4")
    np.save(tmp_path / "x.npy", x)
    y = tmp_path / "y.npz"
    out = assert_ok(invoke("run", tiny_onnx, "--input", tmp_path / "x.npy", "-o", y))
    assert f"wrote {y}" in out
    with np.load(y) as saved:
        assert saved["output"].shape == (2, 10)


@pytest.mark.parametrize(
    ("make_args", "fragments"),
    [
        (lambda d, f: ["run", d / "missing.onnx"], ["does not exist"]),
        (lambda d, f: ["run", d / "corrupt.onnx"], ["not a readable ONNX model"]),
        (lambda d, f: ["run", f, "--input", d / "bad.npy"], ["needs 3 channels"]),
        (lambda d, f: ["run", f, "--input", d / "rank.npy"], ["needs rank 4"]),
        (lambda d, f: ["run", f, "--input", d / "missing.npy"], ["does not exist"]),
        (lambda d, f: ["run", f, "--input", d / "corrupt.onnx"], ["cannot read"]),
        (lambda d, f: ["run", f, "-o", d / "y.txt"], [".npz"]),
        (lambda d, f: ["verify", d / "missing.onnx", "-m", "acnet_tiny"], ["does not exist"]),
        (lambda d, f: ["verify", d / "corrupt.onnx", "-m", "acnet_tiny"], ["not a readable"]),
        (lambda d, f: ["verify", f, "-m", "no_such_model"], ["no_such_model"]),
        (lambda d, f: ["verify", f, "-m", "acnet_tiny", "--input", d / "bad.npy"], ["channels"]),
        (lambda d, f: ["verify", f, "-m", "acnet_tiny", "--batch-sizes", "0"], ["positive"]),
        (lambda d, f: ["export", "acnet_tiny", "-o", d / "x.onnx", "--opset", "5"], ["opset 5"]),
        (
            lambda d, f: ["export", "acnet_tiny", "-o", d / "x.onnx", "-s", "1,4,32,32"],
            ["channels"],
        ),
        (lambda d, f: ["export", "acnet_tiny", "-o", d / "x.txt"], [".onnx"]),
    ],
    ids=[
        "run-missing",
        "run-corrupt",
        "run-channels",
        "run-rank",
        "run-input-missing",
        "run-input-corrupt",
        "run-output-suffix",
        "verify-missing",
        "verify-corrupt",
        "verify-unknown-model",
        "verify-channels",
        "verify-batch-sizes",
        "export-opset",
        "export-channels",
        "export-suffix",
    ],
)
def test_bad_inputs(make_args, fragments: list[str], tiny_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "corrupt.onnx").write_bytes(b"definitely not a model" * 5)
    np.save(tmp_path / "bad.npy", np.zeros((1, 2, 32, 32), "f4"))
    np.save(tmp_path / "rank.npy", np.zeros((3, 32, 32), "f4"))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_error(invoke(*make_args(tmp_path, tiny_onnx)), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_export_custom_corr_then_verify_and_run(tmp_path: Path) -> None:
    path = tmp_path / "dr.onnx"
    out = assert_ok(invoke("export", f"{MODULE}:drconv_net", "-o", path, "--corr", "custom"))
    assert "com.reparam::Corr" in out and "OK: within rtol" in out
    assert "OK" in assert_ok(invoke("verify", path, "-m", f"{MODULE}:drconv_net"))
    assert "time per run" in assert_ok(invoke("run", path, "--repeat", "1"))


def test_custom_corr_without_onnxruntime_extensions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dr.onnx"
    assert_ok(
        invoke("export", f"{MODULE}:drconv_net", "-o", path, "--corr", "custom", "--no-verify")
    )
    import onnx

    # The same graph without the model-local function Corr ships with: a bare custom node.
    bare = onnx.load(str(path))
    del bare.functions[:]
    bare_path = tmp_path / "bare.onnx"
    onnx.save(bare, str(bare_path))
    monkeypatch.setattr(ort_corr, "_library_path", None)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    # The exported graph carries Corr as a function of standard ops: plain onnxruntime runs it.
    assert_ok(invoke("run", path))
    assert_ok(invoke("verify", path, "-m", f"{MODULE}:drconv_net"))
    assert_error(invoke("run", bare_path), "onnxruntime-extensions", "reparam[custom-ops]")
    assert_error(
        invoke("verify", bare_path, "-m", f"{MODULE}:drconv_net"), "onnxruntime-extensions"
    )


def test_dynamic_hw_refusal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pool.onnx"
    result = invoke("export", f"{MODULE}:pool_net", "-s", "1,3,10,10", "-o", path, "--dynamic-hw")
    assert_error(result, "baked", "static sizes")
    assert not list(tmp_path.iterdir())


def test_verify_json_on_stdout_and_report_file(tiny_onnx: Path, tmp_path: Path) -> None:
    import json

    report = tmp_path / "verify.json"
    result = invoke("verify", tiny_onnx, "-m", "acnet_tiny", "--json", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is the JSON alone
    assert data["ok"] is True and data["batch_sizes"] == [1, 2, 3]
    assert "OK: within rtol" in result.stderr  # the human summary went to stderr
    assert json.loads(report.read_text()) == data
    run = invoke("run", tiny_onnx, "--repeat", "1", "--json")
    assert json.loads(run.stdout)["outputs"]["output"]["shape"] == [1, 10]


def test_export_pt2_loads_without_reparam_and_matches(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt2"
    assert_ok(invoke("export", "acnet_tiny", "--format", "pt2", "-o", path))
    import torch

    import reparam
    from reparam.models import create_model
    from reparam.testing import randomize_batchnorm

    with open(path, "rb") as handle:
        program = torch.export.load(handle).module()
    torch.manual_seed(0)  # the CLI's seed: same initial weights and BN statistics
    model = randomize_batchnorm(create_model("acnet_tiny"), 0).eval()
    x = torch.randn(3, 3, 32, 32)  # another batch size than the example
    with torch.no_grad():
        torch.testing.assert_close(program(x), reparam.fuse(model)(x), rtol=1e-4, atol=1e-5)


def test_export_int8_writes_a_verified_fp32_graph_and_a_qdq_graph(tmp_path: Path) -> None:
    import json

    import onnx

    path = tmp_path / "tiny.onnx"
    result = invoke("export", "acnet_tiny", "-o", path, "--int8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    int8 = tmp_path / "tiny-int8.onnx"
    assert path.is_file() and int8.is_file()
    assert report["int8"]["cosine"] > 0.99
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "random" in result.stderr  # calibration without data is said out loud
