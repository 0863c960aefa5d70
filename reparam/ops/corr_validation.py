"""Checks of ``com.reparam::Corr`` nodes in a graph read from a file.

:func:`validate_corr_nodes` checks every Corr node's attributes and the static shapes it can
see, so a crafted graph is refused at load time instead of failing inside a kernel.
"""

from __future__ import annotations

from typing import Any

from reparam.ops.corr_schema import ATTRIBUTE_DEFAULTS, DOMAIN, OP_TYPE

__all__ = ["corr_nodes", "validate_corr_nodes"]

_MAX_ATTRIBUTE = 1 << 16  # beyond this a size computation is nonsense, not a model


def corr_nodes(model: Any) -> list:
    """The ``com.reparam::Corr`` nodes of an ``onnx.ModelProto``'s main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def _static_shape(value_info: Any) -> tuple[int | None, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def validate_corr_nodes(model: Any) -> list[str]:
    """Problems with the ``com.reparam::Corr`` nodes of ``model``, one line each; [] if none.

    Checks what a kernel would otherwise trip over at run time: integer attributes with
    groups, stride, dilation ≥ 1 and padding ≥ 0 (and nothing absurdly large), only the
    four known attributes, two inputs and one output, and — where the graph declares the
    shapes — x of rank 4, kernel of rank 5, channels divisible by groups and the kernel's
    C/groups matching x. Nodes inside model-local function bodies are checked too.
    """
    import onnx

    shapes: dict[str, tuple[int | None, ...] | None] = {}
    graph = model.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        shapes[value.name] = _static_shape(value)
    candidates = [(node, "graph") for node in graph.node]
    for function in model.functions:
        candidates += [
            (node, f"function {function.domain}::{function.name}") for node in function.node
        ]

    problems = []
    for node, where in candidates:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        label = f"{DOMAIN}::{OP_TYPE} node '{node.name or '?'}' ({where})"
        if len(node.input) != 2 or len(node.output) != 1:
            problems.append(f"{label}: needs 2 inputs and 1 output, has {len(node.input)} "
                            f"and {len(node.output)}")  # fmt: skip
        attrs = dict(ATTRIBUTE_DEFAULTS)
        for attribute in node.attribute:
            if attribute.name not in ATTRIBUTE_DEFAULTS:
                problems.append(f"{label}: unknown attribute '{attribute.name}'")
            elif attribute.ref_attr_name:
                continue  # a reference inside a function: checked where the caller sets it
            elif attribute.type != onnx.AttributeProto.INT:
                problems.append(f"{label}: attribute '{attribute.name}' must be an int")
            else:
                attrs[attribute.name] = attribute.i
        lowest = {"groups": 1, "stride": 1, "dilation": 1, "padding": 0}
        for name, value in attrs.items():
            if not lowest[name] <= value <= _MAX_ATTRIBUTE:
                problems.append(
                    f"{label}: {name}={value}, must be between {lowest[name]} and {_MAX_ATTRIBUTE}"
                )
        if len(node.input) != 2:
            continue
        x_shape, k_shape = shapes.get(node.input[0]), shapes.get(node.input[1])
        if x_shape is not None and len(x_shape) != 4:
            problems.append(f"{label}: x must have rank 4 (B, C, H, W), has rank {len(x_shape)}")
        if k_shape is not None and len(k_shape) != 5:
            problems.append(
                f"{label}: kernel must have rank 5 (B, O, C/groups, kh, kw), has rank "
                f"{len(k_shape)}"
            )
        if x_shape and k_shape and len(x_shape) == 4 and len(k_shape) == 5:
            groups, channels, per_group = attrs["groups"], x_shape[1], k_shape[2]
            if groups >= 1 and channels and channels % groups:
                problems.append(f"{label}: {channels} input channels not divisible by "
                                f"groups={groups}")  # fmt: skip
            elif groups >= 1 and channels and per_group and per_group * groups != channels:
                problems.append(f"{label}: kernel has {per_group} channels per group, x has "
                                f"{channels} in {groups} groups")  # fmt: skip
    return problems
