"""What a graph must be before onnxruntime loads it, and what an input may cost.

- :func:`check_domains`: operator domains, in the graph and in the bodies of its model-local
  functions, must be standard or ``com.reparam`` (whose kernels reparam ships). A function
  of an allowed domain can wrap any operator, so its body is checked too.
- :func:`check_graph`: a graph with no nodes, no inputs, or non-tensor inputs/outputs
  (strings, sequences, maps) is refused with a line saying what it is.
- :func:`check_allocation` (from :mod:`reparam.resources`, with ``share=MEMORY_SHARE``):
  the bytes an input would take, against the memory available, before numpy is asked for
  them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reparam.errors import UserInputError
from reparam.resources import available_memory
from reparam.resources import check_allocation as _check_allocation
from reparam.runtime.text import printable

__all__ = [
    "STANDARD_DOMAINS",
    "available_memory",
    "check_allocation",
    "check_domains",
    "check_graph",
    "custom_domains",
]

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# Inputs may take at most this share of the available memory: the graph's activations and
# outputs need the rest.
MEMORY_SHARE = 0.5


def custom_domains(model: Any) -> set[str]:
    """Operator domains of an ``onnx.ModelProto`` beyond those onnxruntime knows, including
    those used inside model-local functions and the functions' own domains."""
    used = {node.domain for node in model.graph.node}
    used |= {opset.domain for opset in model.opset_import}
    for function in model.functions:
        used.add(function.domain)
        used |= {node.domain for node in function.node}
        used |= {opset.domain for opset in function.opset_import}
    return used - STANDARD_DOMAINS


def check_domains(model: Any, path: Path, allowed: set[str]) -> set[str]:
    """The custom domains of ``model``; refuses any outside ``allowed``.

    Raises:
        UserInputError: a node, or a node inside a model-local function, uses a domain
            reparam has no implementation for.
    """
    domains = custom_domains(model)
    unknown = domains - allowed
    if unknown:
        where = ""
        for function in model.functions:
            inner = {node.domain for node in function.node} - STANDARD_DOMAINS - allowed
            if inner:
                where = (
                    f" (inside function {printable(function.domain)}::{printable(function.name)})"
                )
                break
        names = ", ".join(printable(d) for d in sorted(unknown))
        raise UserInputError(
            f"'{printable(str(path))}' uses operator domain(s) {names}{where} that reparam "
            "has no implementation for"
        )
    return domains


def _kind(value: Any) -> str:
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        return "tensor"
    return {"sequence_type": "sequence", "map_type": "map", "optional_type": "optional"}.get(
        kind or "", kind or "untyped"
    )


def check_graph(model: Any, path: Path) -> None:
    """Refuse graphs reparam cannot feed or read: no nodes, no inputs, non-tensor values.

    Raises:
        UserInputError: saying what the graph is.
    """
    import onnx  # heavy, optional at import time

    graph = model.graph
    name = printable(str(path))
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if not graph.node:
        raise UserInputError(
            f"'{name}' holds a graph with no nodes ({len(inputs)} input(s), "
            f"{len(graph.output)} output(s)): there is nothing to run"
        )
    if not inputs:
        raise UserInputError(
            f"'{name}' holds a graph with no inputs ({len(graph.node)} node(s)): a constant "
            "graph, not a model of an input"
        )
    for role, values in (("input", inputs), ("output", graph.output)):
        for value in values:
            kind = _kind(value)
            if kind != "tensor":
                raise UserInputError(
                    f"'{name}': {role} '{printable(value.name)}' is a {kind}; reparam runs "
                    "graphs whose inputs and outputs are numeric tensors"
                )
            element = value.type.tensor_type.elem_type
            if element == onnx.TensorProto.STRING:
                raise UserInputError(
                    f"'{name}': {role} '{printable(value.name)}' is a string tensor; reparam "
                    "runs graphs whose inputs and outputs are numeric tensors"
                )


def check_allocation(shapes: Sequence[Sequence[int]], dtypes: Sequence[Any], what: str) -> int:
    """:func:`reparam.resources.check_allocation` for graph inputs: they may take at most
    :data:`MEMORY_SHARE` of the available memory."""
    return _check_allocation(shapes, list(dtypes), what, share=MEMORY_SHARE)
