"""Checks and small facts on an ``onnx.ModelProto``: checker, shapes, metadata, names.

onnx is imported inside the functions that need it (a heavy optional import).
"""

from __future__ import annotations

from typing import Any

from reparam.errors import ExportError, summarize

__all__ = [
    "check_and_infer",
    "check_symbolic_axes",
    "custom_ops",
    "op_name",
    "rename_outputs",
    "set_metadata",
    "value_shape",
]


def check_and_infer(proto: Any, *, infer: bool = True) -> Any:
    """The ONNX checker with strict, type-checked shape inference; returns the proto.

    With ``infer`` the inferred proto is returned (value_info for every tensor, and output
    shapes the legacy exporter leaves out); without it, ``check_model(full_check=True)``
    runs the same strict inference once and the proto is returned as it was (the
    torch.export-based exporter already stores inferred shapes). Either way inference runs
    once: each pass costs about half a second on a ResNet-18.
    """
    import onnx  # heavy, optional at import time

    try:
        if not infer:
            onnx.checker.check_model(proto, full_check=True)
            return proto
        onnx.checker.check_model(proto)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as error:
        raise ExportError(
            f"the exported graph fails the ONNX checker: {summarize(error)}"
        ) from error


def rename_outputs(proto: Any, names: list[str]) -> None:
    """Give the graph outputs ``names``, renaming every use of the old names in the graph."""
    mapping = {
        value.name: name
        for value, name in zip(proto.graph.output, names, strict=True)
        if value.name != name
    }
    if not mapping:
        return
    graph = proto.graph
    used = {name for node in graph.node for name in [*node.input, *node.output]}
    used |= {value.name for value in [*graph.input, *graph.initializer]}
    for taken in set(mapping.values()) & (used - set(mapping)):  # an inner value has the name
        spare = next(
            f"{taken}_inner{i}" for i in range(len(used) + 1) if f"{taken}_inner{i}" not in used
        )
        mapping[taken] = spare
        used.add(spare)
    for node in proto.graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for value in [*graph.output, *graph.value_info, *graph.input, *graph.initializer]:
        value.name = mapping.get(value.name, value.name)


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` keys, replacing earlier values of the same keys."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def value_shape(value: Any) -> tuple[int | str, ...]:
    """A graph input/output's shape: ints for fixed axes, names for symbolic ones."""
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    )


def op_name(node: Any) -> str:
    """``Conv``, or ``domain::Op`` outside the standard domain."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def custom_ops(proto: Any) -> list[str]:
    """``domain::Op`` of every node outside the standard domain, sorted."""
    return sorted({op_name(n) for n in proto.graph.node if n.domain not in ("", "ai.onnx")})


def check_symbolic_axes(proto: Any, dynamic_batch: bool, dynamic_hw: bool) -> None:
    """Refuse a graph whose requested dynamic input axes came out as constants."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        axes = ([0] if dynamic_batch and dims else []) + (
            list(range(2, len(dims))) if dynamic_hw else []
        )
        for axis in axes:
            if dims[axis].HasField("dim_value"):
                what = "batch" if axis == 0 else "height/width"
                raise ExportError(
                    f"the exporter fixed axis {axis} of input '{value.name}' to "
                    f"{dims[axis].dim_value}: the model's code depends on that size, so the "
                    f"graph cannot have a dynamic {what}; export with a static {what}"
                )
