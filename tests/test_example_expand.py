"""examples/expand_finetune.py in its fast mode: the table has a row per model, every fused
network has the plain network's parameter count, accuracies are percentages."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "expand_finetune.py"


def test_expand_finetune_prints_one_row_per_model(capsys):
    spec = importlib.util.spec_from_file_location("example_expand_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(fast=True)  # the script asserts exactness at step 0 and the fused structure
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["model"])
    rows = [line.split() for line in lines[header + 2 : header + 6]]
    assert [row[0] for row in rows] == ["plain", "dbb", "repvgg", "qarepvgg"]
    assert len({row[2] for row in rows}) == 1  # fused parameters: the plain architecture's
    assert all(int(row[1].replace(",", "")) > int(row[2].replace(",", "")) for row in rows)
    percent = re.compile(r"^\d{1,3}\.\d\d%$")
    assert all(percent.match(row[3]) and percent.match(row[4]) for row in rows)
