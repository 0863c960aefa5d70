"""reparam.runtime: sessions, named and checked inputs, the com.reparam::Corr kernel under
onnxruntime-extensions (against the torch operator), and the errors for missing files,
corrupt files, bad inputs and a missing onnxruntime-extensions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from reparam.blocks.acb import ACBlock
from reparam.errors import UserInputError
from reparam.export import export_onnx
from reparam.ops import corr_onnx
from reparam.ops import corr_ort as ort_corr
from reparam.ops.corr import corr_output_size, corr_reference
from reparam.runtime import OnnxModel, load


def corr_model(path: Path, groups: int, stride: int, padding: int, dilation: int) -> Path:
    """A one-node graph: y = com.reparam::Corr(x, kernel), with symbolic shapes."""
    corr_onnx.register_schema()
    node = helper.make_node(
        "Corr",
        ["x", "kernel"],
        ["y"],
        domain=corr_onnx.DOMAIN,
        groups=groups,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    graph = helper.make_graph(
        [node],
        "corr",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "C", "H", "W"]),
            helper.make_tensor_value_info("kernel", TensorProto.FLOAT, ["B", "O", "G", 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "O", "Ho", "Wo"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(corr_onnx.DOMAIN, 1)]
    )
    model.ir_version = 10  # what onnxruntime 1.18+ reads
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def acb_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runtime") / "acb.onnx"
    export_onnx(ACBlock(4, 8), path, torch.randn(2, 4, 11, 9), exporter="legacy")
    return path


CORR_CONFIGS = [(1, 1, 0, 1), (2, 2, 1, 1), (1, 1, 2, 2), (4, 1, 1, 1)]


@pytest.mark.parametrize(
    ("groups", "stride", "padding", "dilation"),
    CORR_CONFIGS,
    ids=[f"g{g}-s{s}-p{p}-d{d}" for g, s, p, d in CORR_CONFIGS],
)
def test_ort_corr_kernel_matches_the_torch_op(
    groups: int, stride: int, padding: int, dilation: int, tmp_path: Path
) -> None:
    path = corr_model(tmp_path / "corr.onnx", groups, stride, padding, dilation)
    session = load(path)
    assert session.custom_domains == {"com.reparam"}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 11, 9, generator=generator)
    kernel = torch.randn(3, 4, 8 // groups, 3, 3, generator=generator)
    (y,) = session.run(x.numpy(), kernel.numpy()).values()
    expected = corr_reference(x, kernel, groups, stride, padding, dilation)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-5)
    # the schema's shape inference gives the static output size
    inferred = onnx.shape_inference.infer_shapes(
        onnx.load(str(path)), check_type=True, strict_mode=True
    )
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["B", "O"]


def test_schema_shape_inference_with_static_sizes() -> None:
    corr_onnx.register_schema()
    corr_onnx.register_schema()  # idempotent
    node = helper.make_node(
        "Corr", ["x", "k"], ["y"], domain="com.reparam", stride=2, padding=1, dilation=2
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 11, 9]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 6, 4, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.reparam", 1)]
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 6, corr_output_size(11, 3, 2, 1, 2), corr_output_size(9, 3, 2, 1, 2)]


def test_translation_defaults_equal_the_ops() -> None:
    table = corr_onnx.translation_table()
    assert list(table) == [torch.ops.reparam.corr.default]
    assert corr_onnx._op_defaults() == corr_onnx.ATTRIBUTE_DEFAULTS


def test_session_names_shapes_and_options(acb_onnx: Path) -> None:
    session = load(acb_onnx, threads=1)
    assert session.input_names == ["input"] and session.output_names == ["output"]
    assert session.inputs[0].shape == ("batch", 4, 11, 9)
    assert session.inputs[0].dtype == np.float32
    assert "CPUExecutionProvider" in session.providers
    options = session.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.metadata["reparam.exporter"] == "legacy"
    assert session.custom_domains == set()


def test_run_positional_named_torch_and_dict(acb_onnx: Path) -> None:
    session = OnnxModel(acb_onnx, optimization="disable")
    x = np.random.default_rng(0).standard_normal((3, 4, 11, 9))  # float64 is cast
    outputs = [
        session.run(x)["output"],
        session.run(input=x)["output"],
        session.run({"input": x})["output"],
        session.run(torch.from_numpy(x))["output"],
    ]
    assert outputs[0].shape == (3, 8, 11, 9) and outputs[0].dtype == np.float32
    for other in outputs[1:]:
        np.testing.assert_array_equal(other, outputs[0])


def test_random_inputs_use_the_export_shapes(acb_onnx: Path) -> None:
    session = load(acb_onnx)
    assert session.example_shapes() == [(2, 4, 11, 9)]
    feeds = session.random_inputs(batch=5)
    assert feeds["input"].shape == (5, 4, 11, 9)
    assert session.random_inputs()["input"].shape == (2, 4, 11, 9)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ((np.zeros((1, 3, 11, 9)),), "needs 4 channels"),
        ((np.zeros((4, 11, 9)),), "needs rank 4"),
        ((np.zeros((1, 4, 12, 9)),), "needs 11 axis 2"),
        ((np.zeros((1, 4, 11, 9)), np.zeros(1)), "takes 1 input"),
    ],
    ids=["channels", "rank", "height", "count"],
)
def test_bad_inputs(acb_onnx: Path, inputs: tuple, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        load(acb_onnx).run(*inputs)


def test_bad_input_names(acb_onnx: Path) -> None:
    with pytest.raises(UserInputError, match="missing input; unknown image"):
        load(acb_onnx).run(image=np.zeros((1, 4, 11, 9)))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load(tmp_path / "nope.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(UserInputError, match="not a readable ONNX model"):
        load(corrupt)
    with pytest.raises(UserInputError, match="optimization must be"):
        load(corrupt, optimization="max")


def test_custom_corr_without_onnxruntime_extensions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = corr_model(tmp_path / "corr.onnx", 1, 1, 0, 1)
    monkeypatch.setattr(ort_corr, "_library_path", None)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails
    with pytest.raises(UserInputError, match=r"pip install 'reparam\[custom-ops\]'") as info:
        load(path)
    assert "onnxruntime-extensions" in str(info.value)
    assert "--corr standard" in str(info.value)
