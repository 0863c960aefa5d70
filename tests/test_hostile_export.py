"""Hostile and careless inputs to export, verify and run: each gets exit 1 and exactly one
``error:`` line (no traceback), leaves its inputs unchanged, keeps the old output file, and
leaves no temporary file. Graphs are built by hand with onnx.helper, so most cases take
milliseconds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from reparam.blocks.acb import ACBlock
from reparam.cli.app import app
from reparam.errors import ExportError, UserInputError
from reparam.export import export_onnx, verify_onnx
from reparam.runtime import load

runner = CliRunner()
OPSET = [helper.make_opsetid("", 18)]


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def digest(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` by name, with its content hash."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def assert_one_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    others = [line for line in result.stderr.splitlines() if not line.startswith(("error:", "… "))]
    assert len(errors) == 1 and not others, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def relu_graph(path: Path, *, input_name: str = "x", shapes_meta: str | None = None) -> Path:
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", [input_name], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=OPSET)
    if shapes_meta is not None:
        helper.set_model_props(model, {"reparam.input_shapes": shapes_meta})
    onnx.save(model, str(path))
    return path


@pytest.fixture
def relu(tmp_path: Path) -> Path:
    return relu_graph(tmp_path / "relu.onnx")


def test_export_whose_verification_fails_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    out.write_bytes(b"previous good model")
    before = digest(tmp_path)
    # rtol = atol = 0: float rounding (~1e-7) fails verification
    result = invoke("export", "acnet_tiny", "-o", out, "--rtol", "0", "--atol", "0")
    assert_one_error(result, "ONNX output differs", "was not written")
    assert digest(tmp_path) == before  # old file intact, no temp file left


def test_interrupt_during_the_check_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "acb.onnx"
    out.write_bytes(b"old")

    def interrupted(tmp: Path) -> None:
        assert tmp.is_file() and tmp != out  # the new graph is checked at its temp path
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(ACBlock(4, 4), out, torch.randn(1, 4, 9, 9), check=interrupted)
    assert digest(tmp_path) == {"acb.onnx": hashlib.sha256(b"old").hexdigest()}


def test_failed_check_result_aborts(tmp_path: Path) -> None:
    class Failed:
        ok = False

        def failure_summary(self) -> str:
            return "numbers differ"

    with pytest.raises(ExportError, match="numbers differ"):
        export_onnx(ACBlock(4, 4), tmp_path / "a.onnx", torch.randn(1, 4, 9, 9),
                    check=lambda tmp: Failed(), dynamic_batch=False)  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_export_output_equal_to_weights_is_refused_before_work(tmp_path: Path) -> None:
    weights = tmp_path / "w.onnx"
    weights.write_bytes(b"weights")
    before = digest(tmp_path)
    assert_one_error(invoke("export", "acnet_tiny", "-w", weights, "-o", weights), "input")
    assert digest(tmp_path) == before


def test_run_output_equal_to_input_is_refused(relu: Path, tmp_path: Path) -> None:
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((1, 3, 4, 4), "f4"))
    before = digest(tmp_path)
    assert_one_error(invoke("run", relu, "-i", npz, "-o", npz), "input")
    assert digest(tmp_path) == before


def test_function_body_with_a_foreign_domain_is_refused(tmp_path: Path) -> None:
    body = helper.make_node("StringECMARegexReplace", ["a"], ["b"], domain="ai.onnx.contrib")
    function = helper.make_function(
        "com.reparam", "Corr", ["a"], ["b"], [body],
        [helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.contrib", 1)],
    )  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Corr", ["x"], ["y"], domain="com.reparam")], "g", [x], [y]
    )
    model = helper.make_model(
        graph,
        opset_imports=[*OPSET, helper.make_opsetid("com.reparam", 1)],
        functions=[function],
    )
    path = tmp_path / "wrapped.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserInputError, match=r"contrib.*inside function com\.reparam::Corr"):
        load(path)
    assert_one_error(invoke("run", path), "ai.onnx.contrib")


def test_escape_sequences_in_names_are_printed_escaped(tmp_path: Path) -> None:
    path = relu_graph(tmp_path / "esc.onnx", input_name="x\x1b[2J\x1b[31m")
    result = invoke("run", path, "--repeat", "1")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\\x1b[2J" in result.stdout


@pytest.mark.parametrize("kind", ["object", "corrupt"])
def test_bad_npz_inputs(kind: str, relu: Path, tmp_path: Path) -> None:
    npz = tmp_path / "in.npz"
    if kind == "object":
        np.savez(npz, x=np.array([{"a": 1}, None], dtype=object))
    else:
        np.savez(npz, x=np.ones((1, 3, 4, 4), "f4"))
        data = bytearray(npz.read_bytes())
        data[60:90] = b"\xff" * 30  # inside the member's data
        npz.write_bytes(bytes(data))
    before = digest(tmp_path)
    assert_one_error(invoke("run", relu, "-i", npz), str(npz.name))
    assert digest(tmp_path) == before


def _odd_graph(kind: str, path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    if kind == "string-output":
        out = helper.make_tensor_value_info("s", TensorProto.STRING, [1])
        nodes = [helper.make_node("Cast", ["x"], ["s"], to=TensorProto.STRING)]
        graph = helper.make_graph(nodes, "g", [x], [out])
    elif kind == "sequence-output":
        out = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
        graph = helper.make_graph(
            [helper.make_node("SequenceConstruct", ["x"], ["s"])], "g", [x], [out]
        )
    elif kind == "no-nodes":
        graph = helper.make_graph([], "g", [x], [x])
    else:  # no inputs: a constant
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        graph = helper.make_graph(
            [helper.make_node("Constant", [], ["y"], value=value)], "g", [], [y]
        )
    onnx.save(helper.make_model(graph, opset_imports=OPSET), str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("string-output", "string tensor"),
        ("sequence-output", "is a sequence"),
        ("no-nodes", "no nodes"),
        ("no-inputs", "no inputs"),
    ],
)
def test_graphs_reparam_cannot_run(kind: str, fragment: str, tmp_path: Path) -> None:
    path = _odd_graph(kind, tmp_path / f"{kind}.onnx")
    before = digest(tmp_path)
    assert_one_error(invoke("run", path), fragment)
    assert digest(tmp_path) == before


def test_absurd_batch_is_refused_before_allocating(relu: Path) -> None:
    assert_one_error(invoke("run", relu, "--batch", "10000000000"), "would take", "available")


def test_huge_metadata_shapes_are_refused_before_allocating(tmp_path: Path) -> None:
    huge = relu_graph(tmp_path / "huge.onnx", shapes_meta=json.dumps([[1, 3, 4, 4]]))
    model = onnx.load(str(huge))
    # symbolic spatial axes sized by hostile metadata
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "hw", strict=True):
        dim.dim_param = name
    helper.set_model_props(model, {"reparam.input_shapes": json.dumps([[1, 3, 10**7, 10**7]])})
    onnx.save(model, str(huge))
    assert_one_error(invoke("run", huge), "would take")
    helper.set_model_props(model, {"reparam.input_shapes": json.dumps([[1, 3, -4, 4]])})
    onnx.save(model, str(huge))
    assert_one_error(invoke("run", huge), "unknown size")


def test_verify_rejects_bad_batch_sizes_and_tolerances(relu: Path) -> None:
    for options in ({"batch_sizes": [-1]}, {"batch_sizes": []}, {"rtol": float("nan")}):
        with pytest.raises(UserInputError):
            verify_onnx(torch.nn.ReLU(), relu, **options)


def test_threads_are_capped(relu: Path) -> None:
    result = invoke("run", relu, "--threads", "100000", "--repeat", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["threads"] < 100000
    assert any("capped" in note for note in report["notes"])
