"""Issue 19 tried one step beside the helpers' own fixtures, as a new user would: each
defect found that way, pinned (a failing test first, then the fix)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from reparam.cli.app import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_failed_export_names_the_users_file_not_the_staged_one(tmp_path: Path) -> None:
    # The CLI stages the graph at a hidden temporary name; the refusal named that name
    # ('.rp-xxxx.onnx' was not written), which the user never asked for.
    out = tmp_path / "mine.onnx"
    result = invoke("export", "acnet_tiny", "-o", out, "--rtol", "0", "--atol", "0")
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert f"'{out}' was not written" in line, line
    assert ".rp-" not in line, line
    assert not out.exists()
