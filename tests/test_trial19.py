"""Issue 19 tried one step beside the helpers' own fixtures, as a new user would: each
defect found that way, pinned (a failing test first, then the fix)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reparam.cli.app import app
from reparam.errors import UserInputError

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


DATA_DEPENDENT = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if float(y.mean()) > -1e9:  # data-dependent: torch.export cannot keep it
            y = y * 2
        return y


def build():
    return Net().eval()
"""


def test_export_refusal_of_data_dependent_forward_is_one_line(tmp_path: Path) -> None:
    # torch.fx's symbolic-shapes logger printed its own "W… Unable to find user code" line
    # (through torch's handler, on the real stderr) before reparam's one error line.
    (tmp_path / "ddnet.py").write_text(DATA_DEPENDENT)
    code = "import sys\nfrom reparam.cli import main\nsys.argv = ['reparam', *sys.argv[1:]]\nmain()"
    args = ["export", "ddnet:build", "-s", "1,3,8,8", "-o", "dd.onnx"]
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("… ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "ddnet.py" in lines[0] and "line 13" in lines[0], lines[0]
    assert not (tmp_path / "dd.onnx").exists()


UNTRACEABLE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        if y.shape[-1] > 0:  # fx cannot trace a branch on a size; torch.export can
            y = self.bn2(self.c2(y))
        return y


def build():
    torch.manual_seed(0)
    net = Net()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.8, 1.2)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.eval()
"""


def test_expand_of_untraceable_factory_fuses_back(tmp_path: Path, monkeypatch) -> None:
    # `reparam expand` of a model fx cannot trace found its pairs on the -s probe, but the
    # file rebuilt without one: `reparam fuse ./ex.pt --model …` failed with "11 missing
    # keys", and expand's own report said "same architecture NO" (898 vs 862 parameters)
    # because it fused the original without the probe.
    import torch

    from reparam.convert import fuse
    from reparam.expansion_checkpoint import load_expanded

    (tmp_path / "untrnet.py").write_text(UNTRACEABLE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import untrnet

    torch.save(untrnet.build().state_dict(), tmp_path / "w.pt")
    ex = tmp_path / "ex.pt"
    result = invoke(
        "expand", "untrnet:build", "-w", "w.pt", "--into", "repvgg", "-s", "1,3,16,16",
        "-o", ex, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    params = json.loads(result.stdout)["parameters"]
    assert params["fused_back"] == params["original_fused"] == 662, params
    expanded = load_expanded(ex, model="untrnet:build").eval()
    fused = tmp_path / "f.pt"
    result = invoke("fuse", ex, "--model", "untrnet:build", "-o", fused)
    assert result.exit_code == 0, result.output
    x = 4 * torch.randn(2, 3, 20, 12)
    with torch.no_grad():
        want = untrnet.build()(x)
        got = fuse(expanded, example_inputs=x)(x)
    assert ((want - got).abs().max() / want.abs().max()).item() < 1e-5


def test_openvino_ir_under_onnxruntime_says_which_runtime(tmp_path: Path) -> None:
    # `reparam run x.xml` / `reparam verify x.xml -m M` (default runtime onnxruntime) said
    # "not a readable ONNX model: DecodeError: … Wire format was corrupt".
    xml = tmp_path / "net.xml"
    xml.write_text('<?xml version="1.0"?>\n<net name="n" version="11"></net>\n')
    for args in (("run", xml), ("verify", xml, "-m", "acnet_tiny")):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        (line,) = error_lines(result)
        assert "OpenVINO" in line and "--runtime openvino" in line, line
        assert "DecodeError" not in line, line


def test_linear_batchnorm1d_on_3d_output_says_why_it_is_left() -> None:
    # Linear over the last axis of (N, C, L) then BatchNorm1d(C): rightly not folded, but
    # with example_inputs the report said its input "is not the output of a conv or Linear
    # that nothing else reads" although it is fc's output, read by nothing else.
    import torch
    from torch import nn

    from reparam.convert import fuse_with_report

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.bn1 = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn1(self.fc(x))

    net = Net().eval()
    net.bn1.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 6)
    fused, report = fuse_with_report(net, example_inputs=x)
    assert torch.allclose(fused(x), net(x), atol=1e-6)
    ((path, reason),) = report.not_fused
    assert path == "bn1" and "after fc" in reason and "not 2-D" in reason, reason


def test_report_never_calls_a_checked_switch_to_deploy_unverified() -> None:
    # The report said "its own switch_to_deploy() is used as it is, unchecked" beside
    # "converted by switch_to_deploy(), checked equal on probe inputs": every such call is
    # checked (and undone on a mismatch), so the first line misled.
    import torch
    from torch import nn

    from reparam.convert import fuse_with_report

    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) * 2

        def switch_to_deploy(self) -> None:
            self.conv.weight.data.mul_(2)
            self.conv.bias.data.mul_(2)
            self.forward = self.conv.forward

    _, report = fuse_with_report(
        nn.Sequential(Own()).eval(), example_inputs=torch.randn(1, 3, 8, 8)
    )
    text = str(report)
    assert "converted by switch_to_deploy(), checked" in text, text
    assert "unchecked" not in text, text


def test_batchnorm_the_forward_skips_or_shares_is_reported_as_such() -> None:
    # A Sequential(Conv, BN) whose forward runs only the conv (and a BN called twice):
    # rightly left, but the report said the BN's input "is not the output of a conv or
    # Linear that nothing else reads", although the BN never ran (or ran twice).
    import torch
    from torch import nn

    from reparam.convert import fuse_with_report

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.conv = nn.Conv2d(4, 4, 1)
            self.shared = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.seq[0](x)
            if float(y.detach().sum()) > -1e30:  # fx cannot trace it: pairs from the probe
                y = self.shared(self.shared(self.conv(y)))
            return y

    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    fused, report = fuse_with_report(net, example_inputs=x)
    assert torch.allclose(fused(x), net(x), atol=1e-6)
    reasons = dict(report.not_fused)
    assert "does not run it" in reasons["seq.1"], reasons
    assert "runs it 2 times" in reasons["shared"], reasons


def test_fused_file_with_nan_weights_is_refused_on_load(tmp_path: Path) -> None:
    # fuse refuses NaN weights, but a fused file edited to hold NaN loaded silently
    # (outputs all NaN), and `reparam export` of it blamed the ONNX graph ("differs").
    import torch

    from reparam.errors import UserInputError
    from reparam.fused_format import load

    path = tmp_path / "f.pt"
    assert invoke("fuse", "acnet_tiny", "-o", path).exit_code == 0
    obj = torch.load(path, weights_only=True)
    key = next(iter(obj["state_dict"]))
    obj["state_dict"][key] = torch.full_like(obj["state_dict"][key], float("nan"))
    torch.save(obj, path)
    try:
        load(path)
    except UserInputError as error:
        assert "holds NaN" in str(error) and key in str(error), error
    else:
        raise AssertionError("a fused file holding NaN loaded")
    result = invoke("export", path, "-o", tmp_path / "e.onnx")
    assert result.exit_code == 1 and "holds NaN" in error_lines(result)[0], result.output


def test_nan_weights_given_to_fuse_are_named_as_the_cause(tmp_path: Path) -> None:
    # `reparam fuse M -w nan.pt` said "the folded kernel is not finite", blaming the fold
    # for NaN that was in the checkpoint.
    import torch

    from reparam.models import create_model

    state = create_model("acnet_tiny").state_dict()
    key = next(k for k in state if k.endswith("running_mean"))
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    result = invoke("fuse", "acnet_tiny", "-w", tmp_path / "nan.pt", "-o", tmp_path / "f.pt")
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert "running_mean holds inf or NaN already" in line, line
    assert not (tmp_path / "f.pt").exists()


REUSE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        c = self.seq[0](x)
        y = self.seq[1](c)
        if float(y.detach().sum()) > -1e30:  # fx cannot trace it
            y = y + c  # the raw conv output is reused: not a pair
        return y


def build():
    return Net().eval()
"""


def test_fuse_cli_prints_its_whole_reason(tmp_path: Path, monkeypatch) -> None:
    # The CLI cut reparam's own "not fused" reason at 160 characters ("it stays a
    # BatchNorm (a per-chan… (188 characters)"), as if it were a hostile user value.
    (tmp_path / "reusenet.py").write_text(REUSE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("fuse", "reusenet:build", "-s", "1,3,8,8", "-o", tmp_path / "f.pt")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("  seq.1:"))
    assert "characters)" not in line and line.endswith("in eval mode)"), line


def test_adoption_refusal_names_the_tensor_whose_shape_differs() -> None:
    # A RepVGG copy with an SE of another width than reparam builds: the reason read
    # "does not load into RepVGGBlock: RuntimeError: Error(s) in loading state_dict for
    # RepVGGBlock:" and stopped there, naming nothing.
    import torch
    from torch import nn

    from reparam.adopt.check import adopt_one
    from reparam.adopt.layouts import LAYOUTS
    from reparam.errors import FusionError

    class SE(nn.Module):
        def __init__(self, channels: int, inner: int) -> None:
            super().__init__()
            self.down = nn.Conv2d(channels, inner, 1)
            self.up = nn.Conv2d(inner, channels, 1)

        def forward(self, x):
            s = torch.relu(self.down(nn.functional.avg_pool2d(x, x.size(3))))
            return x * torch.sigmoid(self.up(s))

    def conv_bn(k: int) -> nn.Sequential:
        seq = nn.Sequential()
        seq.add_module("conv", nn.Conv2d(8, 8, k, padding=k // 2, bias=False))
        seq.add_module("bn", nn.BatchNorm2d(8))
        return seq

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.nonlinearity = nn.ReLU()
            self.se = SE(8, 2)
            self.rbr_identity = nn.BatchNorm2d(8)
            self.rbr_dense = conv_bn(3)
            self.rbr_1x1 = conv_bn(1)

        def forward(self, x):
            y = self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x)
            return self.nonlinearity(self.se(y))

    layout = next(lay for lay in LAYOUTS if lay.name == "RepVGG block")
    with pytest.raises(FusionError) as caught:
        adopt_one(Block().eval(), layout)
    text = str(caught.value)
    assert "does not load into RepVGGBlock" in text, text
    assert "size mismatch for se.down.weight" in text, text


def test_dynamic_hw_with_a_static_program_format_is_refused(tmp_path: Path) -> None:
    # `--format pt2 --dynamic-hw` wrote a program fixed at the probe's size (a 40x40 input
    # then failed its guard "x.size()[2] == 48"), saying nothing of the ignored flag.
    out = tmp_path / "m.pt2"
    result = invoke("export", "acnet_tiny", "--format", "pt2", "--dynamic-hw", "-o", out)
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert "--dynamic-hw does not apply to --format pt2" in line, line
    assert not out.exists()


class _ACCopy:
    """A pasted ACBlock (published attribute names) whose forward halves its output past a
    size or batch no fixed probe reaches; built in the test (torch is imported lazily)."""

    @staticmethod
    def make(kind: str):
        import torch
        from torch import nn

        class Copy(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.square_conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
                self.square_bn = nn.BatchNorm2d(6)
                self.ver_conv = nn.Conv2d(3, 6, (3, 1), padding=(1, 0), bias=False)
                self.ver_bn = nn.BatchNorm2d(6)
                self.hor_conv = nn.Conv2d(3, 6, (1, 3), padding=(0, 1), bias=False)
                self.hor_bn = nn.BatchNorm2d(6)

            def forward(self, x):
                y = self.square_bn(self.square_conv(x)) + self.ver_bn(self.ver_conv(x))
                y = y + self.hor_bn(self.hor_conv(x))
                if kind == "value":  # an input scaled 0..255 instead of normalised
                    return y * 0.5 if float(x.mean()) > 5 else y
                big = x.shape[-1] > 40 if kind == "width" else x.shape[0] > 3
                return y * 0.5 if big else y

        torch.manual_seed(0)
        model = nn.Sequential(Copy(), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
        return model


@pytest.mark.parametrize(("kind", "shape"), [("width", (1, 3, 8, 64)), ("batch", (8, 3, 8, 8))])
def test_copy_branching_past_every_fixed_probe_is_not_adopted(kind, shape) -> None:
    # Adopted after probes at 12-32 px and batch <= 2 (and the 32x32 example): the fused
    # model was 0.78 off at 64 px (0.84 at batch 8) and the report said "same outputs on
    # every probe input". Now the copy's own size guard is probed on its other side.
    import torch

    from reparam.convert import fuse_with_report

    model = _ACCopy.make(kind)
    fused, report = fuse_with_report(model, example_inputs=torch.randn(2, 3, 32, 32))
    x = torch.randn(*shape)
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert ((want - got).abs().max() / want.abs().max()).item() < 1e-5
    (reason,) = [r for p, r in report.not_fused if p == "0"]
    assert "the other side of" in reason and "shape[" in reason, reason


def test_own_switch_to_deploy_checked_past_every_fixed_probe() -> None:
    # A third-party block whose training form halves its output past 40 px and whose
    # switch_to_deploy() drops that: "converted by switch_to_deploy(), checked equal on
    # probe inputs", and the fused model was 0.86 off at 64 px.
    import torch
    from torch import nn

    from reparam.convert import fuse_with_report

    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.deployed = False

        def forward(self, x):
            y = self.conv(x)
            return y * 0.5 if not self.deployed and x.shape[-1] > 40 else y

        def switch_to_deploy(self) -> None:
            self.deployed = True

    torch.manual_seed(0)
    model = nn.Sequential(Own(), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    fused, report = fuse_with_report(model, example_inputs=torch.randn(2, 3, 32, 32))
    x = torch.randn(1, 3, 16, 64)
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert ((want - got).abs().max() / want.abs().max()).item() < 1e-5
    assert any("changes what it computes" in r for p, r in report.not_fused if p == "0"), report


def test_copy_branching_on_input_values_is_not_adopted() -> None:
    # `y * 0.5 if float(x.mean()) > 5 else y`: every probe has mean ~0, so the copy was
    # adopted and 1.00 off on 0..255 inputs. No probe can show both sides: refused.
    import torch

    from reparam.convert import fuse_with_report

    model = _ACCopy.make("value")
    fused, report = fuse_with_report(model, example_inputs=torch.randn(2, 3, 16, 16))
    x = 255 * torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert ((want - got).abs().max() / want.abs().max()).item() < 1e-5
    (reason,) = [r for p, r in report.not_fused if p == "0"]
    assert "branches on its input's values" in reason and "test_trial19.py:" in reason, reason


def test_calibration_outside_the_recorded_range_names_the_calibration_data(tmp_path: Path) -> None:
    # A graph valid for widths >= 33 (the model branches on it), calibrated with 24x24
    # samples: the refusal read like the user's model input ("input 'input' axis 3 has
    # size 24 ... re-export with static sizes"), never naming the calibration file.
    import numpy as np
    import torch
    from test_export_issue19 import WidthBranch

    from reparam.export import export_onnx
    from reparam.quantize import quantize_onnx

    graph = tmp_path / "g.onnx"
    export_onnx(WidthBranch().eval(), graph, torch.randn(1, 3, 40, 40), dynamic_hw=True)
    calibration = tmp_path / "cal24.npy"
    np.save(calibration, np.random.default_rng(0).standard_normal((4, 3, 24, 24), np.float32))
    with pytest.raises(UserInputError) as caught:
        quantize_onnx(graph, tmp_path / "q.onnx", calibration=calibration)
    text = str(caught.value)
    assert text.startswith("calibration data") and "cal24.npy" in text and "33" in text, text
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("fmt", ["pt2", "executorch"])
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--corr", "custom"], "--corr custom"),
        (["--opset", "17"], "--opset 17"),
        (["--exporter", "legacy"], "--exporter legacy"),
        (["--opset", "18", "--corr", "custom"], "--opset 18, --corr custom"),
    ],
)
def test_onnx_only_options_with_a_program_format_are_refused(tmp_path, fmt, flags, named):
    # `--format pt2 --corr custom` wrote a program with DRConv's correlation in standard ops
    # and said nothing of the ignored flag (as --opset and --exporter).
    out = tmp_path / ("m.pt2" if fmt == "pt2" else "m.pte")
    result = invoke("export", "acnet_tiny", "--format", fmt, *flags, "-o", out)
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert f"{named} appl" in line and f"not to --format {fmt}" in line, line
    assert not out.exists()
    # the defaults named explicitly change nothing, so they are accepted
    if fmt == "pt2":
        ok = invoke("export", "acnet_tiny", "--format", "pt2", "--corr", "standard", "-o", out)
        assert ok.exit_code == 0, ok.output
        assert out.exists()


def test_verify_an_openvino_ir_with_runtime_all_runs_openvino_only(tmp_path):
    # `verify model.xml --runtime all` failed on the onnxruntime side (it cannot read IR)
    # instead of checking the IR where it runs.
    xml = tmp_path / "m.xml"
    assert invoke("export", "acnet_tiny", "--format", "openvino", "-o", xml).exit_code == 0
    for runtime in ("all", "onnxruntime,openvino"):
        result = invoke("verify", xml, "-m", "acnet_tiny", "--runtime", runtime, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["ok"] and list(data["runtimes"]) == ["openvino"], data
        assert "onnxruntime skipped" in result.stderr
