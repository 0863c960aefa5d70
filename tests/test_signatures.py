"""export_onnx for any forward signature: *args, keyword arguments with defaults, nested
tuple/list/dict inputs and outputs; verify_onnx regroups the graph inputs from the metadata."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import onnx
import torch
from torch import nn

from reparam.export import InputTree, export_onnx, verify_onnx


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class VarArgs(nn.Module):
    """``forward(self, *xs)``: a shared conv over every input, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return sum(self.bn(self.conv(x)) for x in xs)


class KeywordDefaults(nn.Module):
    """A tensor keyword argument, a float keyword with a default, a None default."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(
        self, x: torch.Tensor, *, mask: torch.Tensor, scale: float = 2.0, bias=None
    ) -> torch.Tensor:
        y = self.conv(x) * mask * scale
        return y if bias is None else y + bias


Pair = namedtuple("Pair", "main aux")


class Nested(nn.Module):
    """Nested dict/list inputs; a dict output holding a list and a namedtuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)

    def forward(self, batch: dict) -> dict:
        x, (y, z) = batch["image"], batch["pair"]
        return {
            "feats": [self.a(x), self.b(y)],
            "pair": Pair(self.a(z), z.mean(dim=1)),
        }


def test_varargs_forward(tmp_path: Path) -> None:
    model = VarArgs().eval()
    path = tmp_path / "varargs.onnx"
    report = export_onnx(model, path, (randn(1, 3, 8, 8), randn(1, 3, 8, 8, seed=1)))
    assert report.input_names == ["input_0", "input_1"]
    assert all(shape[0] == "batch" for shape in report.input_shapes)
    result = verify_onnx(model, path)
    assert result.ok, result.failures()
    assert result.worst()[0].max_rel < 1e-5


def test_keyword_arguments_and_defaults(tmp_path: Path) -> None:
    model = KeywordDefaults().eval()
    path = tmp_path / "kw.onnx"
    mask = (randn(2, 1, 6, 6) > 0).float()
    report = export_onnx(model, path, (randn(2, 3, 6, 6),), example_kwargs={"mask": mask})
    assert len(report.input_names) == 2  # x and mask; scale and bias are constants
    x = randn(3, 3, 6, 6, seed=2)
    m = (randn(3, 1, 6, 6, seed=3) > 0).float()
    result = verify_onnx(model, path, [x, m])
    assert result.ok, result.failures()
    # the default scale=2.0 is in the graph: a model called with scale=1 differs
    with torch.no_grad():
        expected = model(x, mask=m)
        assert not torch.allclose(expected, model(x, mask=m, scale=1.0))


def test_nested_dict_inputs_and_outputs(tmp_path: Path) -> None:
    model = Nested().eval()
    path = tmp_path / "nested.onnx"
    example = (
        {
            "image": randn(2, 3, 5, 5),
            "pair": [randn(2, 3, 5, 5, seed=1), randn(2, 3, 5, 5, seed=2)],
        },
    )
    report = export_onnx(model, path, example)
    assert len(report.input_names) == 3 and len(report.output_names) == 4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    tree = InputTree.from_json(meta["reparam.input_tree"])
    assert tree is not None and sum(s is not None for s in tree.slots) == 3
    result = verify_onnx(model, path, batch_sizes=(1, 3))
    assert result.ok, result.failures()
    assert result.batch_sizes == [1, 3]


def test_input_tree_round_trip_keeps_constants() -> None:
    tree, flat = InputTree.from_example((randn(1, 2), [randn(1, 2), 3, None]), {"k": 1.5})
    assert len(flat) == 2
    again = InputTree.from_json(tree.to_json())
    args, kwargs = again.rebuild(["a", "b"])
    assert args == ("a", ["b", 3, None]) and kwargs == {"k": 1.5}
    assert InputTree.from_json("{not json") is None
