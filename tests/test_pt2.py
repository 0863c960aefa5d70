"""``export_pt2``: a torch.export program that loads with torch alone and matches the model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from reparam.errors import UserInputError
from reparam.export.pt2 import export_pt2
from reparam.models import create_model
from reparam.testing import randomize_batchnorm

LOAD_ISOLATED = textwrap.dedent(
    """
    import sys

    class NoReparam:
        # reparam is installed in this venv: block it, loading must not need it.

        def find_spec(self, name, path=None, target=None):
            if name == "reparam" or name.startswith("reparam."):
                raise ImportError("reparam is blocked in this process")
            return None

    sys.meta_path.insert(0, NoReparam())
    import torch

    assert not any(m == "reparam" or m.startswith("reparam.") for m in sys.modules)
    program = torch.export.load(sys.argv[1]).module()
    data = torch.load(sys.argv[2])
    for x, expected in zip(data["inputs"], data["outputs"]):
        got = program(x)
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-4, err
        print("batch", x.shape[0], "ok", err)
    """
)


@pytest.mark.parametrize("name", ["digits_net", "acnet_tiny"])
def test_pt2_loads_in_an_isolated_process_and_matches(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name).eval()
    randomize_batchnorm(model, 0)
    from reparam.models import get_model_info

    shape = get_model_info(name).input_shapes[0]
    path = export_pt2(model, tmp_path / f"{name}.pt2", torch.randn(shape))
    inputs = [torch.randn(b, *shape[1:]) for b in (1, 5)]
    with torch.no_grad():
        outputs = [model(x) for x in inputs]
    torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / "data.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_ISOLATED)
    # -I: isolated mode (no cwd, no PYTHON* variables); the script also blocks reparam.
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(path), str(tmp_path / "data.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(" ok ") == 2


def test_pt2_program_has_no_reparam_ops(tmp_path):
    torch.manual_seed(0)
    model = create_model("digits_net").eval()
    path = export_pt2(model, tmp_path / "d.pt2", torch.randn(2, 1, 8, 8))
    program = torch.export.load(str(path))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    assert calls and not [n for n in calls if getattr(n.target, "namespace", "") == "reparam"]


def test_pt2_bad_path_is_refused(tmp_path):
    model = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(UserInputError, match=r"\.pt2"):
        export_pt2(model, tmp_path / "x.onnx", torch.randn(1, 1, 4, 4))
    assert not (tmp_path / "x.onnx").exists()
