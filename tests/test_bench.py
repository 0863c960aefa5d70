"""Benchmark helpers and ``reparam bench`` (a tiny selection, few repeats)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import typer
from torch import nn
from typer.testing import CliRunner

from reparam.bench import (
    Timing,
    bench_blocks,
    check_memory,
    count_macs,
    estimate_forward_bytes,
    list_blocks,
    peak_memory,
    time_candidates,
    verdict,
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


def test_time_candidates_returns_positive_median():
    conv, x = nn.Conv2d(2, 2, 3), torch.randn(1, 2, 8, 8)
    seconds = time_candidates({"conv": lambda: conv(x)}, repeats=3, warmup=1)["conv"].median
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


class _FunctionalConv(nn.Module):
    """A conv written as ``F.conv2d`` in ``forward``: no ``nn.Conv2d`` for a hook to see."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)


def test_count_macs_counts_functional_convs():
    assert count_macs(_FunctionalConv(), torch.randn(2, 3, 4, 5)) == 2 * 6 * 20 * 3 * 9


def test_count_macs_counts_the_corr_custom_op():
    class Corr(nn.Module):
        def forward(self, x, kernel):
            return torch.ops.reparam.corr(x, kernel, 1, 1, 1, 1)

    x, kernel = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 4, 3, 3)
    assert count_macs(Corr(), x, kernel) == 2 * 6 * 25 * 4 * 9


def test_verdict_calls_a_miss_within_the_spread_noisy():
    steady = Timing(1.0, (1.0, 1.0, 1.0, 1.0))
    shaky = Timing(1.0, (0.6, 0.8, 1.0, 1.2, 1.4))  # interquartile range / median = 0.6
    assert verdict(1.02, 1.05, [steady]) == "met"
    assert verdict(1.20, 1.05, [steady, steady]) == "missed"
    assert verdict(1.20, 1.05, [steady, shaky]) == "noisy"
    assert verdict(2.0, 1.05, [shaky]) == "missed"  # missed by 90%, more than the spread
    assert verdict(1.2, 1.5, [steady], at_least=True) == "missed"
    assert verdict(1.6, 1.5, [steady], at_least=True) == "met"


def test_check_memory_refuses_a_run_larger_than_the_machine():
    with pytest.raises(UserInputError, match=r"needs about .* GiB .* 1.0 GiB available"):
        check_memory(
            ["acnet_tiny"], [], batch=8, size=100_000, block_shape=(1, 8, 8, 8), available=2**30
        )
    # a block too: the estimate runs it on the meta device, allocating nothing
    with pytest.raises(UserInputError, match="block ACBlock"):
        check_memory([], ["ACBlock"], batch=4, size=None, block_shape=(4, 64, 56, 56), available=1)
    check_memory(["acnet_tiny"], ["ACBlock"], batch=2, size=None, block_shape=(2, 8, 16, 16))


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
    assert "fused ORT vs ORT-optimised unfused" in text
    assert row.split(" | ")[6] != "—" and row.split(" | ")[10].endswith("×")  # unfused ORT
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


def test_bench_prints_a_table_that_fits_the_terminal_and_progress_lines(cli):
    args = ["bench", "--quick", "--models", "none", "--blocks", "ACBlock", "--no-onnx"]
    result = CliRunner().invoke(cli, [*args, "--repeats", "1"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "… block ACBlock" in result.output  # piped: a plain progress line
    assert "ACBlock" in result.output and "| ACBlock |" not in result.output  # no markdown
    assert max(len(line) for line in result.output.splitlines()) <= 80


@pytest.mark.parametrize(("columns", "header"), [(200, "fused/plain ≤1.05"), (60, "max rel err")])
def test_bench_terminal_shows_a_table_when_wide_and_panels_when_narrow(cli, columns, header):
    args = ["bench", "--quick", "--models", "none", "--blocks", "ACBlock", "--no-onnx", "-q"]
    result = CliRunner().invoke(cli, [*args, "--repeats", "1"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    assert header in result.output  # the panel lists every field under its full name
    assert max(len(line) for line in result.output.splitlines()) <= columns


def test_estimate_forward_bytes_counts_modules_before_an_op_without_meta_kernel():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[: int(x.sum().item())]  # needs real data: fails on the meta device

    model = lambda: nn.Sequential(nn.Conv2d(1, 4, 1), DataDependent())  # noqa: E731
    inputs_bytes = 4 * 2 * 1 * 8 * 8
    conv_pair = inputs_bytes + 4 * 2 * 4 * 8 * 8
    assert estimate_forward_bytes(model, [(2, 1, 8, 8)]) == inputs_bytes + 2 * conv_pair


def test_bench_json_on_stdout_and_report_file(cli, tmp_path):
    target = tmp_path / "bench.json"
    args = ["bench", "--quick", "--models", "none", "--blocks", "ACBlock", "--no-onnx", "-q"]
    result = CliRunner().invoke(cli, [*args, "--repeats", "2", "--json", "--report", str(target)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[: result.output.rindex("}") + 1])
    assert json.loads(target.read_text()) == data
    (block,) = data["blocks"]
    assert block["name"] == "ACBlock" and block["shape"] == [2, 8, 16, 16]
    assert len(block["fused"]["samples"]) == 2 and block["fused_vs_plain"] > 0
    assert data["settings"]["threads"] == 1 and data["machine"]["cores"] >= 1


def test_bench_refuses_an_absurd_size_before_allocating(cli):
    args = ["bench", "--models", "acnet_resnet18", "--blocks", "none", "--size", "100000"]
    result = CliRunner().invoke(cli, [*args, "--no-onnx"])
    assert result.exit_code == 1
    assert result.output.startswith("error: model acnet_resnet18 at input 8×3×100000×100000")
    assert "GiB available" in result.output and len(result.output.strip().splitlines()) == 1
