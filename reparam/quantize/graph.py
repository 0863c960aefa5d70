"""Graph inspection for quantization: which nodes stay in float, node names, batch and shapes.

DRConv's correlation multiplies two activations (per-sample kernels generated from the input
times im2col columns): those MatMul nodes, ``com.reparam::Corr`` nodes and the conv feeding
DRConv's argmax guide stay in float (:func:`float_only_nodes`). The functions take an ONNX
``ModelProto`` or a :class:`reparam.runtime` session; nothing here imports onnx itself.
"""

from __future__ import annotations

from typing import Any


def float_only_nodes(model: Any) -> list[str]:
    """Nodes that must stay float: MatMuls of two activations (DRConv) and Corr nodes."""
    from reparam.ops.corr_onnx import DOMAIN

    constants = {init.name for init in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    keep = _argmax_feeders(model)
    for node in model.graph.node:
        two_activations = node.op_type == "MatMul" and not any(i in constants for i in node.input)
        if node.domain == DOMAIN or two_activations:
            keep.append(node.name)
    return keep


def _argmax_feeders(model: Any) -> list[str]:
    """The nearest Conv/Gemm/MatMul upstream of each ArgMax (DRConv's guide).

    A region choice by argmax is discontinuous: int8 noise in the guide's scores flips the
    chosen region at many pixels, each flip an error of order one.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    found: list[str] = []
    stack = [i for n in model.graph.node if n.op_type == "ArgMax" for i in n.input]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            found.append(node.name)
        else:
            stack.extend(node.input)
    return found


def name_nodes(model: Any) -> None:
    """Give every unnamed node a name: nodes_to_exclude and the layer report need them."""
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def has_conv(model: Any) -> bool:
    return any(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node)


def one_sample_shapes(session: Any) -> list[tuple[int, ...]]:
    return [(1, *shape[1:]) for shape in session.concrete_shapes(1)]


def fixed_batch_size(session: Any) -> int | None:
    """The graph's batch size when axis 0 is fixed (the same on every input), else None."""
    batches = {spec.shape[0] for spec in session.inputs if spec.shape}
    if len(batches) == 1:
        (batch,) = batches
        if isinstance(batch, int) and batch > 0:
            return batch
    return None


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeLinear"}  # fmt: skip
QUANTIZABLE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def refuse_unquantizable(model: Any, path: Any) -> None:
    """Refuse, from the graph alone, one that is already quantized or has nothing to quantize.

    onnxruntime would otherwise fail on an already-quantized graph with a duplicate-node
    message about a temporary file, and calibrate a large graph with nothing to quantize
    for minutes before saying so.
    """
    from reparam.errors import UserInputError, printable

    quantized = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS
                 or n.op_type.startswith("QLinear")]  # fmt: skip
    if quantized:
        raise UserInputError(
            f"'{printable(path)}' is already quantized ({len(quantized)} "
            f"{quantized[0].op_type} and other quantized nodes): quantize the fp32 graph "
            "(from reparam export) instead"
        )
    keep = set(float_only_nodes(model))
    if not any(n.op_type in QUANTIZABLE_OPS and n.name not in keep for n in model.graph.node):
        raise UserInputError(
            f"nothing to quantize in '{printable(path)}': it has no Conv, MatMul or Gemm "
            f"outside DRConv's float-only parts ({len(model.graph.node)} nodes); INT8 would "
            "only add quantize/dequantize pairs"
        )
