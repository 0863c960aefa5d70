"""DRConv's region-first graph in standard operators (reparam.ops.drconv_graph): equal to
the seed's formulation, in eager and in the graphs torch.export and the ONNX exporter write,
with a dynamic batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

import reparam
from reparam.blocks.drconv import DRConv2d
from reparam.ops.corr import corr_mode

# (C_in, C_out, K, r, stride, padding, dilation, H, W)
CONFIGS = [
    (8, 12, 3, 4, 1, 1, 1, 13, 11),
    (6, 5, 3, 8, 2, 0, 1, 12, 9),
    (4, 4, 5, 3, 1, 2, 2, 10, 10),
    (3, 7, 1, 3, 1, 0, 1, 5, 6),
]


def _block(config, dtype=torch.float64, seed=0) -> DRConv2d:
    c_in, c_out, k, r, s, p, d = config[:7]
    torch.manual_seed(seed)
    return DRConv2d(c_in, c_out, k, r, stride=s, padding=p, dilation=d).to(dtype).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_standard_mode_equals_the_seed_formulation(config, dtype, tolerance):
    block = _block(config, dtype)
    x = torch.randn(3, config[0], *config[7:], dtype=dtype)
    with torch.no_grad(), corr_mode("standard"):
        assert block.uses_region_first_graph(x)
        assert _rel(block(x), block.forward_reference(x)) <= tolerance


def test_one_region_taking_every_pixel_and_empty_regions():
    """M is the whole image when one region takes every pixel (the others empty)."""
    block = _block(CONFIGS[0])
    with torch.no_grad():
        block.conv_guide.bias[2] = 1e6  # region 2 wins everywhere in sample 0 and 1
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64)
    with torch.no_grad(), corr_mode("standard"):
        assert _rel(block(x), block.forward_reference(x)) <= 1e-12


def test_not_used_with_autograd_or_symbolic_spatial_sizes():
    block = _block(CONFIGS[0]).train()
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64)
    with corr_mode("standard"):
        assert not block.uses_region_first_graph(x)  # parameters need gradients
        with torch.no_grad():
            assert block.uses_region_first_graph(x)
    assert not block.eval().uses_region_first_graph(x)  # mode "op": the custom operator


def test_torch_export_with_a_dynamic_batch():
    block = _block(CONFIGS[1], torch.float32)
    x = torch.randn(2, 6, 12, 9)
    with corr_mode("standard"), torch.no_grad():
        program = torch.export.export(block, (x,), dynamic_shapes=({0: Dim("batch")},))
    for batch in (1, 4):
        other = torch.randn(batch, 6, 12, 9)
        with torch.no_grad():
            assert _rel(program.module()(other), block.forward_reference(other)) <= 1e-5
            # The trace kept nothing fake that the eager 1/r path (same geometry) reads.
            assert block.uses_fast_path(other)
            assert _rel(block(other), block.forward_reference(other)) <= 1e-5


def test_onnx_graph_runs_the_region_first_form_with_a_dynamic_batch(tmp_path):
    import onnx
    import onnxruntime as ort

    block = _block(CONFIGS[0], torch.float32)
    path = tmp_path / "drconv.onnx"
    reparam.export_onnx(block, path, torch.randn(2, 8, 13, 11), corr="standard")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "ScatterElements" in ops  # the slots of the region-first form
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 8, 13, 11)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = block.forward_reference(x).numpy()
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_products_as_corr_equal_the_batched_matmul(dtype, tolerance):
    from reparam.ops.drconv_graph import _products_as_corr

    torch.manual_seed(3)
    gathered = torch.randn(3, 5, 7, 18, dtype=dtype)  # (B, r, M, K²·C)
    kernels = torch.randn(3, 5, 18, 4, dtype=dtype)  # (B, r, K²·C, O)
    got = _products_as_corr(gathered, kernels)
    assert got.shape == (3, 5 * 7, 4, 1)
    assert _rel(got.view(3, 5, 7, 4), torch.matmul(gathered, kernels)) <= tolerance


def _custom_graph(tmp_path, config):
    import onnx

    block = _block(config, torch.float32)
    path = tmp_path / "drconv_custom.onnx"
    reparam.export_onnx(block, path, torch.randn(2, config[0], *config[7:]), corr="custom")
    return block, path, onnx.load(str(path))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_custom_graph_has_one_corr_node_doing_the_region_products(tmp_path, config):
    """--corr custom: the 1/r form too, its products one Corr node of groups r whose
    filters are the slots' im2col rows (1×1), not the all-regions correlation."""
    _, _, proto = _custom_graph(tmp_path, config)
    corr_nodes = [n for n in proto.graph.node if n.op_type == "Corr"]
    assert len(corr_nodes) == 1
    groups = {a.name: a.i for a in corr_nodes[0].attribute}.get("groups")
    assert groups == config[3]
    producers = {out: node for node in proto.graph.node for out in node.output}
    assert producers[corr_nodes[0].input[1]].op_type == "Unsqueeze"  # the (…, 1, 1) filters
    assert "ScatterElements" in {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("runtime", ["function", "python kernel", "openvino"])
def test_custom_graph_runs_in_each_runtime_with_a_dynamic_batch(tmp_path, runtime):
    from reparam.runtime.session import load

    config = CONFIGS[1]  # stride 2, r = 8
    block, path, proto = _custom_graph(tmp_path, config)
    if runtime == "python kernel":  # no shipped function: onnxruntime-extensions runs Corr
        del proto.functions[:]
        import onnx

        onnx.save(proto, str(path))
    if runtime == "openvino":
        from reparam.runtime.openvino import load_openvino

        session = load_openvino(path)
    else:
        session = load(path)
    for batch in (1, 4):
        x = torch.randn(batch, config[0], *config[7:])
        got = session.run_feeds({session.inputs[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = block.forward_reference(x).numpy()
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
