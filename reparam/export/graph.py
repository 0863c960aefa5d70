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


def rename_outputs(proto: Any, names: list[str]) -> Any:
    """The model with its graph outputs named ``names``; returns a new proto.

    Done in onnx_ir, where a value is one object that every use refers to, so renaming it
    renames its uses; an inner value that already has a wanted name gets another one first.
    """
    import onnx_ir as ir  # heavy, optional at import time

    current = [value.name for value in proto.graph.output]
    if current == list(names):
        return proto
    model = ir.from_proto(proto)
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values()]
    values += [value for node in graph for value in node.outputs]
    taken = {value.name for value in values}
    outputs = {id(value) for value in graph.outputs}
    for value in values:
        if value.name in names and id(value) not in outputs:
            spare = next(
                f"{value.name}_inner{i}" for i in range(len(taken) + 1)
                if f"{value.name}_inner{i}" not in taken
            )  # fmt: skip
            taken.add(spare)
            value.name = spare
    for value, name in zip(graph.outputs, names, strict=True):
        value.name = name
    return ir.to_proto(model)


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` keys (``onnx.helper.set_model_props``), keeping the others."""
    from onnx import helper  # heavy, optional at import time

    merged = {entry.key: entry.value for entry in proto.metadata_props}
    merged.update(metadata)
    helper.set_model_props(proto, merged)


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
