"""benchmarks/bench_toolchain.py on tiny bundled models: it runs and reports every step."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_toolchain.py"


@pytest.fixture(scope="module")
def bench_toolchain():
    spec = importlib.util.spec_from_file_location("bench_toolchain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_every_step_with_times_and_the_export_ratio(bench_toolchain, capsys):
    code = bench_toolchain.main(
        ["--repeats", "1", "--model", "acnet_tiny", "--fuse-model", "repvgg_tiny"]
    )
    assert code == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, *rows = table
    assert header == "| step | time | target |"
    assert [row.split(" | ")[0] for row in rows] == [
        "| raw torch.onnx.export(dynamo=True), fused acnet_tiny",
        "| reparam.export_onnx, same fused model",
        "| reparam.export_onnx, training model (fusion included)",
        "| reparam.verify_onnx at batch 1, 2, 3",
        "| reparam.fuse(repvgg_tiny)",
    ]
    for row in rows:
        seconds = re.search(r"\| (\d+\.\d\d) s \(", row)
        assert seconds is not None, row
    ratio = re.search(r"(\d+\.\d\d)× raw", rows[1])
    assert ratio is not None and float(ratio.group(1)) > 0
