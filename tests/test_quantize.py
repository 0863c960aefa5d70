"""``reparam quantize`` / ``quantize_onnx``: static INT8, measured, gated, bad input refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from reparam.cli.quantize_cmd import quantize
from reparam.errors import ExportError, UserInputError
from reparam.quantize import QuantizeReport, quantize_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

runner = CliRunner()
cli = typer.Typer()
cli.command()(quantize)
FAST = {"batch_sizes": (1,)}  # timing a second batch size adds nothing to these checks


class SmallNet(torch.nn.Module):
    """Conv-ReLU-Conv-pool-Linear: a fused CNN in miniature, with class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1, stride=2),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(fp32 .onnx path, calibration .npy path) for SmallNet at 3x16x16."""
    from reparam.export import export_onnx

    folder = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    model = SmallNet().eval()
    path = folder / "small.onnx"
    export_onnx(model, path, torch.randn(2, 3, 16, 16))
    data = np.random.default_rng(0).random((60, 3, 16, 16), dtype=np.float32)
    calibration = folder / "calibration.npy"
    np.save(calibration, data)
    return path, calibration


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_quantize_writes_a_qdq_graph_and_measures_it(small, tmp_path):
    path, calibration = small
    before = path.read_bytes()
    out = tmp_path / "small-int8.onnx"
    report = quantize_onnx(path, out, calibration=calibration, batch_sizes=(1, 4))
    assert path.read_bytes() == before  # input untouched
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert report.output_path == out and report.int8_bytes == out.stat().st_size
    assert report.fp32_bytes == path.stat().st_size
    assert report.calibration_samples == 48 and report.held_out_samples == 12
    assert set(report.latency_ms) == {1, 4}
    assert all(ms > 0 for pair in report.latency_ms.values() for ms in pair)
    assert 0.98 <= report.cosine <= 1.0 and 0 < report.max_rel < 0.2
    assert report.agreement is not None and 0.8 <= report.agreement <= 1.0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["latency_ms"]["1"]["speedup"] == pytest.approx(report.speedup(1))
    assert "cosine vs fp32" in str(report)
    # The INT8 graph runs and stays close on a new input.
    import onnxruntime as ort

    x = np.random.default_rng(5).random((3, 3, 16, 16), dtype=np.float32)
    (ref,) = ort.InferenceSession(str(path)).run(None, {"input": x})
    (got,) = ort.InferenceSession(str(out)).run(None, {"input": x})
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.98


def test_gates_fail_with_the_numbers_and_write_nothing(small, tmp_path):
    path, calibration = small
    out = tmp_path / "gated.onnx"
    with pytest.raises(ExportError, match=r"cosine to fp32 0\.\d+ < --min-cosine 1.0") as info:
        quantize_onnx(path, out, calibration=calibration, min_cosine=1.0, **FAST)
    assert "nothing written" in str(info.value) and not out.exists()
    report = quantize_onnx(
        path, out, calibration=calibration, min_cosine=0.9, min_agreement=0.5, **FAST
    )
    assert out.exists() and report.cosine >= 0.9


def test_per_tensor_and_entropy_are_honoured(small, tmp_path):
    path, calibration = small
    out = tmp_path / "pt.onnx"
    report = quantize_onnx(path, out, calibration=calibration, per_channel=False, **FAST)
    assert not report.per_channel and "per tensor" in str(report)
    scales = [
        init
        for init in onnx.load(str(out)).graph.initializer
        if init.name.endswith("_scale") and "weight" in init.name
    ]
    assert scales and all(len(s.dims) == 0 for s in scales)  # one scale per weight tensor


def test_layer_report_lists_quantized_layers(small, tmp_path):
    path, calibration = small
    report = quantize_onnx(
        path, tmp_path / "l.onnx", calibration=calibration, report_layers=True, **FAST
    )
    assert report.layers and {layer.op_type for layer in report.layers} <= {"Conv", "Gemm"}
    assert all(-1 <= layer.cosine <= 1 for layer in report.layers)
    added = [layer.added for layer in report.layers]
    assert added == sorted(added, reverse=True)


def test_random_calibration_warns_loudly(small, tmp_path):
    path, _ = small
    with pytest.warns(UserWarning, match="only good for smoke tests"):
        report = quantize_onnx(path, tmp_path / "r.onnx", **FAST)
    assert "random" in report.calibration and "smoke tests" in report.notes[0]


def test_dynamic_quantization_of_a_conv_net_is_refused(small, tmp_path):
    path, calibration = small
    with pytest.raises(UserInputError, match="slower"):
        quantize_onnx(path, tmp_path / "d.onnx", calibration=calibration, dynamic=True)


def test_drconv_correlation_stays_float(tmp_path):
    from reparam.blocks.drconv import DRConv2d
    from reparam.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), DRConv2d(8, 8, 3, region_num=2, padding=1)
    ).eval()
    path = tmp_path / "dr.onnx"
    export_onnx(model, path, torch.randn(2, 3, 8, 8))
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((20, 3, 8, 8), dtype=np.float32))
    report = quantize_onnx(path, tmp_path / "dr8.onnx", calibration=tmp_path / "c.npy", **FAST)
    assert report.excluded_nodes and any("kept in float" in note for note in report.notes)
    kinds = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    assert {kinds[name] for name in report.excluded_nodes} == {"Conv", "MatMul"}  # guide, corr
    # Untrained region scores are near ties, so int8 noise still flips some region choices.
    assert report.cosine > 0.9


def test_cli_prints_the_report_and_json(small, tmp_path):
    path, calibration = small
    out = tmp_path / "cli.onnx"
    args = [str(path), "-o", str(out), "-c", str(calibration), "--batch-sizes", "1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "cosine vs fp32" in result.output and "latency batch 1" in result.output
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["output_path"] == str(out)


def test_cli_gate_exits_1_with_one_line(small, tmp_path):
    path, calibration = small
    out = tmp_path / "g.onnx"
    args = [str(path), "-o", str(out), "-c", str(calibration), "--batch-sizes", "1"]
    result = runner.invoke(cli, [*args, "--min-cosine", "1"])
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.count("error:") == 1 and "--min-cosine" in result.stderr


def _bad_inputs(folder, small_path):
    not_onnx = folder / "notes.onnx"
    not_onnx.write_text("hello")
    wrong_shape = folder / "shape.npy"
    np.save(wrong_shape, np.zeros((4, 3, 9, 9), np.float32))
    wrong_rank = folder / "rank.npy"
    np.save(wrong_rank, np.zeros((3, 16, 16), np.float32))
    wrong_dtype = folder / "dtype.npy"
    np.save(wrong_dtype, np.zeros((4, 3, 16, 16), np.int64))
    objects = folder / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    empty = folder / "empty"
    empty.mkdir()
    text = folder / "data.txt"
    text.write_text("1 2 3")
    return {
        "not-onnx": ([str(not_onnx)], "not a readable ONNX model"),
        "missing-model": ([str(folder / "none.onnx")], "does not exist"),
        "wrong-shape": ([str(small_path), "-c", str(wrong_shape)], "has shape (4, 3, 9, 9)"),
        "wrong-rank": ([str(small_path), "-c", str(wrong_rank)], "rank 4"),
        "wrong-dtype": ([str(small_path), "-c", str(wrong_dtype)], "dtype int64"),
        "object-array": ([str(small_path), "-c", str(objects)], "not a numeric array"),
        "empty-folder": ([str(small_path), "-c", str(empty)], "has no .npy or .npz files"),
        "not-npy": ([str(small_path), "-c", str(text)], "must be an .npy or .npz"),
        "output-is-input": ([str(small_path), "-o", str(small_path)], "overwrite the input"),
        "bad-gate": ([str(small_path), "--min-agreement", "2"], "between 0 and 1"),
    }


CASES = [
    "not-onnx",
    "missing-model",
    "wrong-shape",
    "wrong-rank",
    "wrong-dtype",
    "object-array",
    "empty-folder",
    "not-npy",
    "output-is-input",
    "bad-gate",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line(case, small, tmp_path):
    path, _ = small
    args, message = _bad_inputs(tmp_path, path)[case]
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "out.onnx")]
    before = path.read_bytes()
    result = runner.invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("error:") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists() and path.read_bytes() == before


def test_report_is_a_dataclass_with_speedup():
    report = QuantizeReport("a.onnx", None, "minmax", True, "x", 1, 1, 10, 5)
    report.latency_ms[1] = (4.0, 1.0)
    assert report.speedup(1) == 4.0 and report.to_dict()["output_path"] is None


def test_quantize_writes_nothing_into_the_current_directory(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference saves a debug copy of a graph it cannot finish
    (DRConv's region-first graph) into the current directory; quantize must not run it."""
    from reparam.blocks.drconv import DRConv2d
    from reparam.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), DRConv2d(8, 8, 3, region_num=8, padding=1)
    ).eval()
    files = tmp_path / "files"
    files.mkdir()
    path = files / "dr.onnx"
    export_onnx(model, path, torch.randn(2, 1, 8, 8))
    np.save(files / "c.npy", np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    quantize_onnx(path, files / "dr8.onnx", calibration=files / "c.npy", **FAST)
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in files.iterdir()) == ["c.npy", "dr.onnx", "dr8.onnx"]
