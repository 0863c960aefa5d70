"""OpenVINO: IR conversion (Corr inlined, fp16, INT8 QDQ), the OpenVINO session, verification
of every bundled family within 1e-4, atomic writes, and the one-line errors (not installed,
unconvertible graph). OpenVINO is in the dev extra: these tests never skip in CI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from reparam.errors import UserInputError
from reparam.export import export_onnx
from reparam.models.registry import create_model
from reparam.ops import corr_onnx
from reparam.ops.corr import corr_output_size, corr_reference
from reparam.runtime import load
from reparam.runtime.openvino import (
    EXTRA,
    OpenVinoModel,
    RuntimeNotInstalledError,
    convert_onnx_to_openvino,
    require_openvino,
)
from reparam.runtime.verify_runtimes import parse_runtimes, verify_openvino, verify_runtimes
from reparam.testing import randomize_batchnorm


def bare_corr_graph(
    path: Path, groups: int, stride: int, padding: int, dilation: int, window: int = 3
) -> Path:
    """One com.reparam::Corr node with symbolic shapes and no function (as older files)."""
    corr_onnx.register_schema()
    node = helper.make_node(
        "Corr", ["x", "kernel"], ["y"], domain=corr_onnx.DOMAIN,
        groups=groups, stride=stride, padding=padding, dilation=dilation,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "corr",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "C", "H", "W"]),
            helper.make_tensor_value_info(
                "kernel", TensorProto.FLOAT, ["B", "O", "G", window, window]
            ),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "O", "Ho", "Wo"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(corr_onnx.DOMAIN, 1)]
    )
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("groups", "stride", "padding", "dilation", "window"),
    [
        (1, 1, 1, 1, 3), (2, 2, 0, 1, 3), (4, 1, 2, 2, 3), (1, 3, 1, 2, 3),
        # 1×1 windows (DRConv's custom-mode region products are the first): at stride 1 the
        # input is its own patches, padded or not; at stride 2 patches are extracted
        (2, 1, 0, 3, 1), (1, 1, 1, 1, 1), (2, 2, 0, 1, 1),
    ],
)  # fmt: skip
def test_bare_corr_node_runs_exactly_in_openvino(
    tmp_path: Path, groups: int, stride: int, padding: int, dilation: int, window: int
) -> None:
    """The Corr conversion extension, with symbolic input sizes: the result equals the
    float64 reference to float32 rounding."""
    path = bare_corr_graph(tmp_path / "corr.onnx", groups, stride, padding, dilation, window)
    session = OpenVinoModel(path)
    generator = torch.Generator().manual_seed(groups * 10 + stride)
    x = torch.randn(2, 4, 11, 9, generator=generator, dtype=torch.float64)
    kernel = torch.randn(
        2, 8, 4 // groups, window, window, generator=generator, dtype=torch.float64
    )
    got = session.run(x.float().numpy(), kernel.float().numpy())["y"]
    want = corr_reference(x, kernel, groups, stride, padding, dilation).numpy()
    assert got.shape == (2, 8, corr_output_size(11, window, stride, padding, dilation),
                         corr_output_size(9, window, stride, padding, dilation))  # fmt: skip
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


# Every bundled family at a small input: (name, input shape, corr mode).
FAMILIES = [
    ("resnet18", (1, 3, 32, 32), "standard"),
    ("acnet_tiny", (1, 3, 32, 32), "standard"),
    ("repvgg_tiny", (1, 3, 32, 32), "standard"),
    ("mobileone_tiny", (1, 3, 32, 32), "standard"),
    ("dbb_tiny", (1, 3, 32, 32), "standard"),
    ("yolo_asff_tiny", (1, 3, 64, 64), "standard"),
    ("yolo_asff_tiny", (1, 3, 64, 64), "custom"),
    ("digits_net", (1, 1, 8, 8), "custom"),
]


@pytest.mark.parametrize(
    ("name", "shape", "corr"), FAMILIES, ids=[f"{n}-{c}" for n, _, c in FAMILIES]
)
def test_bundled_family_verifies_in_openvino(
    tmp_path: Path, name: str, shape: tuple[int, ...], corr: str
) -> None:
    """Export (fused) → OpenVINO, from the .onnx and from the written IR, against the
    training-time model with random BN statistics: within 1e-4 at batch 1 and 2."""
    model = randomize_batchnorm(create_model(name), seed=3).eval()
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, torch.randn(*shape), corr=corr, check_dynamic_axes=False)
    report = verify_openvino(model, path, batch_sizes=(1, 2), rtol=1e-4)
    assert report.ok, report.failures()
    assert report.batch_sizes == [1, 2]
    assert max(d.max_rel for d in report.worst()) <= 1e-4
    xml = tmp_path / f"{name}.xml"
    convert_onnx_to_openvino(path, xml)
    from_ir = verify_openvino(model, xml, batch_sizes=(2,), rtol=1e-4)
    assert from_ir.ok, from_ir.failures()


@pytest.fixture(scope="module")
def acnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = randomize_batchnorm(create_model("acnet_tiny"), seed=1).eval()
    path = tmp_path_factory.mktemp("ov") / "acnet.onnx"
    export_onnx(model, path, torch.randn(1, 3, 32, 32), check_dynamic_axes=False)
    return model, path


def test_fp16_ir_is_close_and_smaller(acnet_onnx, tmp_path: Path) -> None:
    _, path = acnet_onnx
    convert_onnx_to_openvino(path, tmp_path / "f32.xml")
    convert_onnx_to_openvino(path, tmp_path / "f16.xml", compress_to_fp16=True)
    assert (tmp_path / "f16.bin").stat().st_size < 0.6 * (tmp_path / "f32.bin").stat().st_size
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    full = OpenVinoModel(tmp_path / "f32.xml").run(x)
    half = OpenVinoModel(tmp_path / "f16.xml").run(x)
    for key, value in full.items():
        assert np.abs(half[key] - value).max() / np.abs(value).max() < 1e-2


def test_int8_qdq_graph_runs_in_openvino(acnet_onnx, tmp_path: Path) -> None:
    """INT8 from quantize_onnx: OpenVINO's integer kernels agree with onnxruntime's."""
    from reparam import quantize_onnx

    _, path = acnet_onnx
    quantized = tmp_path / "int8.onnx"
    with pytest.warns(UserWarning, match="calibrat"):
        quantize_onnx(path, quantized)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    want = next(iter(load(quantized).run(x).values()))
    got = next(iter(OpenVinoModel(quantized).run(x).values()))
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.999
    convert_onnx_to_openvino(quantized, tmp_path / "int8.xml")
    from_ir = next(iter(OpenVinoModel(tmp_path / "int8.xml").run(x).values()))
    assert np.abs(from_ir - got).max() <= 1e-5 * np.abs(got).max()


def test_ir_keeps_reparam_metadata_and_ranges(acnet_onnx, tmp_path: Path) -> None:
    """The .xml carries the ONNX file's metadata, so the range check applies to it too."""
    _, path = acnet_onnx
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="reparam.shape_ranges", value='{"input": {"0": [2, 4]}}')
    ranged = tmp_path / "ranged.onnx"
    onnx.save(proto, str(ranged))
    convert_onnx_to_openvino(ranged, tmp_path / "ranged.xml")
    session = OpenVinoModel(tmp_path / "ranged.xml")
    assert session.example_shapes() == [(1, 3, 32, 32)]
    session.run(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(UserInputError, match=r"'input' axis 0 has size 5.*2 to 4"):
        session.run(np.zeros((5, 3, 32, 32), np.float32))
    with pytest.raises(UserInputError, match=r"'input' axis 0 has size 1.*2 to 4"):
        session.random_inputs(batch=1)


def test_convert_writes_both_files_or_nothing(acnet_onnx, tmp_path: Path) -> None:
    _, path = acnet_onnx
    xml = tmp_path / "out.xml"
    xml.write_text("old xml")
    (tmp_path / "out.bin").write_text("old bin")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="not a readable ONNX model"):
        convert_onnx_to_openvino(broken, xml)
    assert xml.read_text() == "old xml" and (tmp_path / "out.bin").read_text() == "old bin"
    convert_onnx_to_openvino(path, xml)
    assert xml.read_text().startswith("<?xml") and (tmp_path / "out.bin").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "out.bin", "out.xml"]
    with pytest.raises(UserInputError, match=r"should end in \.xml"):
        convert_onnx_to_openvino(path, tmp_path / "out.ir")
    (tmp_path / "same.xml").symlink_to(path)
    with pytest.raises(UserInputError, match="overwrite"):
        convert_onnx_to_openvino(path, tmp_path / "same.xml")


def test_openvino_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeNotInstalledError) as caught:
        require_openvino()
    assert EXTRA in str(caught.value) and "\n" not in str(caught.value)


def test_each_runtime_reported_when_one_fails(acnet_onnx, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify --runtime all: a missing OpenVINO is one line, onnxruntime still verified."""
    model, path = acnet_onnx
    monkeypatch.setitem(sys.modules, "openvino", None)
    results = verify_runtimes(model, path, runtimes=["onnxruntime", "openvino"], batch_sizes=(1,))
    assert results.reports["onnxruntime"].ok
    assert EXTRA in results.errors["openvino"]
    assert not results.ok
    assert "openvino" in results.failure_summary()


def test_graph_openvino_cannot_convert_is_one_line(tmp_path: Path) -> None:
    """ai.onnx.ml::Binarizer runs in onnxruntime but has no OpenVINO conversion rule."""
    node = helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)
    graph = helper.make_graph(
        [node],
        "ml",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
    )
    model.ir_version = 10
    path = tmp_path / "ml.onnx"
    onnx.save(model, str(path))
    x = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.25]], np.float32)
    assert np.array_equal(load(path).run(x)["y"], (x > 0.5).astype(np.float32))
    with pytest.raises(UserInputError) as caught:
        OpenVinoModel(path)
    assert "OpenVINO cannot convert" in str(caught.value) and "Binarizer" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parse_runtimes() -> None:
    assert parse_runtimes("all") == ["onnxruntime", "openvino"]
    assert parse_runtimes("openvino,onnxruntime") == ["openvino", "onnxruntime"]
    with pytest.raises(UserInputError, match="tensorrt"):
        parse_runtimes("tensorrt")


def test_non_utf8_file_name_runs(acnet_onnx, tmp_path: Path) -> None:
    """A POSIX file name is bytes: one that is not UTF-8 still loads in both runtimes."""
    _, path = acnet_onnx
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"m\xff.onnx")))
    odd.write_bytes(path.read_bytes())
    x = np.zeros((1, 3, 32, 32), np.float32)
    want = next(iter(load(path).run(x).values()))
    assert np.array_equal(next(iter(load(odd).run(x).values())), want)
    got = next(iter(OpenVinoModel(odd).run(x).values()))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
