"""`reparam expand` through typer's CliRunner: the report, the training checkpoint and its
rebuild (no code from the file), and bad input (one ``error:`` line, exit 1, nothing
written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import reparam
from reparam.checkpoint import ModelSpec
from reparam.cli.app import app
from reparam.errors import UnsafeInputError, UserInputError
from reparam.expansion import ExpandedConv
from reparam.expansion_checkpoint import load_expanded
from reparam.testing import randomize_batchnorm

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    import expand_fixtures as fixtures
except ImportError:
    from tests import expand_fixtures as fixtures

FACTORY = f"{fixtures.MODULE}:yolo_net"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def _seeded_yolo(seed: int = 0) -> torch.nn.Module:
    """The model the CLI builds for FACTORY without --weights (seeded, BN randomised)."""
    torch.manual_seed(seed)
    return randomize_batchnorm(fixtures.yolo_net(), seed).eval()


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def test_expand_writes_a_checkpoint_that_rebuilds_without_running_its_code(tmp_path: Path):
    out = tmp_path / "yolo-dbb.pt"
    result = invoke("expand", FACTORY, "--into", "dbb", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] and data["family"] == "dbb" and data["output"] == str(out)
    assert data["fuses_back_to_original"] and data["max_rel"] <= 1e-5
    assert len(data["report"]["expanded"]) == 9  # every conv but the 6x6 stem
    assert data["report"]["left_alone"][0]["path"] == "stem.conv"
    with pytest.raises(UnsafeInputError, match="names the factory"):
        load_expanded(out)  # a factory named by a file is not imported unasked
    rebuilt = load_expanded(out, model=FACTORY)
    assert rebuilt.training and isinstance(rebuilt.down.conv, ExpandedConv)
    original = _seeded_yolo()
    torch.testing.assert_close(_outputs(rebuilt), _outputs(original), rtol=1e-5, atol=1e-6)
    fused = reparam.fuse(rebuilt)
    assert [type(m) for m in fused.modules()] == [type(m) for m in reparam.fuse(original).modules()]
    assert load_expanded(out, trust_code=True).reparam_expand["family"] == "dbb"


def test_weights_include_and_the_human_report(tmp_path: Path):
    torch.manual_seed(3)
    source = randomize_batchnorm(fixtures.yolo_net(), 3)
    weights = tmp_path / "w.pt"
    torch.save({"model": source.state_dict()}, weights)
    out = tmp_path / "out.pt"
    result = invoke(
        "expand", FACTORY, "--into", "mobileone", "-w", weights, "-o", out,
        "--include", "c3.*", "--branches", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "into mobileone" in result.stdout and "same architecture" in result.stdout
    assert "stem.conv: not matched by include" in result.stdout
    rebuilt = load_expanded(out, model=FACTORY)
    assert isinstance(rebuilt.c3.cv1.conv, ExpandedConv) and not isinstance(
        rebuilt.down.conv, ExpandedConv
    )
    assert len(rebuilt.c3.cv1.conv.block.rbr_conv) == 3
    torch.testing.assert_close(_outputs(rebuilt), _outputs(source), rtol=1e-5, atol=1e-6)


def test_bundled_model_default_output_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("-q", "expand", "resnet18", "--into", "acnet", "-s", "1,3,32,32")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "wrote resnet18-acnet.pt"
    rebuilt = load_expanded(tmp_path / "resnet18-acnet.pt")  # a bundled name: no trust needed
    assert sum(isinstance(m, ExpandedConv) for m in rebuilt.modules()) == 17


def _one_error_line(result, pattern: str) -> None:
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--into", "repvg"], "unknown family 'repvg' (did you mean 'repvgg'?); known: acnet"),
        (["--into", "dbb", "--branches", "0"], "--branches must be from 1 to 64"),
        (["--into", "dbb", "--rtol", "nan"], "--rtol must be a finite number"),
    ],
    ids=["unknown-family", "branches", "rtol"],
)
def test_bad_options(tmp_path: Path, args: list[str], message: str):
    result = invoke("expand", FACTORY, *args, "-o", tmp_path / "out.pt")
    _one_error_line(result, message)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # short relative paths: the error line shows them whole
    out, report = Path("out.pt"), Path("report.json")
    nothing = invoke("expand", f"{fixtures.MODULE}:linear_net", "--into", "dbb", "-o", out)
    _one_error_line(nothing, "nothing to expand into dbb")
    other = Path("other.pt")
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), other)
    wrong = invoke("expand", FACTORY, "--into", "dbb", "-w", other, "-o", out, "--report", report)
    _one_error_line(wrong, "other.pt")
    same = invoke("expand", FACTORY, "--into", "dbb", "-o", out, "--report", out)
    _one_error_line(same, "the same file")
    overwrite = invoke("expand", FACTORY, "--into", "dbb", "-w", other, "-o", other)
    _one_error_line(overwrite, "would overwrite the input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_load_expanded_refuses_other_files(tmp_path: Path):
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(UserInputError, match="not an expanded checkpoint"):
        load_expanded(plain)
    bad = tmp_path / "bad.pt"
    meta = {"format": "reparam.expanded", "format_version": 1, "model": "resnet18"}
    torch.save({"reparam": {**meta, "kwargs": {}, "family": "nope"}, "state_dict": {}}, bad)
    with pytest.raises(UserInputError, match="'family' must be one of"):
        load_expanded(bad)
    with pytest.raises(UserInputError, match="does not exist"):
        load_expanded(tmp_path / "missing.pt")


def test_fused_checkpoint_in_and_fused_checkpoint_out(tmp_path: Path):
    """A fused checkpoint expands (convs with bias, no BN); the trained expanded model,
    fused, is saved as a fused checkpoint of the plain model that ``reparam.load`` reads."""
    fused_in, out = tmp_path / "fused.pt", tmp_path / "expanded.pt"
    assert invoke("-q", "fuse", FACTORY, "-o", fused_in).exit_code == 0
    result = invoke("expand", fused_in, "--into", "repvgg", "-o", out, "--model", FACTORY)
    assert result.exit_code == 0, result.output
    rebuilt = load_expanded(out, model=FACTORY)
    assert rebuilt.reparam_expand["base"] == "deploy"
    want = _outputs(reparam.load(fused_in, model=FACTORY))
    torch.testing.assert_close(_outputs(rebuilt), want, rtol=1e-5, atol=1e-6)
    back = tmp_path / "back.pt"
    reparam.save_fused(reparam.fuse(rebuilt), back, ModelSpec(FACTORY))
    torch.testing.assert_close(
        _outputs(reparam.load(back, model=FACTORY)), want, rtol=1e-5, atol=1e-6
    )


def test_fuse_and_export_take_an_expanded_checkpoint(tmp_path: Path):
    """`reparam fuse train.pt` after `reparam expand … -o train.pt`: the file is rebuilt from
    its record (bundled model, family), fused back to the plain architecture, and checked."""
    expanded = tmp_path / "tiny-dbb.pt"
    assert invoke("expand", "acnet_tiny", "--into", "dbb", "-o", expanded).exit_code == 0
    fused = tmp_path / "tiny-fused.pt"
    result = invoke("fuse", expanded, "-o", fused, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["after"]["batchnorms"] == 0
    assert report["max_rel"] <= 1e-5
    training = load_expanded(expanded).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = training(x)
        actual = reparam.load(fused)(x)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fuse_refuses_a_file_that_is_neither_fused_nor_expanded(tmp_path: Path):
    plain = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    result = invoke("fuse", plain)
    assert result.exit_code == 1
    assert "is not a fused checkpoint" in result.output
