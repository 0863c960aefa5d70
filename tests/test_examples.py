"""Every script in examples/ runs in its fast mode (the scripts assert their own results)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"plug_acblocks", "custom_fuser", "yolo_custom_corr"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_in_fast_mode(path, capsys):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(fast=True)
    finally:
        import reparam.fusers

        # custom_fuser registers a fuser for its own class; leave the registry as it was
        if (cross_block := getattr(module, "CrossBlock", None)) is not None:
            reparam.fusers.unregister_fuser(cross_block)
    assert capsys.readouterr().out.strip()
