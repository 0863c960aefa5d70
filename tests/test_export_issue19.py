"""Issue 19, export side: shape ranges known and checked, export folds what fuse folds, .pt2
of ``forward(*xs)``, nothing lost when a command's paths collide or it is interrupted, and
quantize's hostile inputs. Each test failed before the change it names."""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_cli_export import assert_error
from torch import nn
from typer.testing import CliRunner

from reparam.cli.app import app
from reparam.errors import ExportError, UserInputError
from reparam.export import VerifyOptions, export_onnx, verify_onnx
from reparam.export.pt2 import export_pt2
from reparam.export.shape_ranges import METADATA_KEY, check_shapes, parse_ranges
from reparam.quantize import quantize_onnx

runner = CliRunner()
MODULE = __name__  # tests/ is on sys.path: factories below are named MODULE:callable


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


class WidthBranch(nn.Module):
    """Issue 19 case 1: a forward that branches on the input's width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) if x.shape[-1] > 32 else self.b(x)


def small_net() -> nn.Module:
    """A factory for the CLI: a conv net with a BN to fold and class scores."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    model.example_input_shapes = [(1, 3, 12, 12)]
    return model.eval()


class Untraceable(nn.Module):
    """Conv→BN that fx cannot trace (data-dependent control flow): only the probe folds it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.dim() == 4:  # fx cannot branch on a traced value; torch.export can
            y = torch.relu(y)
        return y


def untraceable_net() -> nn.Module:
    torch.manual_seed(0)
    model = Untraceable()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model.example_input_shapes = [(1, 3, 8, 8)]
    return model.eval()


# --- case 1: shape ranges known, recorded, checked ------------------------------------------


@pytest.fixture(scope="module")
def branch_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ranges") / "branch.onnx"
    torch.manual_seed(0)
    report = export_onnx(WidthBranch().eval(), path, torch.randn(1, 3, 40, 40), dynamic_hw=True)
    # the note names the axis, the valid range, the model's line and what to do
    note = next(n for n in report.notes if "valid for sizes 33.." in n)
    assert "axis 3" in note and "--static-hw" in note and "test_export_issue19.py" in note
    return path


def test_width_branch_records_the_valid_range(branch_onnx):
    metadata = {p.key: p.value for p in onnx.load(str(branch_onnx)).metadata_props}
    ranges = parse_ranges(metadata[METADATA_KEY])
    assert ranges["input"][3] == (33, None)  # before: no range, the graph 126% off at 24
    assert ranges["input"][2] == (1, None) and ranges["input"][0] == (1, None)


def test_the_graph_is_exact_inside_its_range_and_refused_outside(branch_onnx):
    torch.manual_seed(0)
    model = WidthBranch().eval()
    for size in (33, 40, 64):  # the low end of the range, the example, beyond it
        report = verify_onnx(model, branch_onnx, torch.randn(2, 3, 24, size))
        assert report.ok, report.summary()
    with pytest.raises(UserInputError, match=r"axis 3 has size 24.*33 or more"):
        verify_onnx(model, branch_onnx, torch.randn(1, 3, 24, 24))


def test_runtime_and_run_refuse_sizes_outside_the_range(branch_onnx, tmp_path):
    from reparam.runtime import load

    session = load(branch_onnx)
    with pytest.raises(UserInputError, match="axis 3 has size 24"):
        session.run(np.zeros((1, 3, 24, 24), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 24, 24), np.float32))
    assert_error(invoke("run", branch_onnx, "-i", tmp_path / "x.npy"), "axis 3", "33")


class SquareBranch(nn.Module):
    """A forward that branches on H == W: torch.export traces it with W tied to H."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) if x.shape[2] == x.shape[3] else self.b(x)


def test_axes_torch_ties_are_recorded_and_checked(tmp_path):
    from reparam.runtime import load

    path = tmp_path / "square.onnx"
    report = export_onnx(SquareBranch().eval(), path, torch.randn(1, 3, 32, 32), dynamic_hw=True)
    assert any("axis 3 must equal input 'input' axis 2" in note for note in report.notes)
    session = load(path)
    session.run(np.zeros((2, 3, 20, 20), np.float32))  # square: the traced branch
    # before: a 32x20 input ran the square branch's graph, 3.9 off, without a word
    with pytest.raises(UserInputError, match=r"axis 3 has size 20.*equal to input 'input' axis 2"):
        session.run(np.zeros((1, 3, 32, 20), np.float32))


def test_a_guard_comparing_two_axes_is_refused(tmp_path):
    # traced non-square, the graph holds the H != W branch: a range cannot say so
    with pytest.raises(ExportError, match=r"compares input sizes.*axis 2.*axis 3.*static-hw"):
        export_onnx(SquareBranch().eval(), tmp_path / "s.onnx", torch.randn(1, 3, 32, 20),
                    dynamic_hw=True)  # fmt: skip
    assert not list(tmp_path.iterdir())


class EvenBranch(nn.Module):
    """A forward that branches on the width's parity: no range can say 'even widths only'."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) if x.shape[-1] % 2 == 0 else self.b(x)


def test_the_graph_is_run_on_the_other_side_of_each_guard(tmp_path):
    # before: exported without a word, 3.3 off at odd widths
    with pytest.raises(ExportError, match=r"axis 3 = 33, where Eq\(Mod\(shape\[3\], 2\), 0\)"):
        export_onnx(EvenBranch().eval(), tmp_path / "e.onnx", torch.randn(1, 3, 32, 32),
                    dynamic_hw=True)  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_check_shapes_contract():
    metadata = {METADATA_KEY: json.dumps({"input": {"3": [33, None], "2": [4, 8]}})}
    check_shapes(metadata, {"input": (1, 3, 8, 33)})
    check_shapes({}, {"input": (1, 3, 1, 1)})  # no ranges recorded: nothing to check
    with pytest.raises(UserInputError, match=r"axis 2 has size 9.*4 to 8"):
        check_shapes(metadata, {"input": (1, 3, 9, 40)})
    with pytest.raises(UserInputError, match="malformed"):
        check_shapes({METADATA_KEY: "{not json"}, {"input": (1,)})


def test_legacy_exporter_branch_is_caught_at_half_the_size(tmp_path):
    # The TorchScript exporter records no guard: the dynamic check runs half the example.
    with pytest.raises(ExportError, match=r"wrong at half the example height/width.*static"):
        export_onnx(WidthBranch().eval(), tmp_path / "b.onnx", torch.randn(1, 3, 40, 40),
                    dynamic_hw=True, exporter="legacy")  # fmt: skip
    assert not list(tmp_path.iterdir())


# --- case 7: export folds what fuse folds ------------------------------------------------


def test_export_of_an_untraceable_model_folds_its_batchnorm(tmp_path):
    model = untraceable_net()
    report = export_onnx(model, tmp_path / "u.onnx", torch.randn(2, 3, 8, 8), verify=True)
    # before: fused without the example, so nothing was folded (and the report said so)
    assert report.fuse_report.probed is True
    assert report.fuse_report.blocks["Conv+BatchNorm"] == 1
    assert "BatchNormalization" not in report.node_counts
    assert report.check.ok


# --- case 8: .pt2 of forward(*xs) ---------------------------------------------------------


class Varargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, *xs):
        return sum(self.bn(self.conv(x)) for x in xs)


def test_pt2_of_a_varargs_forward(tmp_path):
    torch.manual_seed(0)
    model = Varargs().eval()
    xs = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    path = export_pt2(model, tmp_path / "v.pt2", xs)  # before: a truncated torch error
    program = torch.export.load(str(path)).module()
    other = (torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(program(*other), model(*other), rtol=1e-5, atol=1e-5)


def test_pt2_failure_is_one_short_line(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return x[: int(x.sum().item() > 0) + 1]  # data-dependent size

    with pytest.raises(ExportError) as caught:
        export_pt2(Bad(), tmp_path / "b.pt2", torch.randn(2, 3), fuse=False)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    assert not list(tmp_path.iterdir())


# --- nothing lost when paths collide or a step fails --------------------------------------


@pytest.fixture
def existing(tmp_path) -> Path:
    path = tmp_path / "e.onnx"
    path.write_bytes(b"the user's previous file")
    return path


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--calibration", "missing.npy"], "does not exist"),
        (["-c", "wrong.npy"], "shape"),
        (["--int8-output", "q.txt"], ".onnx"),
        (["--int8-output", "e.onnx"], "same file"),
        (["--report", "e.onnx"], "same file"),
    ],
    ids=["missing", "wrong-shape", "int8-suffix", "int8-is-output", "report-is-output"],
)
def test_export_int8_refuses_before_any_work_and_keeps_the_old_file(
    existing, extra, fragment, monkeypatch
):
    monkeypatch.chdir(existing.parent)
    np.save("wrong.npy", np.zeros((8, 3, 5, 5), np.float32))
    import reparam.export as export_package

    def no_export(*args, **kwargs):  # the refusal must come first
        raise AssertionError("export ran")

    monkeypatch.setattr(export_package, "export_onnx", no_export)
    assert_error(
        invoke("export", f"{MODULE}:small_net", "-o", "e.onnx", "--int8", *extra), fragment
    )
    assert existing.read_bytes() == b"the user's previous file"


def test_export_int8_failure_after_export_replaces_nothing(existing, monkeypatch):
    import reparam.quantize as quantize_package

    def interrupted(*args, **kwargs):  # e.g. SIGTERM (the CLI raises) during the INT8 step
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_package, "quantize_onnx", interrupted)
    result = invoke("export", f"{MODULE}:small_net", "-o", existing, "--int8")
    assert result.exit_code != 0
    assert existing.read_bytes() == b"the user's previous file"  # before: replaced
    assert sorted(p.name for p in existing.parent.iterdir()) == ["e.onnx"]  # no temporaries


def test_export_int8_with_short_calibration_option_writes_both(tmp_path):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((24, 3, 12, 12), np.float32))
    result = invoke(
        "export", f"{MODULE}:small_net", "-o", tmp_path / "m.onnx", "--int8",
        "-c", tmp_path / "calib.npy",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "m-int8.onnx", "m.onnx"]


def test_a_249_character_output_name_is_written(tmp_path):
    name = "m" * 244 + ".onnx"  # 249 characters: legal; the temporary name must be short
    export_onnx(small_net(), tmp_path / name, torch.randn(1, 3, 12, 12))
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_quantize_output_and_report_collide(tmp_path):
    model = tmp_path / "a.onnx"
    export_onnx(small_net(), model, torch.randn(1, 3, 12, 12))
    result = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--report", tmp_path / "q.onnx")
    assert_error(result, "same file")
    assert not (tmp_path / "q.onnx").exists()


def test_ctrl_c_while_the_exporter_imports_is_an_interruption(monkeypatch, tmp_path):
    from reparam.export import _torch_exporter

    def export(*args, **kwargs):  # a half-done import surfacing as an AttributeError
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch.onnx' has no attribute '_internal'") from None

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(KeyboardInterrupt):
        _torch_exporter.run_exporter(
            nn.Identity(), (torch.randn(2, 3),), opset=None, dynamic_batch=True,
            dynamic_hw=False, corr="standard", exporter="dynamo", input_names=["input"],
            output_names=None,
        )  # fmt: skip


# --- quantize's hostile inputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    export_onnx(small_net(), path, torch.randn(1, 3, 12, 12))
    return path


def test_quantize_reads_a_fifo(fp32, tmp_path):
    fifo = tmp_path / "calib.npy"
    os.mkfifo(fifo)
    data = np.random.default_rng(0).random((24, 3, 12, 12), np.float32)
    import threading

    buffer = io.BytesIO()
    np.save(buffer, data)

    def feed() -> None:
        with open(fifo, "wb") as stream:
            stream.write(buffer.getvalue())

    writer = threading.Thread(target=feed)
    writer.start()
    report = quantize_onnx(fp32, tmp_path / "q.onnx", calibration=fifo, batch_sizes=(1,))
    writer.join()
    assert report.calibration_samples > 0  # before: "does not exist"


def test_quantize_symbolic_hw_with_calibration(tmp_path):
    path = tmp_path / "hw.onnx"
    export_onnx(small_net(), path, torch.randn(1, 3, 12, 12), dynamic_hw=True)
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((24, 3, 20, 16), np.float32))
    report = quantize_onnx(path, tmp_path / "q.onnx", calibration=tmp_path / "c.npy",
                           batch_sizes=(1,))  # fmt: skip
    assert report.cosine > 0.99


def test_quantizing_a_quantized_graph_is_refused(fp32, tmp_path):
    quantized = tmp_path / "q.onnx"
    with pytest.warns(UserWarning):
        quantize_onnx(fp32, quantized, batch_sizes=(1,))
    with pytest.raises(UserInputError, match="already quantized"):
        quantize_onnx(quantized, tmp_path / "qq.onnx", batch_sizes=(1,))


def test_float64_calibration_of_1e300_is_refused(fp32, tmp_path):
    np.save(tmp_path / "c.npy", np.full((8, 3, 12, 12), 1e300))
    with pytest.raises(UserInputError, match="magnitude"):
        quantize_onnx(fp32, tmp_path / "q.onnx", calibration=tmp_path / "c.npy")


def test_nothing_to_quantize_is_refused_from_the_graph(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(20000)]
    graph = helper.make_graph(
        nodes, "relus",
        [helper.make_tensor_value_info("v0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("v20000", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    path = tmp_path / "relus.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(UserInputError, match="nothing to quantize"):
        quantize_onnx(path, tmp_path / "q.onnx")


def test_quantize_leaves_no_temporary_folder_when_interrupted(fp32, tmp_path, monkeypatch):
    import onnxruntime.quantization as ort_quantization

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def interrupted(*args, **kwargs):
        tempfile.mkdtemp(prefix="ort.quant.")  # what onnxruntime makes on its own
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_quantization, "quantize_static", interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        quantize_onnx(fp32, tmp_path / "q.onnx", batch_sizes=(1,))
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "q.onnx").exists()


def test_a_full_tmpdir_is_one_line(fp32, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(UserInputError, match="TMPDIR"), pytest.warns(UserWarning):
        quantize_onnx(fp32, tmp_path / "q.onnx", batch_sizes=(1,))


# --- verification options validated once, in the library ---------------------------------


def test_verify_options_are_checked_and_floored_for_float16():
    with pytest.raises(UserInputError, match="rtol"):
        VerifyOptions(rtol=float("nan"))
    with pytest.raises(UserInputError, match="batch_sizes"):
        VerifyOptions(batch_sizes=(0,))
    floored = VerifyOptions(rtol=1e-6, atol=0).for_dtype(half=True)
    assert (floored.rtol, floored.atol) == (1e-2, 1e-3)
    assert VerifyOptions(rtol=1e-6).for_dtype(half=False).rtol == 1e-6


# --- --format openvino / executorch (helper modules from reparam.runtime / reparam.export) --


def test_export_openvino_writes_xml_and_bin_only(tmp_path):
    pytest.importorskip("reparam.runtime.openvino")
    ov = pytest.importorskip("openvino")
    result = invoke("export", f"{MODULE}:small_net", "--format", "openvino", "-o",
                    tmp_path / "m.xml", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verify_openvino"]["ok"]  # the IR verified in OpenVINO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # no temporaries
    # the same model (the CLI randomises BN statistics by its seed) exported to ONNX
    onnx_path = tmp_path.parent / f"{tmp_path.name}-m.onnx"
    assert invoke("export", f"{MODULE}:small_net", "-o", onnx_path).exit_code == 0
    from reparam.runtime import load

    # f32 explicitly: OpenVINO computes in bf16 by default on CPUs that have it
    compiled = ov.Core().compile_model(
        str(tmp_path / "m.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    expected = next(iter(load(onnx_path).run(x).values()))
    got = next(iter(compiled(x).values()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_export_openvino_bin_collides_with_report(tmp_path):
    pytest.importorskip("reparam.runtime.openvino")
    result = invoke("export", f"{MODULE}:small_net", "--format", "openvino", "-o",
                    tmp_path / "m.xml", "--report", tmp_path / "m.bin")  # fmt: skip
    assert_error(result, "same file")
    assert list(tmp_path.iterdir()) == []


def test_export_executorch_writes_a_pte(tmp_path):
    pytest.importorskip("reparam.export.executorch")
    pytest.importorskip("executorch")
    result = invoke("export", f"{MODULE}:small_net", "--format", "executorch", "-o",
                    tmp_path / "m.pte")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["m.pte"]


def test_export_int8_reads_a_fifo_calibration_once(tmp_path):
    import threading

    fifo = tmp_path / "calib.npy"
    os.mkfifo(fifo)
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).random((24, 3, 12, 12), np.float32))

    def feed() -> None:  # a FIFO gives its data once: checked and quantized from one read
        with open(fifo, "wb") as stream:
            stream.write(buffer.getvalue())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = invoke("export", f"{MODULE}:small_net", "-o", tmp_path / "m.onnx", "--int8",
                    "-c", fifo)  # fmt: skip
    writer.join(timeout=5)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m-int8.onnx").is_file()
