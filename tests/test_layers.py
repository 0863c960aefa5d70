"""reparam's imports point one way, function-level imports included.

The layers, bottom up (a module may import its own layer and the layers below it)::

    errors, utilities (resources, _io, compare) → ops → fusion math → module fusion
    → fuser registry, pair finding, fold-and-undo, block walk, fuse report → blocks, adoption
    → built-in registrations, model-wide fuse, insert, models → checkpoint
    → runtime ← verify ← export, quantize → bench, demo → cli

The test parses every module with ``ast`` (so imports inside functions count), maps each
``reparam`` import to its layer, and fails on an upward import or an import cycle.

Importing ``a.b.c`` runs the package ``__init__`` of ``a`` and ``a.b`` first, so those count
as imports too (except a module's own enclosing packages, which are already being imported
when it runs): a cycle through a package ``__init__`` is a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reparam"

# Longest prefix wins. The number is the layer; higher layers may import lower ones.
LAYERS: dict[str, int] = {
    "reparam._version": 0,
    "reparam.errors": 0,
    "reparam._io": 0,
    "reparam.resources": 0,
    "reparam._table": 0,
    "reparam.compare": 0,
    "reparam.ops": 1,
    "reparam.fusion": 2,
    "reparam.module_fusion": 3,
    "reparam.fusers": 4,
    "reparam.fuse_report": 4,
    "reparam.conv_bn_pairs": 4,
    "reparam.fold_undo": 4,
    "reparam.fuse_walk": 4,
    "reparam.fuse_probe": 4,
    "reparam.size_guards": 4,
    "reparam.blocks": 5,
    "reparam.adopt": 5,
    "reparam.macs": 5,
    "reparam.builtins": 6,  # registers blocks and adoption for the model-wide fuse
    "reparam.convert": 6,
    "reparam.insert": 6,
    "reparam.expansion_blocks": 5,
    "reparam.expansion_qarepvgg": 5,
    "reparam.expansion": 6,
    "reparam.expansion_checkpoint": 7,
    "reparam.testing": 6,
    "reparam.summary": 6,
    "reparam.models": 6,
    "reparam.checkpoint": 7,
    "reparam.user_code": 7,  # the checkpoint's parts: user-code import, safe reading, format
    "reparam.safe_weights": 7,
    "reparam.fused_format": 7,
    "reparam.runtime": 8,
    "reparam.runtime.verify_runtimes": 10,  # verify on every runtime: the CLI's, above export
    "reparam.inputs": 8,
    "reparam.export.verify": 9,
    "reparam.export.verify_report": 9,
    "reparam.export.signature": 9,  # input flattening, shared by verify and export
    "reparam.export": 10,
    "reparam.quantize": 10,
    "reparam.bench": 11,
    "reparam.demo": 11,
    "reparam.cli": 12,
    "reparam": 13,  # the package __init__ re-exports the public API
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")),
               key=len)  # fmt: skip
    return LAYERS[best]


def _imports(path: Path) -> set[str]:
    """Every reparam module ``path`` imports, at module level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from reparam.ops import corr` imports reparam.ops.corr
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() or (
                    PACKAGE.parent / candidate.replace(".", "/")
                ).is_dir()
                found.add(candidate if is_module else base)
    found = {name for name in found if name == "reparam" or name.startswith("reparam.")}
    return {package for name in found for package in _with_packages(name)} - _enclosing(module)


def _with_packages(name: str) -> set[str]:
    """``name`` and every package above it: importing a.b.c runs a/__init__ and a/b/__init__."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)}


def _enclosing(module: str) -> set[str]:
    """The packages ``module`` lives in (including itself when it is a package): already
    being imported when its code runs, so importing them again runs nothing."""
    return _with_packages(module)


GRAPH = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    upward = sorted(
        f"{target} (layer {_layer(target)})"
        for target in GRAPH[module]
        if _layer(target) > _layer(module)
    )
    assert not upward, f"{module} (layer {_layer(module)}) imports upward: {', '.join(upward)}"


def test_no_import_cycle() -> None:
    """Cycles between modules, package ``__init__``s included (a package importing its own
    submodules is how a package works; a submodule importing an outside module that imports
    the package back is a cycle), found by depth-first search."""
    graph = {module: {t for t in targets if t in GRAPH} for module, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " → ".join(cycle))


def test_package_init_counts_as_imported() -> None:
    """Importing reparam.blocks.repvgg runs reparam/blocks/__init__.py: the graph has that edge,
    so a cycle through the package (blocks → adopt → blocks) would be found above."""
    assert "reparam.blocks" in GRAPH["reparam.adopt.layouts"]
    assert "reparam.blocks" not in GRAPH["reparam.blocks.repvgg"]  # its own package: running
