"""`reparam bench --formats MODEL`: one row per format with size, latency and accuracy; a
failing format gets its reason and the table goes on; --json/--report/-o; colliding paths
refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reparam.bench import formats as formats_module
from reparam.bench.formats import bench_formats, render_formats_markdown
from reparam.cli.app import app

runner = CliRunner()
FAST = ("ONNX fp32 (onnxruntime)", "ONNX INT8 (onnxruntime)", "OpenVINO fp32", ".pt2 (torch)")


def test_rows_measure_each_format_and_a_failure_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_pt2(*args, **kwargs):
        raise RuntimeError("pt2 exporter exploded\nsecond line")

    monkeypatch.setattr("reparam.export.pt2.export_pt2", broken_pt2)
    report = bench_formats("acnet_tiny", batch=2, size=16, repeats=1, warmup=0, formats=FAST)
    rows = {row.name: row for row in report.rows}
    assert list(rows) == list(FAST)
    for name in ("ONNX fp32 (onnxruntime)", "OpenVINO fp32"):
        row = rows[name]
        assert not row.error, row.error
        assert row.max_rel is not None and row.max_rel < 1e-5
        assert row.cosine is not None and row.cosine > 0.99999
        assert row.top1 == 1.0
        assert row.size_bytes and row.size_bytes > 10_000
        assert row.latency_1_ms and row.latency_1_ms > 0 and row.latency_n_ms
    int8 = rows["ONNX INT8 (onnxruntime)"]
    assert not int8.error and int8.max_rel is not None and 0 < int8.max_rel < 0.2
    assert int8.size_bytes < rows["ONNX fp32 (onnxruntime)"].size_bytes
    failed = rows[".pt2 (torch)"]
    assert "pt2 exporter exploded" in failed.error and "\n" not in failed.error
    assert failed.latency_1_ms is None
    markdown = render_formats_markdown(report)
    assert "| .pt2 (torch) | failed |" in markdown and "| OpenVINO fp32 |" in markdown
    assert json.loads(json.dumps(report.to_dict()))["rows"][3]["error"] == failed.error


def test_cli_formats_json_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats_module, "FORMATS", FAST[:1])
    markdown, report = tmp_path / "b.md", tmp_path / "b.json"
    result = runner.invoke(
        app,
        ["bench", "--formats", "acnet_tiny", "--quick", "-q", "--json", "-o", str(markdown),
         "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["model"] == "acnet_tiny" and printed["rows"][0]["max_rel"] < 1e-5
    assert json.loads(report.read_text()) == printed
    assert "## Formats: acnet_tiny" in markdown.read_text()


def test_cli_refuses_colliding_outputs_and_unknown_model(tmp_path: Path) -> None:
    same = tmp_path / "b.md"
    result = runner.invoke(app, ["bench", "--formats", "acnet_tiny", "-o", str(same),
                                 "--report", str(same)])  # fmt: skip
    assert result.exit_code == 1
    assert "same file" in result.stderr and "Traceback" not in result.output
    assert not same.exists()
    result = runner.invoke(app, ["bench", "--quick", "-o", str(same), "--report", str(same)])
    assert result.exit_code == 1 and "same file" in result.stderr
    result = runner.invoke(app, ["bench", "--formats", "nosuch_model"])
    assert result.exit_code == 1 and "nosuch_model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
