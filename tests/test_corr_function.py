"""Corr as an ONNX model-local function, attribute validation, and a kernel that never aborts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import reparam.ops.corr  # noqa: F401  (registers torch.ops.reparam.corr)
from reparam.ops.corr_onnx import (
    DOMAIN,
    attach_corr_function,
    corr_function_proto,
    validate_corr_nodes,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# (groups, stride, padding, dilation, kh, kw)
CONFIGS = [
    (1, 1, 0, 1, 3, 3),
    (1, 1, 1, 1, 3, 3),
    (2, 2, 1, 1, 3, 3),
    (4, 3, 1, 2, 3, 3),
    (2, 1, 1, 1, 1, 3),
    (1, 2, 0, 1, 2, 2),
    (8, 1, 2, 2, 5, 5),
    # 1×1 windows: the function's MatMul-only branch (stride 1, no padding; dilation does
    # not matter), and beside it the im2col branch (stride 2, padding 1)
    (1, 1, 0, 1, 1, 1),
    (4, 1, 0, 3, 1, 1),
    (2, 2, 0, 1, 1, 1),
    (2, 1, 1, 1, 1, 1),
]
IDS = [f"g{g}-s{s}-p{p}-d{d}-k{kh}x{kw}" for g, s, p, d, kh, kw in CONFIGS]
CHANNELS, OUT_CHANNELS = 8, 8


def corr_model(
    groups=1,
    stride=1,
    padding=0,
    dilation=1,
    *,
    kernel_rank=5,
    function=True,
    opset=18,
    elem_type=None,
):
    """A graph holding one com.reparam::Corr node (x, kernel → y), with the function attached."""
    from onnx import TensorProto, helper

    elem_type = TensorProto.FLOAT if elem_type is None else elem_type

    node = helper.make_node(
        "Corr",
        ["x", "kernel"],
        ["y"],
        domain=DOMAIN,
        groups=groups,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    per_group = CHANNELS // groups if groups > 0 else 1
    kernel_shape = ["B", OUT_CHANNELS, per_group, "kh", "kw"][:kernel_rank]
    graph = helper.make_graph(
        [node],
        "corr",
        [
            helper.make_tensor_value_info("x", elem_type, ["B", CHANNELS, "H", "W"]),
            helper.make_tensor_value_info("kernel", elem_type, kernel_shape),
        ],
        [helper.make_tensor_value_info("y", elem_type, ["B", OUT_CHANNELS, "h", "w"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
    )
    return attach_corr_function(model) if function else model


def check_against_torch(config, sizes, *, opset=18, dtype=np.float32, tolerance=(1e-4, 1e-5)):
    """Run the function in a plain onnxruntime session at each (batch, (H, W)); compare."""
    groups, stride, padding, dilation, kh, kw = config
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = corr_model(groups, stride, padding, dilation, opset=opset, elem_type=elem_type)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    # A plain session: no custom-op library, so onnxruntime must inline the function.
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch, size in sizes:
        x = torch.randn(batch, CHANNELS, *size, generator=generator)
        kernel = torch.randn(batch, OUT_CHANNELS, CHANNELS // groups, kh, kw, generator=generator)
        x, kernel = (torch.from_numpy(t.numpy().astype(dtype)) for t in (x, kernel))
        expected = torch.ops.reparam.corr(x.float(), kernel.float(), *config[:4])
        (got,) = session.run(None, {"x": x.numpy(), "kernel": kernel.numpy()})
        assert got.shape == tuple(expected.shape) and got.dtype == dtype
        rtol, atol = tolerance
        torch.testing.assert_close(torch.from_numpy(got).float(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_function_runs_in_plain_onnxruntime_and_matches_torch(config):
    check_against_torch(config, ((1, (11, 9)), (2, (8, 8)), (5, (13, 10))))


# Dilation 2 with stride 2 (every tap in the same stride phase), padding 0 and 2, groups
# 1/2/4 and kernel sizes 1, 3, 5, on non-square inputs; (9, 14) leaves a 5×5 kernel at
# padding 0 one output row.
STRIDED_DILATED = [
    (groups, 2, padding, 2, k, k) for groups in (1, 2, 4) for padding in (0, 2) for k in (1, 3, 5)
]
# Mixed phases (d mod s ≠ 0), non-square kernels, and a stride beyond the input (capped).
STRIDED_DILATED += [
    (1, 3, 1, 2, 3, 3),
    (2, 2, 1, 3, 3, 5),
    (4, 3, 2, 2, 5, 1),
    (2, 40, 1, 1, 3, 3),
    (1, 4, 0, 1, 2, 3),
]
NON_SQUARE = ((1, (17, 12)), (3, (12, 19)), (2, (9, 14)))


STRIDED_IDS = [f"g{g}-s{s}-p{p}-d{d}-k{h}x{w}" for g, s, p, d, h, w in STRIDED_DILATED]


@pytest.mark.parametrize("config", STRIDED_DILATED, ids=STRIDED_IDS)
def test_function_matches_torch_with_stride_dilation_and_non_square_inputs(config):
    check_against_torch(config, NON_SQUARE)


@pytest.mark.parametrize(
    "config", [(1, 1, 1, 1, 3, 3), (2, 2, 2, 2, 3, 5), (4, 3, 0, 1, 1, 1), (2, 1, 0, 1, 1, 1)]
)
def test_function_at_opset_13_without_castlike(config):
    # Below opset 15 the body takes the one-hot weight's type from an EyeLike instead.
    check_against_torch(config, NON_SQUARE, opset=13)
    body = {n.op_type for n in attach_corr_function(corr_model(opset=13)).functions[0].node}
    assert "CastLike" not in body and "EyeLike" in body


@pytest.mark.parametrize("config", [(1, 1, 1, 1, 3, 3), (2, 2, 2, 2, 5, 3), (2, 1, 0, 1, 1, 1)])
def test_function_in_float16(config):
    check_against_torch(config, NON_SQUARE, dtype=np.float16, tolerance=(2e-2, 2e-2))


def test_shape_inference_types_the_output_through_the_function():
    model = corr_model(2, 2, 1, 1)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    output = inferred.graph.output[0].type.tensor_type
    assert output.elem_type == onnx.TensorProto.FLOAT and len(output.shape.dim) == 4


def test_attach_is_idempotent_and_skips_graphs_without_corr():
    model = corr_model()
    attach_corr_function(model)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "Corr")]
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    assert not attach_corr_function(plain).functions


def test_function_declares_the_four_attributes_with_defaults():
    function = corr_function_proto()
    defaults = {a.name: a.i for a in function.attribute_proto}
    assert defaults == {"groups": 1, "stride": 1, "padding": 0, "dilation": 1}
    referenced = {a.ref_attr_name for n in function.node for a in n.attribute if a.ref_attr_name}
    assert referenced == set(defaults)
    assert all(n.domain in ("", "ai.onnx") for n in function.node)


def test_exported_custom_graph_with_function_runs_without_extensions(tmp_path):
    from reparam.blocks.drconv import DRConv2d
    from reparam.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(DRConv2d(4, 6, 3, region_num=3, padding=1)).eval()
    path = tmp_path / "dr.onnx"
    export_onnx(model, path, torch.randn(2, 4, 8, 8), corr="custom")
    proto = attach_corr_function(onnx.load(str(path)))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "attrs,rank,message",
    [
        ({"groups": 0}, 5, "groups=0"),
        ({"stride": 0}, 5, "stride=0"),
        ({"padding": -1}, 5, "padding=-1"),
        ({"dilation": 0}, 5, "dilation=0"),
        ({"stride": 1 << 40}, 5, "stride="),
        ({"groups": 3}, 5, "divisible by groups=3"),
        ({}, 4, "rank 5"),
    ],
    ids=["groups0", "stride0", "negative-padding", "dilation0", "huge-stride", "groups3", "rank4"],
)
def test_validate_corr_nodes_names_each_problem(attrs, rank, message):
    settings = {"groups": 1, "stride": 1, "padding": 0, "dilation": 1, **attrs}
    problems = validate_corr_nodes(corr_model(**settings, kernel_rank=rank, function=False))
    assert any(message in line for line in problems), problems
    assert validate_corr_nodes(corr_model(2, 2, 1, 1)) == []


CRASHES = {
    "groups0": {"groups": 0},
    "stride0": {"stride": 0},
    "negative-padding": {"padding": -2},
    "dilation0": {"dilation": 0},
    "rank4": {"rank": 4},
}
CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    sys.path.insert(0, {tests!r})
    from test_corr_function import CRASHES, corr_model
    from reparam.ops.corr_ort import custom_ops_library, pop_kernel_errors

    options = ort.SessionOptions()
    options.register_custom_ops_library(custom_ops_library())
    for case, settings in CRASHES.items():
        settings = dict(settings)
        rank = settings.pop("rank", 5)
        model = corr_model(**settings, kernel_rank=rank, function=False)
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        x = np.random.rand(2, 8, 6, 6).astype(np.float32)
        kernel = np.random.rand(*(2, 8, 8, 3, 3)[:rank]).astype(np.float32)
        try:
            (out,) = session.run(None, {{"x": x, "kernel": kernel}})
            result = "nan" if np.isnan(out).all() else "numbers"
        except Exception as error:
            result = "raised " + type(error).__name__
        errors = pop_kernel_errors()
        print(case, result, len(errors), errors[:1])
    print("alive")
    """
)


def test_crafted_corr_nodes_do_not_kill_the_process():
    pytest.importorskip("onnxruntime_extensions")
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT.format(tests=tests)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "alive"
    for case in CRASHES:
        line = next(line for line in lines if line.startswith(f"{case} "))
        # Either onnxruntime refused the call, or the kernel recorded the error and gave NaN.
        assert " raised " in line or (" nan 1 " in line and "Corr kernel failed" in line), line


def test_kernel_computes_normally_when_valid():
    pytest.importorskip("onnxruntime_extensions")
    from reparam.ops.corr_ort import custom_ops_library, pop_kernel_errors

    model = corr_model(2, 1, 1, 1, function=False)
    options = ort.SessionOptions()
    options.register_custom_ops_library(custom_ops_library())
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((2, 8, 6, 6), dtype=np.float32)
    kernel = np.random.default_rng(1).random((2, 8, 4, 3, 3), dtype=np.float32)
    pop_kernel_errors()
    (out,) = session.run(None, {"x": x, "kernel": kernel})
    expected = torch.ops.reparam.corr(torch.from_numpy(x), torch.from_numpy(kernel), 2, 1, 1, 1)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert pop_kernel_errors() == []
