"""export_onnx: every block exports and matches torch under onnxruntime at several batch
sizes; DRConv in both Corr modes; the legacy fallback; dynamic H/W and its refusals;
metadata; atomic writes; bad options.

Each torch.export-based export costs 1–3 s, so the matrix is one small configuration per
block. Adding a block is one line in CASES.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from reparam._version import __version__
from reparam.blocks.acb import ACBlock
from reparam.blocks.asff import ASFF
from reparam.blocks.dbb import DiverseBranchBlock
from reparam.blocks.drconv import DRConv2d
from reparam.blocks.hetconv import HetConv
from reparam.blocks.involution import Involution
from reparam.blocks.mobileone import MobileOneBlock
from reparam.blocks.octave import OctaveConvBN
from reparam.blocks.repvgg import RepVGGBlock
from reparam.blocks.t2t import T2TModule
from reparam.errors import UserInputError
from reparam.export import ExportError, export_onnx, supported_opsets, verify_onnx
from reparam.ops.corr_onnx import DOMAIN, corr_nodes
from reparam.testing import randomize_batchnorm

BATCH_SIZES = (1, 2, 5)
RTOL = 1e-5  # max error / max |output|; measured 1e-7 to 5e-7


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A block, its example inputs (positional arguments) and export options."""

    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    options: dict[str, Any] = field(default_factory=dict)


def drconv() -> nn.Module:
    return DRConv2d(4, 6, 3, region_num=4, padding=1)


CASES = [
    Case("acb", lambda: ACBlock(4, 8), lambda: (randn(2, 4, 11, 9),)),
    Case("repvgg-se", lambda: RepVGGBlock(8, 8, use_se=True), lambda: (randn(2, 8, 11, 9),)),
    Case("dbb", lambda: DiverseBranchBlock(4, 8, 3), lambda: (randn(2, 4, 11, 9),)),
    Case(
        "mobileone-dw",
        lambda: MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=2),
        lambda: (randn(2, 8, 11, 9),),
    ),
    Case("hetconv", lambda: HetConv(8, 8, p=2), lambda: (randn(2, 8, 11, 9),)),
    Case(  # a (high, low) pair in, a pair out
        "octave", lambda: OctaveConvBN(8, 8, 3), lambda: ((randn(2, 4, 10, 8), randn(2, 4, 5, 4)),)
    ),
    Case(  # three inputs (x2, x1, x0) in one sequence argument
        "asff",
        lambda: ASFF(1, channels=(8, 4, 4)),
        lambda: ((randn(2, 4, 16, 16), randn(2, 4, 8, 8), randn(2, 8, 4, 4)),),
    ),
    Case("involution", lambda: Involution(16, 3, group_channels=4), lambda: (randn(2, 16, 11, 9),)),
    Case("drconv-standard", drconv, lambda: (randn(2, 4, 11, 9),), {"corr": "standard"}),
    Case("drconv-custom", drconv, lambda: (randn(2, 4, 11, 9),), {"corr": "custom"}),
    Case(
        "t2t", lambda: T2TModule(32, 3, embed_dim=16, token_dim=8), lambda: (randn(2, 3, 32, 24),)
    ),
]


def built(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(case.build(), seed=1).eval()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_block_exports_and_matches_torch_at_every_batch_size(case: Case, tmp_path: Path) -> None:
    model = built(case)
    path = tmp_path / f"{case.id}.onnx"
    report = export_onnx(model, path, case.inputs(), **case.options)

    assert path.is_file() and report.file_size == path.stat().st_size
    assert all(shape[0] == "batch" for shape in report.input_shapes + report.output_shapes)
    result = verify_onnx(model, path, batch_sizes=BATCH_SIZES)
    assert result.ok, result.failures()
    assert result.batch_sizes == list(BATCH_SIZES)
    assert len(result.cases) == 2 * len(BATCH_SIZES)  # ORT optimisations off and on
    for diff in result.worst():
        assert diff.max_rel <= RTOL, diff
        assert diff.cosine > 1 - 1e-9, diff
    # the graph is the fused one: no BatchNormalization left
    assert "BatchNormalization" not in report.node_counts


def test_drconv_custom_is_one_corr_node_with_every_attribute(tmp_path: Path) -> None:
    path = tmp_path / "drconv.onnx"
    model = DRConv2d(4, 6, 3, region_num=2, stride=2, padding=1, dilation=1).eval()
    report = export_onnx(model, path, randn(2, 4, 11, 9), corr="custom")
    proto = onnx.load(str(path))
    (node,) = corr_nodes(proto)
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"groups": 1, "stride": 2, "padding": 1, "dilation": 1}
    assert (DOMAIN, 1) in {(o.domain, o.version) for o in proto.opset_import}
    assert report.custom_ops == ["com.reparam::Corr"]
    assert report.metadata["reparam.custom_ops"] == "com.reparam::Corr"


LEGACY_CASES = [
    Case("acb", lambda: ACBlock(4, 8), lambda: (randn(2, 4, 11, 9),)),
    Case("drconv-custom", drconv, lambda: (randn(2, 4, 11, 9),), {"corr": "custom"}),
    Case(
        "t2t", lambda: T2TModule(32, 3, embed_dim=16, token_dim=8), lambda: (randn(2, 3, 32, 24),)
    ),
]


@pytest.mark.parametrize("case", LEGACY_CASES, ids=[case.id for case in LEGACY_CASES])
def test_legacy_exporter_fallback(case: Case, tmp_path: Path) -> None:
    model = built(case)
    path = tmp_path / "legacy.onnx"
    report = export_onnx(model, path, case.inputs(), exporter="legacy", **case.options)
    assert report.exporter == "legacy" and report.metadata["reparam.exporter"] == "legacy"
    result = verify_onnx(model, path, batch_sizes=BATCH_SIZES)
    assert result.ok, result.failures()
    if case.options.get("corr") == "custom":
        assert len(corr_nodes(onnx.load(str(path)))) == 1


def test_metadata(tmp_path: Path) -> None:
    path = tmp_path / "acb.onnx"
    model = ACBlock(4, 8)
    export_onnx(model, path, randn(1, 4, 9, 9), source="my-acb", dynamic_batch=False)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["reparam.version"] == __version__
    assert meta["reparam.source"] == "my-acb"
    assert meta["reparam.fused"] == "true"
    assert meta["reparam.corr"] == "standard"
    assert meta["reparam.exporter"] == "dynamo"
    assert meta["reparam.dynamic_batch"] == "false"
    assert json.loads(meta["reparam.input_shapes"]) == [[1, 4, 9, 9]]
    assert int(meta["reparam.opset"]) in supported_opsets()
    assert model.training  # the caller's model keeps its mode


def test_no_fuse_keeps_the_branches(tmp_path: Path) -> None:
    model = randomize_batchnorm(ACBlock(4, 4)).eval()
    path = tmp_path / "raw.onnx"
    report = export_onnx(model, path, randn(1, 4, 9, 9), fuse=False, exporter="legacy")
    assert report.metadata["reparam.fused"] == "false"
    assert report.node_counts["Conv"] == 3  # square, vertical, horizontal
    assert verify_onnx(model, path).ok


HW_CASES = [
    # DRConv: exact adaptive pooling + corr_standard keep H/W symbolic
    (drconv, (2, 4, 11, 9), [(1, 4, 7, 13), (3, 4, 16, 16)]),
    # T2T: grid sizes from the unfold formula, not int(sqrt(N)) of a traced size
    (lambda: T2TModule(32, 3, embed_dim=16, token_dim=8), (2, 3, 32, 24), [(1, 3, 48, 40)]),
]


@pytest.mark.parametrize(("build", "shape", "others"), HW_CASES, ids=["drconv", "t2t"])
def test_dynamic_hw_exports_exactly_where_the_ops_allow(
    build: Callable, shape: tuple, others: list, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build().eval()
    path = tmp_path / "hw.onnx"
    report = export_onnx(model, path, randn(*shape), dynamic_hw=True)
    assert all(isinstance(d, str) for d in report.input_shapes[0][2:])
    assert report.dynamic_check and all(d.max_rel < RTOL for d in report.dynamic_check)
    for other in others:
        result = verify_onnx(model, path, randn(*other))
        assert result.ok, result.failures()


class AdaptivePoolNet(nn.Module):
    """nn.AdaptiveAvgPool2d((2, 2)): the new exporter bakes the size in (REFERENCE.md §3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dynamic_hw_refused_when_the_graph_would_be_wrong(exporter: str, tmp_path: Path) -> None:
    path = tmp_path / "pool.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match=r"(?i)adaptive"):
        export_onnx(
            AdaptivePoolNet(), path, randn(2, 3, 10, 10), dynamic_hw=True, exporter=exporter
        )
    assert path.read_bytes() == b"old"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["pool.onnx"]  # no temp file left
    # with static H/W the same model exports fine
    export_onnx(AdaptivePoolNet(), path, randn(2, 3, 10, 10), exporter="legacy")
    assert onnx.load(str(path)).graph.node


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"opset": 17}, "opset 17 is not supported by the dynamo exporter"),
        ({"opset": 99}, "opset 99"),
        ({"opset": 21, "exporter": "legacy"}, "use 7 to 20"),
        ({"corr": "fancy"}, "corr must be one of"),
        ({"exporter": "jit"}, "exporter must be one of"),
        ({"input_names": ["a", "b"]}, "distinct input names"),
    ],
    ids=["opset-low", "opset-high", "opset-legacy", "corr", "exporter", "names"],
)
def test_bad_options(options: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=message):
        export_onnx(ACBlock(4, 4), tmp_path / "x.onnx", randn(1, 4, 9, 9), **options)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda: randn(1, 3, 9, 9), "expected input.*4 channels"),
        (lambda: randn(4, 9, 9), "does not run on input shape"),
        (lambda: ["not a tensor"], "must be a tensor"),
    ],
    ids=["channels", "rank", "type"],
)
def test_bad_inputs(inputs: Callable, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=message):
        export_onnx(ACBlock(4, 4), tmp_path / "x.onnx", inputs())


def test_bad_output_path(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"\.onnx"):
        export_onnx(ACBlock(4, 4), tmp_path / "x.pt", randn(1, 4, 9, 9))
    with pytest.raises(UserInputError, match="does not exist"):
        export_onnx(ACBlock(4, 4), tmp_path / "missing" / "x.onnx", randn(1, 4, 9, 9))


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_exporter_failure_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"dynamo ONNX exporter failed.*data-dependent") as info:
        export_onnx(DataDependent(), tmp_path / "x.onnx", randn(2, 3))
    assert len(str(info.value).splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_float16_graph_verified_against_the_float32_model(tmp_path: Path) -> None:
    model = randomize_batchnorm(ACBlock(4, 8), seed=2).eval()
    path = tmp_path / "half.onnx"
    report = export_onnx(model, path, randn(2, 4, 11, 9), dtype=torch.float16)
    proto = onnx.load(str(path))
    assert report.dtype == "float16" and report.metadata["reparam.dtype"] == "float16"
    float16 = onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == float16
    assert all(init.data_type == float16 for init in proto.graph.initializer)
    result = verify_onnx(model, path, rtol=1e-2, atol=1e-3)
    assert result.ok, result.failures()
    assert result.worst()[0].max_rel > 1e-6  # really float16: not the float32 rounding
    # float32 at the boundary: same graph inside, a Cast at each end
    boundary = tmp_path / "half32.onnx"
    export_onnx(model, boundary, randn(2, 4, 11, 9), dtype=torch.float16, fp32_io=True)
    io = onnx.load(str(boundary)).graph
    assert io.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert io.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert verify_onnx(model, boundary, rtol=1e-2, atol=1e-3).ok


def test_float16_overflow_is_refused_with_the_layer_name(tmp_path: Path) -> None:
    model = ACBlock(4, 8).eval()
    with torch.no_grad():
        model.square_bn.weight.fill_(1e7)  # folded kernel ~ 1e7 x the conv weight
    with pytest.raises(ExportError, match=r"layer '.*'.*beyond float16"):
        export_onnx(model, tmp_path / "x.onnx", randn(1, 4, 9, 9), dtype=torch.float16)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserInputError, match="fp32_io"):
        export_onnx(model, tmp_path / "x.onnx", randn(1, 4, 9, 9), fp32_io=True)


def test_symbolic_axes_are_named(tmp_path: Path) -> None:
    report = export_onnx(
        ACBlock(4, 4).eval(), tmp_path / "hw.onnx", randn(2, 4, 11, 9), dynamic_hw=True
    )
    assert report.input_shapes == [("batch", 4, "height", "width")]
    assert report.output_shapes[0][0] == "batch"
    text = report.summary()
    assert "(batch, 4, height, width)" in text and "Conv" in text
    assert json.loads(json.dumps(report.to_dict()))["inputs"][0]["shape"][2] == "height"
