"""Benchmark helpers and ``reparam bench`` (a tiny selection, few repeats)."""

from __future__ import annotations

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from reparam.bench import (
    bench_blocks,
    count_macs,
    list_blocks,
    peak_memory,
    time_candidates,
    time_module,
)
from reparam.cli.bench_cmd import bench
from reparam.errors import UserInputError


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench)

    @app.command("other")
    def _other() -> None:  # a second command keeps `bench` a subcommand, as in reparam's app
        pass

    return app


def test_time_module_returns_positive_median():
    conv = nn.Conv2d(2, 2, 3)
    seconds = time_module(conv, [torch.randn(1, 2, 8, 8)], repeats=3, warmup=1)
    assert isinstance(seconds, float) and seconds > 0


def test_time_candidates_interleaves_in_rotating_order():
    calls: list[str] = []
    timings = time_candidates(
        {name: (lambda n=name: calls.append(n)) for name in "abc"},
        repeats=3,
        warmup=1,
        settle=False,
    )
    assert calls == list("abcbcacababc")
    assert set(timings) == {"a", "b", "c"}
    for timing in timings.values():
        assert len(timing.samples) == 3 and timing.median == sorted(timing.samples)[1] > 0


def test_time_candidates_settles_each_candidate_before_timing_it():
    calls: list[str] = []
    time_candidates({name: (lambda n=name: calls.append(n)) for name in "ab"}, repeats=1, warmup=1)
    assert calls == list("aabbbbaa")


def test_time_candidates_rejects_no_repeats():
    with pytest.raises(UserInputError, match="repeats"):
        time_candidates({"a": lambda: None}, repeats=0)


def test_count_macs_counts_convs_and_linears():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(),
        nn.Linear(8 * 5 * 7, 3),
    )  # fmt: skip
    macs = count_macs(model, torch.randn(2, 4, 5, 7))
    assert macs == 2 * (8 * 35 * 4 * 9 + 8 * 35 * 2 * 9 + 3 * 8 * 35)


def test_peak_memory_is_bytes_or_unavailable():
    value = peak_memory(lambda: torch.ones(1 << 20).sum())
    assert value is None or value >= 0


def test_bench_blocks_fused_forms_are_exact():
    results = bench_blocks(list_blocks()[:2], batch=1, channels=4, size=9, repeats=2, warmup=0)
    assert [r.name for r in results] == list_blocks()[:2]
    for r in results:
        assert r.max_rel <= 1e-5 and r.params_fused < r.params_train
        assert min(r.train.median, r.fused.median, r.plain.median) > 0


def test_bench_quick_writes_markdown_atomically(cli, tmp_path):
    target = tmp_path / "bench.md"
    args = ["bench", "--quick", "--models", "repvgg_tiny", "--blocks", "ACBlock,RepVGGBlock"]
    result = CliRunner().invoke(cli, [*args, "--repeats", "2", "--output", str(target)])
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert "| ACBlock |" in text and "| RepVGGBlock |" in text and "| repvgg_tiny |" in text
    assert "fused / plain ≤ 1.05" in text and "ORT / torch ≤ 1" in text
    assert "2×3×32×32" in text and "CPU:" in text
    row = next(line for line in text.splitlines() if line.startswith("| repvgg_tiny |"))
    assert "onnxruntime skipped" not in text and row.split(" | ")[5] != "—"  # ORT timed
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temporary left


def test_bench_skips_sections_and_onnx(cli, tmp_path):
    target = tmp_path / "bench.md"
    args = ["bench", "--quick", "--models", "none", "--blocks", "ACBlock", "--no-onnx"]
    result = CliRunner().invoke(cli, [*args, "--repeats", "1", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "## Models" not in target.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output", "missing-dir/bench.md"], "output directory"),
        (["--models", "no_such_model"], "unknown model 'no_such_model'"),
        (["--blocks", "NoBlock"], "unknown block 'NoBlock'"),
    ],
    ids=["bad-output-dir", "unknown-model", "unknown-block"],
)
def test_bench_bad_input_is_one_line_error(cli, tmp_path, args, message):
    args = [a.replace("missing-dir", str(tmp_path / "missing-dir")) for a in args]
    result = CliRunner().invoke(cli, ["bench", "--quick", "--no-onnx", *args])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "missing-dir").exists()
