"""`reparam fuse` through typer's CliRunner (in-process): the report, the fused checkpoint,
every kind of bad input (one ``error:`` line, non-zero exit, no traceback), atomic output,
and inputs left untouched."""

from __future__ import annotations

import hashlib
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import reparam
from reparam._version import __version__
from reparam.blocks.acb import ACBlock
from reparam.checkpoint import ModelSpec, load, save_fused
from reparam.cli.app import app
from reparam.models import create_model, list_models
from reparam.testing import randomize_batchnorm

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    import factories_for_tests as factories
except ImportError:  # tests/ became a package
    from tests import factories_for_tests as factories

FACTORY = f"{factories.MODULE}:small_net"
TINY_SHAPE = (1, 3, 32, 32)

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` (hidden temp files included) with its content hash."""
    return {path.name: sha256(path) for path in sorted(directory.iterdir()) if path.is_file()}


def outputs(model: nn.Module, shape: tuple[int, ...] = TINY_SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(shape, generator=generator))


def report_row(text: str, label: str) -> list[str]:
    """The cells after ``label`` on the report line that starts with it."""
    for line in text.splitlines():
        if line.startswith(label + " ") or line.startswith(label + "  "):
            return line[len(label) :].split()
    raise AssertionError(f"no row '{label}' in report:\n{text}")


def assert_succeeded(result) -> None:
    assert result.exit_code == 0, result.output
    assert result.exception is None
    # stderr holds nothing but progress lines ("… step", shown when piped)
    assert all(line.startswith("… ") for line in result.stderr.splitlines()), result.stderr


def assert_user_error(result, *fragments: str) -> str:
    """A non-zero exit with exactly one ``error:`` line on stderr, and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    # Besides the error, stderr may hold only progress lines ("… step", shown when piped).
    lines = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """acnet_tiny with seeded weights and randomised BN statistics, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("acnet_tiny")
    return randomize_batchnorm(model, seed=1).eval()


@pytest.fixture(scope="module")
def tiny_fused_reference(tiny: nn.Module) -> torch.Tensor:
    return outputs(reparam.fuse(tiny))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny: nn.Module) -> Path:
    """A directory of input files, shared by the module and checked unchanged by every test."""
    directory = tmp_path_factory.mktemp("inputs")
    state = tiny.state_dict()
    prefixed = {f"module.{key}": value for key, value in state.items()}
    torch.save(state, directory / "bare.pt")
    torch.save({"state_dict": state, "epoch": 3}, directory / "wrapped_state_dict.pt")
    torch.save({"model": state, "optimizer": {}}, directory / "wrapped_model.pt")
    torch.save(prefixed, directory / "dataparallel.pt")
    torch.save({"state_dict": prefixed}, directory / "dataparallel_wrapped.pt")
    torch.save(tiny, directory / "full_module.pt")
    torch.save({"epoch": 3, "lr": 0.1}, directory / "no_state_dict.pt")
    torch.save(reparam.fuse(tiny).state_dict(), directory / "fused_keys.pt")
    renamed = {key.replace("square_", "sq_"): value for key, value in tiny.state_dict().items()}
    torch.save(renamed, directory / "renamed_keys.pt")
    with torch.random.fork_rng():
        torch.save(create_model("acnet_tiny", width=8).state_dict(), directory / "width8.pt")
    (directory / "garbage.pt").write_text("this is not a checkpoint\n" * 4)
    (directory / "empty.pt").write_bytes(b"")
    noise = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0))
    (directory / "noise.pt").write_bytes(bytes(noise.to(torch.uint8).tolist()))
    with zipfile.ZipFile(directory / "archive.pt", "w") as archive:
        archive.writestr("readme.txt", "a zip file, not a checkpoint")
    save_fused(
        reparam.fuse(tiny),
        directory / "tiny-fused.pt",
        ModelSpec("acnet_tiny"),
        input_shapes=[TINY_SHAPE],
    )
    return directory


@pytest.fixture(autouse=True)
def inputs_untouched(inputs: Path):
    """Every run, successful or not, leaves the input files' bytes as they were."""
    before = snapshot(inputs)
    yield
    assert snapshot(inputs) == before


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, inputs: Path):
    """One normal run: acnet_tiny with weights, written to a fresh directory."""
    target = tmp_path_factory.mktemp("run") / "tiny-fused.pt"
    result = invoke("fuse", "acnet_tiny", "-w", inputs / "bare.pt", "-o", target)
    return result, target


# --------------------------------------------------------------------------- help, version


def test_help_lists_fuse():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "fuse" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"reparam {__version__}"


def test_fuse_help_warns_that_trust_pickle_runs_code():
    result = invoke("fuse", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "--trust-pickle" in text
    assert "RUNS CODE" in text
    for model in list_models():
        assert model in text


# --------------------------------------------------------------------------- normal run


def test_report_counts_blocks_and_sizes(tiny_run, tiny: nn.Module):
    result, _ = tiny_run
    assert_succeeded(result)
    acblocks = sum(isinstance(m, ACBlock) for m in tiny.modules())
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    assert acblocks == 4
    assert report_row(result.stdout, "ACBlock") == [str(acblocks)]
    assert report_row(result.stdout, "Conv+BatchNorm") == [str(batchnorms - 3 * acblocks)]
    fused = reparam.fuse(tiny)
    before = sum(p.numel() for p in tiny.parameters())
    after = sum(p.numel() for p in fused.parameters())
    assert report_row(result.stdout, "parameters") == [f"{before:,}", f"{after:,}"]
    assert report_row(result.stdout, "BatchNorm layers") == [str(batchnorms), "0"]
    convs = [sum(isinstance(m, nn.Conv2d) for m in net.modules()) for net in (tiny, fused)]
    assert report_row(result.stdout, "conv layers") == [str(n) for n in convs]


def test_report_output_differences_are_small(tiny_run):
    result, target = tiny_run
    assert_succeeded(result)
    max_abs = float(report_row(result.stdout, "max abs difference")[0])
    max_rel = float(report_row(result.stdout, "max rel difference")[-1])
    assert 0 <= max_abs <= 1e-5
    assert 0 <= max_rel <= 1e-5
    assert re.search(r"^fuse time\s+[\d.]+ ms$", result.stdout, re.MULTILINE)
    assert result.stdout.rstrip().endswith(f"wrote {target}")


def test_written_checkpoint_loads_as_the_fused_model(tiny_run, tiny_fused_reference):
    _, target = tiny_run
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp files
    model = load(target)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, ACBlock) and not m.deploy for m in model.modules())
    assert torch.equal(outputs(model), tiny_fused_reference)


def test_refusing_a_fused_checkpoint_finds_nothing(tiny_run, out: Path):
    _, fused_path = tiny_run
    digest = sha256(fused_path)
    result = invoke("fuse", fused_path, "-o", out / "again.pt")
    assert_succeeded(result)
    assert "(nothing to fuse)" in result.stdout
    assert float(report_row(result.stdout, "max abs difference")[0]) == 0
    assert report_row(result.stdout, "BatchNorm layers") == ["0", "0"]
    assert sha256(fused_path) == digest
    again = load(out / "again.pt")
    assert torch.equal(outputs(again), outputs(load(fused_path)))


def test_default_output_name_is_written_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("fuse", "acnet_tiny")
    assert_succeeded(result)
    assert "randomised BN statistics" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acnet_tiny-fused.pt"]
    assert load(tmp_path / "acnet_tiny-fused.pt").reparam_input_shapes == [TINY_SHAPE]


@pytest.mark.parametrize(
    "weights",
    ["bare", "wrapped_state_dict", "wrapped_model", "dataparallel", "dataparallel_wrapped"],
)
def test_weight_formats_give_identical_fused_models(
    weights: str, inputs: Path, out: Path, tiny_fused_reference
):
    result = invoke("fuse", "acnet_tiny", "-w", inputs / f"{weights}.pt", "-o", out / "f.pt")
    assert_succeeded(result)
    assert torch.equal(outputs(load(out / "f.pt")), tiny_fused_reference)


def test_pickled_module_is_accepted_with_trust_pickle(
    inputs: Path, out: Path, tiny_fused_reference
):
    result = invoke(
        "fuse", "acnet_tiny", "-w", inputs / "full_module.pt", "--trust-pickle", "-o", out / "f.pt"
    )
    assert_succeeded(result)
    assert torch.equal(outputs(load(out / "f.pt")), tiny_fused_reference)


def test_factory_with_kwargs_and_input_shape(tmp_path: Path, out: Path):
    shape = (1, 3, 11, 9)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomize_batchnorm(factories.small_net(widths=[4, 6], num_classes=5), 2)
    torch.save(model.state_dict(), tmp_path / "small.pt")
    result = invoke(
        "fuse",
        FACTORY,
        "-k",
        "widths=[4, 6]",
        "-k",
        "num_classes=5",
        "-w",
        tmp_path / "small.pt",
        "-s",
        "1,3,11,9",
        "-o",
        out / "small-fused.pt",
    )
    assert_succeeded(result)
    assert report_row(result.stdout, "ACBlock") == ["2"]
    assert report_row(result.stdout, "Conv+BatchNorm") == ["1"]
    assert "probe input 1x3x11x9" in result.stdout
    loaded = load(out / "small-fused.pt", model=FACTORY)  # a recorded factory must be named
    assert loaded.reparam_spec == ModelSpec(FACTORY, {"widths": [4, 6], "num_classes": 5})
    assert loaded.reparam_input_shapes == [shape]
    expected = outputs(reparam.fuse(model), shape)
    assert expected.shape == (1, 5)
    assert torch.equal(outputs(loaded, shape), expected)


def test_factory_announcing_its_input_shape_needs_no_shape_option(out: Path):
    result = invoke("fuse", f"{factories.MODULE}:small_net_with_shapes", "-o", out / "f.pt")
    assert_succeeded(result)
    assert "probe input 1x3x9x7" in result.stdout
    assert load(out / "f.pt", trust_code=True).reparam_input_shapes == [(1, 3, 9, 7)]


# --------------------------------------------------------------------------- bad input

Args = Callable[[Path, Path], list[object]]
BAD_INPUTS: list[tuple[str, Args, tuple[str, ...]]] = [
    (
        "missing-weights",
        lambda i, o: ["acnet_tiny", "-w", i / "missing.pt", "-o", o / "f.pt"],
        ("missing.pt", "does not exist"),
    ),
    (
        "text-garbage",
        lambda i, o: ["acnet_tiny", "-w", i / "garbage.pt", "-o", o / "f.pt"],
        ("garbage.pt", "is not a PyTorch checkpoint"),
    ),
    (
        "random-bytes",
        lambda i, o: ["acnet_tiny", "-w", i / "noise.pt", "-o", o / "f.pt"],
        ("noise.pt", "is not a PyTorch checkpoint"),
    ),
    (
        "empty-file",
        lambda i, o: ["acnet_tiny", "-w", i / "empty.pt", "-o", o / "f.pt"],
        ("empty.pt", "is not a PyTorch checkpoint"),
    ),
    (
        "zip-not-checkpoint",
        lambda i, o: ["acnet_tiny", "-w", i / "archive.pt", "-o", o / "f.pt"],
        ("archive.pt", "is not a PyTorch checkpoint"),
    ),
    (
        "no-state-dict-inside",
        lambda i, o: ["acnet_tiny", "-w", i / "no_state_dict.pt", "-o", o / "f.pt"],
        ("does not contain a state dict",),
    ),
    (
        "keys-do-not-match",
        lambda i, o: ["acnet_tiny", "-w", i / "renamed_keys.pt", "-o", o / "f.pt"],
        ("do not match the model", "missing (e.g.", "unexpected (e.g.", "sq_conv"),
    ),
    (
        "shapes-do-not-match",
        lambda i, o: ["acnet_tiny", "-w", i / "width8.pt", "-o", o / "f.pt"],
        ("has shape (8, 3, 3, 3)", "expects (16, 3, 3, 3)"),
    ),
    (
        "pickled-module-without-flag",
        lambda i, o: ["acnet_tiny", "-w", i / "full_module.pt", "-o", o / "f.pt"],
        ("pickled", "--trust-pickle"),
    ),
    (
        "factory-module-not-importable",
        lambda i, o: ["no_such_module_for_reparam:net", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("cannot import module 'no_such_module_for_reparam'",),
    ),
    (
        "factory-attribute-missing",
        lambda i, o: [f"{factories.MODULE}:no_such_net", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("has no attribute 'no_such_net'",),
    ),
    (
        "factory-not-callable",
        lambda i, o: [f"{factories.MODULE}:MODULE", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("is not callable",),
    ),
    (
        "factory-returns-no-module",
        lambda i, o: ["os:getcwd", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("returned str, not a torch.nn.Module",),
    ),
    (
        "factory-malformed",
        lambda i, o: [f"{factories.MODULE}:", "-o", o / "f.pt"],
        ("package.module:callable",),
    ),
    (
        "factory-without-input-shape",
        lambda i, o: [FACTORY, "-o", o / "f.pt"],
        ("--input-shape",),
    ),
    (
        "kwarg-not-key-value",
        lambda i, o: [FACTORY, "-k", "widths", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("'widths' must look like KEY=VALUE",),
    ),
    (
        "kwarg-key-not-identifier",
        lambda i, o: [FACTORY, "-k", "2x=3", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("KEY=VALUE",),
    ),
    (
        "kwarg-rejected-by-factory",
        lambda i, o: [FACTORY, "-k", "depth=3", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("rejected its arguments", "depth"),
    ),
    (
        "factory-raises-fusion-error",
        lambda i, o: [FACTORY, "-k", "kernel_size=4", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("odd kernel_size",),
    ),
    (
        "kwarg-value-rejected-by-model",
        lambda i, o: ["acnet_tiny", "-k", "width=-3", "-o", o / "f.pt"],
        ("failed with arguments", "-3"),
    ),
    (
        "unknown-bundled-model",
        lambda i, o: ["no_such_model", "-o", o / "f.pt"],
        ("unknown model 'no_such_model'", *list_models()),
    ),
    (
        "shape-not-integers",
        lambda i, o: ["acnet_tiny", "-s", "1,3,a,32", "-o", o / "f.pt"],
        ("'1,3,a,32' must be integers",),
    ),
    (
        "shape-not-positive",
        lambda i, o: ["acnet_tiny", "-s", "1,3,0,32", "-o", o / "f.pt"],
        ("positive",),
    ),
    (
        "shape-wrong-channels",
        lambda i, o: ["acnet_tiny", "-s", "1,4,32,32", "-o", o / "f.pt"],
        ("(1, 4, 32, 32)", "failed", "channels"),
    ),
    (
        "shape-wrong-rank",
        lambda i, o: ["acnet_tiny", "-s", "3,32,32", "-o", o / "f.pt"],
        ("(3, 32, 32)", "failed"),
    ),
    (
        "too-many-inputs",
        lambda i, o: ["acnet_tiny", "-s", "1,3,8,8", "-s", "1,3,8,8", "-o", o / "f.pt"],
        ("failed",),
    ),
    (
        "output-in-missing-directory",
        lambda i, o: ["acnet_tiny", "-w", i / "bare.pt", "-o", o / "missing" / "f.pt"],
        ("missing", "does not exist"),
    ),
    (
        "output-is-a-directory",
        lambda i, o: ["acnet_tiny", "-w", i / "bare.pt", "-o", o],
        ("is a directory",),
    ),
    (
        "output-is-the-weights",
        lambda i, o: ["acnet_tiny", "-w", i / "bare.pt", "-o", i / "bare.pt"],
        ("would overwrite the input",),
    ),
    (
        "output-is-the-fused-model",
        lambda i, o: [i / "tiny-fused.pt", "-o", i / "tiny-fused.pt"],
        ("would overwrite the input",),
    ),
    (
        "model-file-missing",
        lambda i, o: [i / "missing.pt", "-o", o / "f.pt"],
        ("does not exist",),
    ),
    (
        "model-file-not-fused",
        lambda i, o: [i / "bare.pt", "-o", o / "f.pt"],
        ("not a fused checkpoint", "--weights"),
    ),
    (
        "fused-model-with-weights",
        lambda i, o: [i / "tiny-fused.pt", "-w", i / "bare.pt", "-o", o / "f.pt"],
        ("drop --weights",),
    ),
    (
        "difference-above-rtol",
        lambda i, o: ["acnet_tiny", "-w", i / "bare.pt", "--rtol", "0", "-o", o / "f.pt"],
        ("differs from the original", "nothing written"),
    ),
]


@pytest.mark.parametrize(
    ("make_args", "fragments"),
    [pytest.param(make, fragments, id=name) for name, make, fragments in BAD_INPUTS],
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    make_args: Args, fragments: tuple[str, ...], inputs: Path, out: Path
):
    result = invoke("fuse", *make_args(inputs, out))
    assert_user_error(result, *fragments)
    assert list(out.iterdir()) == []  # no output and no temp file


def test_key_mismatch_names_the_first_five_keys_of_each_kind(
    inputs: Path, out: Path, tiny: nn.Module
):
    result = invoke("fuse", "acnet_tiny", "-w", inputs / "renamed_keys.pt", "-o", out / "f.pt")
    line = assert_user_error(result)
    expected = list(tiny.state_dict())
    given = [key.replace("square_", "sq_") for key in expected]
    keys = {
        "missing": [key for key in expected if key not in given],
        "unexpected": [key for key in given if key not in expected],
    }
    for kind, names in keys.items():
        shown = re.search(rf"(\d+) {kind} \(e\.g\. ([^)]*)\)", line)
        assert shown is not None, line
        assert int(shown.group(1)) == len(names)
        assert shown.group(2).split(", ") == names[:5]


def test_deploy_form_weights_load_into_the_deploy_model(inputs: Path, out: Path, tiny):
    """A state dict with the fused keys is a deploy checkpoint: it loads, nothing to fuse."""
    result = invoke("fuse", "acnet_tiny", "-w", inputs / "fused_keys.pt", "-o", out / "f.pt")
    assert result.exit_code == 0, result.output
    assert "deploy form" in result.output
    fused = reparam.load(out / "f.pt")
    reference = reparam.fuse(tiny)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- atomic output


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("boom")])
def test_failed_write_leaves_existing_output_and_no_temp_file(
    error: Exception, inputs: Path, out: Path, monkeypatch: pytest.MonkeyPatch
):
    target = out / "f.pt"
    target.write_bytes(b"previous contents")

    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    result = invoke("fuse", "acnet_tiny", "-w", inputs / "bare.pt", "-o", target)
    assert_user_error(result, "writing", "f.pt", "failed")
    assert [p.name for p in out.iterdir()] == ["f.pt"]
    assert target.read_bytes() == b"previous contents"


def test_successful_run_replaces_existing_output(inputs: Path, out: Path, tiny_fused_reference):
    target = out / "f.pt"
    target.write_bytes(b"previous contents")
    result = invoke("fuse", "acnet_tiny", "-w", inputs / "bare.pt", "-o", target)
    assert_succeeded(result)
    assert [p.name for p in out.iterdir()] == ["f.pt"]
    assert torch.equal(outputs(load(target)), tiny_fused_reference)


def test_kwargs_with_a_fused_checkpoint_are_refused(tmp_path):
    fused = tmp_path / "tiny-fused.pt"
    assert runner.invoke(app, ["fuse", "acnet_tiny", "-o", str(fused)]).exit_code == 0
    result = runner.invoke(app, ["fuse", str(fused), "-k", "width=8", "-o", str(tmp_path / "b.pt")])
    assert result.exit_code == 1 and "drop --kwarg" in result.stderr


# --------------------------------------------------------------------------- user factories

USER_NET = """
import torch.nn as nn


def build(width: int = 4):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU())


class Net(nn.Module):
    pass
"""


def test_factory_resolves_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`reparam fuse usernet_cwd:build` next to usernet_cwd.py works, as `uvicorn app:app`."""
    (tmp_path / "usernet_cwd.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "usernet_cwd", raising=False)
    result = invoke("fuse", "usernet_cwd:build", "-s", "1,3,8,8", "-o", tmp_path / "f.pt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f.pt").is_file()
    assert str(tmp_path) not in sys.path  # the import did not leave the directory behind


def test_a_python_file_as_model_suggests_its_factories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "usernet_hint.py").write_text(USER_NET + "\nraise SystemExit('ran')\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("fuse", "usernet_hint.py", "-o", tmp_path / "f.pt")
    assert_user_error(result, "usernet_hint:build", "build, Net")
    assert "usernet_hint" not in sys.modules  # parsed, never imported


def test_fuse_json_on_stdout_and_report_file(out: Path):
    import json

    report = out / "fuse.json"
    result = invoke("fuse", "acnet_tiny", "-o", out / "f.pt", "--json", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds the JSON alone
    assert data == json.loads(report.read_text())
    assert data["passed"] is True and data["max_rel"] <= 1e-4
    assert data["report"]["blocks"]["ACBlock"] > 0
    assert data["after"]["batchnorms"] == 0
