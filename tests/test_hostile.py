"""Hostile and careless input to reading checkpoints, writing outputs and the CLI.

Every refused case asserts: non-zero exit, exactly one ``error:`` line, no traceback, the
payload did not run (marker files absent, victim files intact), inputs unchanged, nothing at
the output path but what was there before, and no temporary file left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import reparam
from reparam import checkpoint
from reparam._io import atomic_write, prepare_output
from reparam.checkpoint import ModelSpec, read_weights, save_fused
from reparam.cli._common import check_allocation, check_threads
from reparam.cli.app import app
from reparam.errors import UnsafeInputError, UserInputError, printable
from reparam.models import create_model
from reparam.testing import randomize_batchnorm

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.is_symlink()
    }


def assert_one_error(result, *fragments: str) -> str:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    # Besides the error, stderr may hold only progress lines ("… step", shown when piped).
    stderr = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert stderr == lines, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def no_temp_files(*directories: Path) -> bool:
    return not any(list(d.glob(".*.tmp")) for d in directories)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_state() -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomize_batchnorm(create_model("acnet_tiny"), seed=1)
    return model.state_dict()


@pytest.fixture(scope="module")
def fused_payload(tmp_path_factory: pytest.TempPathFactory) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fused = reparam.fuse(create_model("acnet_tiny"))
    path = save_fused(fused, tmp_path_factory.mktemp("f") / "f.pt", ModelSpec("acnet_tiny"))
    return torch.load(path, weights_only=True)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """``inp`` (inputs, checked unchanged), ``out`` (outputs), ``victim`` (must survive)."""
    inp, out = tmp_path / "inp", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.chdir(tmp_path)
    return {"inp": inp, "out": out, "victim": victim, "root": tmp_path}


def fused_file(payload: dict, path: Path, **meta) -> Path:
    data = {"reparam": {**payload["reparam"], **meta}, "state_dict": payload["state_dict"]}
    torch.save(data, path)
    return path


# --------------------------------------------------------------------------- code execution


def payloads(work: dict[str, Path]) -> list[tuple[str, dict, Callable[[], bool]]]:
    """(name, metadata, ran?) for files whose metadata names code to run."""
    marker = work["root"] / "MARKER"
    planted = work["inp"] / "planted_by_file.py"
    planted.write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef net(): pass\n")
    victim = work["victim"]
    return [
        (
            "shell",
            {"model": "subprocess:run", "kwargs": {"args": f"touch {marker}", "shell": True}},
            marker.exists,
        ),
        (
            "truncate",
            {"model": "builtins:open", "kwargs": {"file": str(victim), "mode": "w"}},
            lambda: victim.read_text() != "precious",
        ),
        ("planted-module", {"model": "planted_by_file:net", "kwargs": {}}, marker.exists),
        (
            "torch-load",
            {"model": "torch:load", "kwargs": {"f": str(victim), "weights_only": False}},
            lambda: False,
        ),
    ]


@pytest.mark.parametrize("case", ["shell", "truncate", "planted-module", "torch-load"])
def test_a_file_naming_a_factory_runs_nothing(case, work, fused_payload, monkeypatch):
    monkeypatch.syspath_prepend(str(work["inp"]))  # the planted module would be importable
    _, meta, ran = next(p for p in payloads(work) if p[0] == case)
    path = fused_file(fused_payload, work["inp"] / "evil.pt", **meta)
    before = digest(work["inp"])
    for command in (["fuse", path, "-o", work["out"] / "f.pt"],):
        line = assert_one_error(invoke(*command), "--model", "--trust-code", meta["model"])
        assert "does not import code" in line
    with pytest.raises(UnsafeInputError, match="--trust-code"):
        reparam.load(path)
    with pytest.raises(UnsafeInputError):
        checkpoint.load(path)
    assert not ran()
    assert "planted_by_file" not in sys.modules
    assert work["victim"].read_text() == "precious"
    assert digest(work["inp"]) == before
    assert list(work["out"].iterdir()) == []


def test_a_file_named_like_a_bundled_model_does_not_shadow_it(work, fused_payload):
    marker = work["root"] / "MARKER"
    fused_file(
        fused_payload,
        work["root"] / "acnet_tiny",
        model="subprocess:run",
        kwargs={"args": f"touch {marker}", "shell": True},
    )
    result = invoke("fuse", "acnet_tiny", "-o", work["out"] / "f.pt")
    assert result.exit_code == 0, result.output
    assert "(initial weights" in result.output  # the bundled model, not the file
    assert not marker.exists()
    # ./NAME reads the file, which still may not choose code
    assert_one_error(invoke("fuse", "./acnet_tiny", "-o", work["out"] / "g.pt"), "--trust-code")
    assert not marker.exists()


def test_a_factory_named_by_the_caller_is_used_and_reported(work, fused_payload):
    path = fused_file(fused_payload, work["inp"] / "f.pt", model="pkg_never_imported:net")
    result = invoke("fuse", path, "--model", "acnet_tiny", "-o", work["out"] / "g.pt")
    assert result.exit_code == 0, result.output
    assert "instead of the recorded pkg_never_imported:net" in result.output
    assert reparam.load(path, model="acnet_tiny").reparam_note is not None


# --------------------------------------------------------------------------- malformed files

MALFORMED = {
    "format-version-string": ({"format_version": "1"}, "format_version"),
    "kwargs-list": ({"kwargs": [1, 2]}, "kwargs"),
    "model-int": ({"model": 3}, "'model'"),
    "dtype-int8": ({"dtype": "int8"}, "dtype"),
    "dtype-complex64": ({"dtype": "complex64"}, "dtype"),
    "dtype-Tensor": ({"dtype": "Tensor"}, "dtype"),
    "input-shapes-negative": ({"input_shapes": [[1, -3]]}, "input_shapes"),
    "unknown-bundled-name": ({"model": "no\x1b[31mmodel"}, "unknown model 'no\\x1b[31mmodel'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_one_line(case, work, fused_payload):
    meta, fragment = MALFORMED[case]
    path = fused_file(fused_payload, work["inp"] / "bad.pt", **meta)
    assert_one_error(invoke("fuse", path, "-o", work["out"] / "f.pt"), fragment)
    with pytest.raises(UserInputError, match=r"malformed|unknown model"):
        reparam.load(path)
    assert list(work["out"].iterdir()) == []


def test_state_dict_values_that_are_not_tensors(work, fused_payload):
    payload = {**fused_payload, "state_dict": {**fused_payload["state_dict"], "x": "str"}}
    torch.save(payload, work["inp"] / "bad.pt")
    assert_one_error(invoke("fuse", work["inp"] / "bad.pt"), "x is a str, not a tensor")


def test_load_argument_errors():
    with pytest.raises(TypeError, match="expects a path"):
        reparam.load(None)
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="map_location 'cuda' is not available"):
            reparam.load("whatever.pt", map_location="cuda")


WEIGHTS = {
    "meta": lambda sd: {k: v.to("meta") for k, v in sd.items()},
    "complex": lambda sd: {
        k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in sd.items()
    },
    "escape-in-key": lambda sd: {**sd, "evil\x1b[2J\nkey": torch.zeros(1)},
}
WEIGHT_ERRORS = {
    "meta": "meta-device",
    "complex": "complex",
    "escape-in-key": "evil\\x1b[2J\\nkey",
}


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_weights_that_cannot_be_weights(case, work, tiny_state):
    torch.save(WEIGHTS[case](tiny_state), work["inp"] / "w.pt")
    before = digest(work["inp"])
    result = invoke("fuse", "acnet_tiny", "-w", work["inp"] / "w.pt", "-o", work["out"] / "f.pt")
    line = assert_one_error(result, WEIGHT_ERRORS[case])
    assert "\x1b" not in result.output
    assert "\x1b" not in line
    assert digest(work["inp"]) == before
    assert list(work["out"].iterdir()) == []


def test_directory_and_fifo_as_input(work):
    assert_one_error(
        invoke("fuse", "acnet_tiny", "-w", work["inp"], "-o", work["out"] / "f.pt"),
        "is a directory",
    )
    fifo = work["inp"] / "pipe.pt"
    os.mkfifo(fifo)
    assert_one_error(
        invoke("fuse", "acnet_tiny", "-w", fifo, "-o", work["out"] / "f.pt"),
        "not a regular file",
    )


def test_ema_weights_are_preferred_and_reported(work, tiny_state):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_state.items()}
    torch.save({"model": tiny_state, "ema": ema, "epoch": 3}, work["inp"] / "w.pt")
    assert torch.equal(read_weights(work["inp"] / "w.pt").state_dict["fc.bias"], ema["fc.bias"])
    assert read_weights(work["inp"] / "w.pt").entry == "entry 'ema'"
    chosen = read_weights(work["inp"] / "w.pt", key="model")
    assert torch.equal(chosen.state_dict["fc.bias"], tiny_state["fc.bias"])
    result = invoke("fuse", "acnet_tiny", "-w", work["inp"] / "w.pt", "-o", work["out"] / "f.pt")
    assert result.exit_code == 0, result.output
    assert "entry 'ema'" in result.output
    result = invoke(
        "fuse",
        "acnet_tiny",
        "-w",
        work["inp"] / "w.pt",
        "--weights-key",
        "model",
        "-o",
        work["out"] / "g.pt",
    )
    assert result.exit_code == 0, result.output
    assert "entry 'model'" in result.output
    assert_one_error(
        invoke("fuse", "acnet_tiny", "-w", work["inp"] / "w.pt", "--weights-key", "nope"),
        "no entry 'nope'",
        "epoch",
    )


# --------------------------------------------------------------------------- outputs


def test_non_regular_outputs_are_refused(work):
    fifo = work["out"] / "fifo.pt"
    os.mkfifo(fifo)
    for target, kind in ((Path("/dev/null"), "character device"), (fifo, "FIFO")):
        assert_one_error(invoke("fuse", "acnet_tiny", "-o", target), kind)
        assert not Path(target).is_file()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    link = work["out"] / "stdout.pt"
    link.symlink_to("/dev/null")
    assert_one_error(invoke("fuse", "acnet_tiny", "-o", link), "character device")
    assert link.is_symlink()
    assert no_temp_files(work["out"], Path("/dev"))


def test_symlink_output_writes_its_target(work):
    runs = work["root"] / "runs"
    runs.mkdir()
    (runs / "x.pt").write_bytes(b"old")
    link = work["out"] / "latest.pt"
    link.symlink_to(runs / "x.pt")
    result = invoke("fuse", "acnet_tiny", "-o", link)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == (runs / "x.pt").resolve()
    assert reparam.load(runs / "x.pt") is not None
    assert no_temp_files(runs, work["out"])


def test_output_equal_to_an_input_is_refused_before_work(work, tiny_state, fused_payload):
    weights = work["inp"] / "w.pt"
    torch.save(tiny_state, weights)
    fused = fused_file(fused_payload, work["inp"] / "f.pt")
    (work["inp"] / "link.pt").symlink_to(weights)
    os.link(weights, work["inp"] / "hard.pt")
    before = digest(work["inp"])
    cases = [
        ["acnet_tiny", "-w", weights, "-o", weights],
        ["acnet_tiny", "-w", weights, "-o", work["inp"] / "link.pt"],
        ["acnet_tiny", "-w", weights, "-o", work["inp"] / "hard.pt"],
        [fused, "-o", fused],
    ]
    for args in cases:
        assert_one_error(invoke("fuse", *args), "would overwrite the input")
    assert digest(work["inp"]) == before
    assert no_temp_files(work["inp"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_outputs_get_the_umask_mode_and_replaced_ones_keep_theirs(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "new.bin", lambda tmp: tmp.write_bytes(b"x"))
        existing = tmp_path / "existing.bin"
        existing.write_bytes(b"old")
        os.chmod(existing, 0o640)
        atomic_write(existing, lambda tmp: tmp.write_bytes(b"new"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    assert existing.read_bytes() == b"new"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path, interrupt):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise interrupt()

    with pytest.raises(interrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_prepare_output_refuses_missing_and_unwritable_directories(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="does not exist"):
        prepare_output(tmp_path / "missing" / "x.pt")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(UserInputError, match="permission denied or read-only"):
        prepare_output(tmp_path / "x.pt")


def test_demo_on_a_read_only_location(work, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert_one_error(invoke("demo", "-o", work["out"] / "demo"), "Read-only file system")
    assert list(work["out"].iterdir()) == []


# --------------------------------------------------------------------------- CLI hygiene

HYGIENE = {
    "huge-shape": (["acnet_tiny", "-s", "1,3,100000,100000"], ("would take", "available")),
    "huge-model-argument": (
        ["acnet_tiny", "-k", "width=1000000"],
        ("width", "would take", "TiB", "available", "smaller arguments"),
    ),
    "seed-negative": (
        ["acnet_tiny", "--seed", "-1"],
        ("--seed", "or equal to 0", "--help"),
    ),
    "seed-too-big": (["acnet_tiny", "--seed", str(2**63)], ("--seed",)),
    "nested-json": (["acnet_tiny", "-k", "width=" + "[" * 100000], ("nested too deeply",)),
    "rtol-nan": (["acnet_tiny", "--rtol", "nan"], ("--rtol",)),
    "rtol-negative": (["acnet_tiny", "--rtol", "-1"], ("--rtol",)),
    "model-for-a-name": (["acnet_tiny", "--model", "resnet18"], ("fused checkpoint",)),
    "weights-key-alone": (["acnet_tiny", "--weights-key", "ema"], ("--weights",)),
}


@pytest.mark.parametrize("case", sorted(HYGIENE))
def test_cli_hygiene(case, work):
    args, fragments = HYGIENE[case]
    assert_one_error(invoke("fuse", *args, "-o", work["out"] / "f.pt"), *fragments)
    assert list(work["out"].iterdir()) == []


def test_unexpected_exception_is_one_internal_error_line(work, monkeypatch):
    import reparam.summary

    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(reparam.summary, "fuse_and_check", broken)
    assert_one_error(invoke("fuse", "acnet_tiny", "-o", work["out"] / "f.pt"), "internal error")
    assert list(work["out"].iterdir()) == []


def test_check_allocation_and_threads():
    with pytest.raises(UserInputError, match=r"would take .*GiB"):
        check_allocation([(1, 3, 10**6, 10**6)], torch.float32, "input")
    assert check_allocation([(2, 3)], torch.float64, "input") == 48
    with pytest.raises(UserInputError, match="--threads 100000 is outside"):
        check_threads(100000)
    with pytest.raises(UserInputError):
        check_threads(0)
    assert check_threads(1) == 1
    assert printable("a\x1b[0m\n") == "a\\x1b[0m\\n"


def test_version_and_help_do_not_import_torch():
    # Simulates a package __init__ that imports nothing eagerly: the CLI itself must not.
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('reparam'); pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['reparam'] = pkg\n"
        "from reparam.cli import main\n"
        "for args in (['--version'], ['--help']):\n"
        "    sys.argv = ['reparam', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code in (0, None), stop.code\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "reparam")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("reparam ")
    assert "fuse" in result.stdout and result.stdout.rstrip().endswith("ok")


def test_sigterm_during_a_write_leaves_no_temp_and_the_old_file(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    # torch.save made slow (writes, then sleeps), so the signal lands inside atomic_write.
    # Short sleeps: the kernel may deliver SIGTERM to one of torch's OpenMP threads, and
    # Python runs the handler only when the main thread next returns to the interpreter
    # (one 60 s sleep outlasted the test's timeout once on a loaded machine).
    code = (
        "import sys, time, torch\n"
        "def slow_save(obj, path, *a, **k):\n"
        "    open(path, 'wb').write(b'partial')\n"
        "    for _ in range(600): time.sleep(0.1)\n"
        "torch.save = slow_save\n"
        "from reparam.cli import main\n"
        "sys.argv = ['reparam', 'fuse', 'acnet_tiny', '-q', '-o', sys.argv[1]]\n"
        "main()\n"
    )
    code = code.replace("'fuse', 'acnet_tiny', '-q'", "'-q', 'fuse', 'acnet_tiny'")
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".out.pt.*.tmp")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the temporary file never appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: interrupted by SIGTERM; nothing was written"
    ]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_a_fused_checkpoint_with_huge_model_arguments_is_refused_before_building(
    work, fused_payload
):
    """A bundled model recorded with absurd kwargs: refused from its meta-device shapes."""
    path = fused_file(fused_payload, work["inp"] / "huge.pt", kwargs={"width": 10**6})
    before = digest(work["inp"])
    assert_one_error(invoke("fuse", path, "-o", work["out"] / "f.pt"), "would take", "TiB")
    with pytest.raises(UserInputError, match="would take"):
        reparam.load(path)
    assert digest(work["inp"]) == before and list(work["out"].iterdir()) == []
