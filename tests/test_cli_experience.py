"""What a new user hits first (issue 20 "user experience", issue 19 paths and IO): usage
errors in one line with hints, ``--json`` failures as JSON, notes that say what was run,
outputs that collide refused before any work, the environment's failures named as such."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from reparam._io import describe_os_error
from reparam.checkpoint import ModelSpec, read_weights, save_fused
from reparam.cli.app import app
from reparam.convert import fuse
from reparam.models import create_model

runner = CliRunner()
REPARAM = [sys.executable, "-c", "from reparam.cli.app import main; main()"]
# As the console script runs: the current directory is not on sys.path (`python -c` adds it).
REPARAM_SCRIPT = [
    sys.executable,
    "-c",
    "import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
    "from reparam.cli.app import main; main()",
]


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def one_error_line(result) -> str:
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_global_option_after_the_command_says_where_it_goes():
    line = one_error_line(invoke("fuse", "acnet_tiny", "-q"))
    assert "No such option: -q" in line and "global options go before the command" in line
    assert "reparam -q fuse" in line


def test_typos_get_suggestions():
    assert "did you mean acnet_tiny?" in one_error_line(invoke("fuse", "acnet_tinyy"))
    assert "Possible options: --output" in one_error_line(invoke("fuse", "x", "--ouput", "y"))
    assert "Did you mean fuse?" in one_error_line(invoke("fus", "acnet_tiny"))


@pytest.mark.parametrize(
    "args",
    [
        ["fuse", "acnet_tinyy", "--json"],  # the command's own failure
        ["fuse", "acnet_tiny", "--json", "--bogus"],  # a usage error
    ],
    ids=["command", "usage"],
)
def test_json_failures_print_one_error_object_on_stdout(args):
    result = invoke(*args)
    line = one_error_line(result)
    assert json.loads(result.stdout) == {"error": line.removeprefix("error: ")}


def test_fuse_without_weights_says_the_model_has_its_initial_weights(tmp_path):
    result = invoke("fuse", "acnet_tiny", "-o", tmp_path / "f.pt")
    assert result.exit_code == 0, result.output
    assert "note: no --weights: fuse used the model's initial weights" in result.stdout


def test_fuse_refuses_an_output_that_is_its_report_before_any_work(tmp_path):
    target = tmp_path / "X.pt"
    result = invoke("fuse", "acnet_tiny", "-o", target, "--report", target)
    assert "same file" in one_error_line(result)
    assert "fusing" not in result.stderr and not target.exists()
    (tmp_path / "link.json").symlink_to(target)
    result = invoke("fuse", "acnet_tiny", "-o", target, "--report", tmp_path / "link.json")
    assert "same file" in one_error_line(result)


def test_nan_weights_are_not_passed_as_equal(tmp_path):
    """A fused checkpoint of NaN weights, fused again: the check compares the model with a
    copy of itself, where NaN at the same place used to count as equal ("max rel 0")."""
    fused = fuse(create_model("acnet_tiny"))
    with torch.no_grad():
        for parameter in fused.parameters():
            parameter.fill_(float("nan"))
    source = save_fused(fused, tmp_path / "nan.pt", ModelSpec("acnet_tiny"), input_shapes=[])
    result = invoke("fuse", source, "-o", tmp_path / "f.pt")
    assert "stem.0.weight holds NaN" in one_error_line(result)  # refused as it is read
    assert not (tmp_path / "f.pt").exists()


def test_a_broken_ema_entry_beside_good_weights_is_named(tmp_path):
    good = create_model("acnet_tiny").state_dict()
    torch.save({"ema": {"updates": 3}, "model": good}, tmp_path / "ckpt.pt")
    read = read_weights(tmp_path / "ckpt.pt")
    assert read.entry == "entry 'model'" and read.skipped == ("entry 'ema'",)
    result = invoke("fuse", "acnet_tiny", "-w", tmp_path / "ckpt.pt", "-o", tmp_path / "f.pt")
    assert result.exit_code == 0, result.output
    assert "entry 'model' (entry 'ema' skipped: no state dict in it)" in result.stdout


def test_an_ema_entry_that_does_not_fit_names_the_entry_and_the_alternative(tmp_path):
    good = create_model("acnet_tiny").state_dict()
    torch.save({"ema": {"x.weight": torch.zeros(1)}, "model": good}, tmp_path / "ckpt.pt")
    line = one_error_line(invoke("fuse", "acnet_tiny", "-w", tmp_path / "ckpt.pt"))
    assert "entry 'ema'" in line and "--weights-key" in line and "model" in line


def test_user_values_echoed_in_errors_are_cut():
    line = one_error_line(invoke("fuse", "x" * 1_000_000))
    assert len(line) < 1000 and "(1000000 characters)" in line
    kwargs = [item for i in range(100_000) for item in ("-k", f"k{i}=1")]
    line = one_error_line(invoke("fuse", "acnet_tiny", *kwargs))
    assert len(line) < 1000


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "output was closed"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
        (
            OSError(errno.ENOSPC, "No space", os.path.join(tempfile.gettempdir(), "x")),
            "set TMPDIR",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/t']"),
            "TMPDIR",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro/f.pt"), "read-only"),
    ],
)
def test_environment_failures_are_named(error, expected):
    assert expected in describe_os_error(error)


def test_a_full_stdout_is_one_clear_line(tmp_path):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*REPARAM, "fuse", "acnet_tiny", "-o", str(tmp_path / "f.pt"), "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0], done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr


def test_a_closed_pipe_is_one_clear_line():
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run(
        [*REPARAM, "fuse", "--help"],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader.stdin.close()
    reader.wait()
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


def test_a_factory_imports_its_sibling_modules_as_python_m_would(tmp_path):
    (tmp_path / "layers_for_mynet.py").write_text("from torch import nn\nWIDTH = 4\n")
    (tmp_path / "mynet_sibling.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            import layers_for_mynet  # a sibling, imported at import time


            def build():
                import layers_for_mynet as again  # and inside the factory
                return nn.Sequential(nn.Conv2d(3, again.WIDTH, 3), nn.BatchNorm2d(4))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [*REPARAM_SCRIPT, "fuse", "mynet_sibling:build", "-s", "1,3,8,8", "-o", "f.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f.pt").is_file()


def test_piped_progress_prints_a_line_per_step_and_per_unit(capsys):
    from reparam.cli._output import progress

    with progress() as shown:  # stderr is not a terminal under pytest
        shown.say("loading")
        with shown.bar(2, "training: epoch") as advance:
            advance("loss 0.5")
            advance()
        shown("exporting")
    assert capsys.readouterr().err.splitlines() == [
        "… loading",
        "… training: epoch 1/2 (loss 0.5)",
        "… training: epoch 2/2",
        "… exporting",
    ]
    with progress(quiet=True) as shown, shown.bar(2, "x") as advance:
        shown.say("nothing")
        advance()
    assert capsys.readouterr().err == ""


def test_a_legal_249_character_output_name_is_written(tmp_path):
    target = tmp_path / ("a" * 246 + ".pt")
    result = invoke("fuse", "acnet_tiny", "-o", target)
    assert result.exit_code == 0, result.output
    assert target.is_file() and not list(tmp_path.glob(".*.tmp"))
