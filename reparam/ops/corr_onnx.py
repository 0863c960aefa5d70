"""``torch.ops.reparam.corr`` as one ONNX node: ``com.reparam::Corr`` (domain version 1).

The node has inputs ``x`` (B, C, H, W) and ``kernel`` (B, O, C/groups, kh, kw), one output
(B, O, H', W') with H' = floor((H + 2p − d(kh−1) − 1)/s) + 1, and int attributes
``groups``, ``stride``, ``padding``, ``dilation`` — the operator's own arguments, always
written out (a symbolic that drops stride/padding or gives no domain exports a node no
runtime can interpret).

Two exporters, two routes (https://pytorch.org/docs/stable/onnx.html):

- the torch.export-based exporter ignores ``autograd.Function.symbolic``; it maps the
  registered op ``torch.ops.reparam.corr.default`` through :func:`translation_table`, an
  onnxscript function. Trailing arguments equal to their defaults are dropped from the
  traced graph, so the function's defaults must be the op's (checked at import of the
  table);
- the legacy TorchScript exporter uses :func:`register_legacy_symbolic`.

:func:`register_schema` teaches ``onnx`` the node (once per process) so that
``check_model(full_check=True)`` and shape inference accept and type it.

:func:`attach_corr_function` ships the node's meaning inside the file: a model-local
``FunctionProto`` ``com.reparam::Corr`` (:func:`corr_function_proto`) made of standard
operators. A runtime with no Corr kernel (plain onnxruntime, no custom-op library) inlines
it; a runtime with a native kernel may use its own. Its body cannot give Conv the stride,
padding and dilation as ``corr="standard"`` does, because Conv's ``strides``/``pads``/
``dilations`` are lists and an attribute reference must keep the referenced attribute's type
(Corr's are single ints), and Conv's ``group`` would have to be the (dynamic) channel count.
So it pads with ``Pad``, folds the channels into the batch and splits each axis into s stride
phases, which turns the strided, dilated im2col into one stride-1 Conv with a one-hot weight
built at run time (Q = d(k−1) div s + 1 grid taps per axis)::

    xp     = Pad(x, p before, Hg·s − H − p after)      (B, C, Hg·s, Wg·s), Hg = H' + Qh − 1
    grid   = xp as (B·C, Hg, s, Wg, s) → (B·C, s², Hg, Wg), [a·s + b, u, v] = xp[s·u + a, s·v + b]
    weight = one-hot (kh·kw, s², Qh, Qw): tap (i, j) at phase (d·i mod s, d·j mod s),
             grid offset (d·i div s, d·j div s)
    im2col = Conv(grid, weight)                         (B·C, kh·kw, H', W')
    y      = MatMul(kernel as (B, g, O/g, C/g·kh·kw), im2col as (B, g, C/g·kh·kw, H'·W'))

A negative end pad crops rows no output reads; a stride beyond the padded input is capped
there (one output pixel either way). Every scalar (s, p, d, g) comes from a ``Constant``
whose ``value_int`` references the node's attribute. onnxruntime's CPU Conv has no double
kernel, so there the function runs float and float16 inputs only (as ``corr="standard"``
graphs do). :func:`validate_corr_nodes` checks every Corr node's attributes and the static
shapes it can see, so a crafted graph is refused at load time instead of failing inside a
kernel.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ATTRIBUTE_DEFAULTS",
    "DOMAIN",
    "DOMAIN_VERSION",
    "FUNCTION_OPSET",
    "OP_TYPE",
    "attach_corr_function",
    "corr_function_proto",
    "corr_nodes",
    "register_legacy_symbolic",
    "register_schema",
    "translation_table",
    "validate_corr_nodes",
]

DOMAIN = "com.reparam"
DOMAIN_VERSION = 1
OP_TYPE = "Corr"
ATTRIBUTE_DEFAULTS = {"groups": 1, "stride": 1, "padding": 0, "dilation": 1}
# The body's ops (Pad with a pads input, Squeeze with an axes input, Range, Conv, MatMul, …)
# all exist unchanged since opset 13 (below 15, EyeLike stands in for CastLike); the function
# imports the model's own default-domain version when attaching.
FUNCTION_OPSET = 18

_legacy_registered = False


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _infer_corr(ctx: Any) -> None:
    """ONNX type and shape inference: element type of x; (B, O, H', W') where known."""
    import onnx

    x_type, kernel_type = ctx.get_input_type(0), ctx.get_input_type(1)
    attrs = dict(ATTRIBUTE_DEFAULTS)
    for name in attrs:
        proto = ctx.get_attribute(name)
        if proto is not None and proto.name:
            attrs[name] = proto.i
    out = onnx.TypeProto()
    out.tensor_type.elem_type = x_type.tensor_type.elem_type
    x_shape, k_shape = x_type.tensor_type.shape, kernel_type.tensor_type.shape
    if len(x_shape.dim) == 4 and len(k_shape.dim) == 5:
        dims = out.tensor_type.shape.dim
        dims.add().CopyFrom(x_shape.dim[0])
        dims.add().CopyFrom(k_shape.dim[1])
        for axis in (2, 3):
            size, kernel, dim = x_shape.dim[axis], k_shape.dim[axis + 1], dims.add()
            if size.HasField("dim_value") and kernel.HasField("dim_value"):
                dim.dim_value = _output_size(
                    size.dim_value,
                    kernel.dim_value,
                    attrs["stride"],
                    attrs["padding"],
                    attrs["dilation"],
                )
    ctx.set_output_type(0, out)


def register_schema() -> None:
    """Register the ``com.reparam::Corr`` schema with ``onnx`` unless already known."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        "Per-sample cross-correlation: y[b] = Conv(x[b], kernel[b]) with the given groups, "
        "stride, padding (symmetric, both axes) and dilation.",
        inputs=[
            OpSchema.FormalParameter("x", "T", "input (B, C, H, W)"),
            OpSchema.FormalParameter("kernel", "T", "per-sample kernels (B, O, C/groups, kh, kw)"),
        ],
        outputs=[OpSchema.FormalParameter("y", "T", "output (B, O, H', W')")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(double)", "tensor(float16)"], "float tensors")
        ],
        attributes=[
            OpSchema.Attribute(name, onnx.helper.make_attribute(name, value), name)
            for name, value in ATTRIBUTE_DEFAULTS.items()
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_corr)
    onnx.defs.register_schema(schema)


def _op_defaults() -> dict[str, int]:
    import torch

    import reparam.ops.corr  # noqa: F401  (registers torch.ops.reparam.corr)

    schema = torch.ops.reparam.corr.default._schema
    return {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: op → Corr node."""
    import torch
    from onnxscript.values import Opset

    register_schema()
    defaults = _op_defaults()
    if defaults != ATTRIBUTE_DEFAULTS:  # the translation below would write wrong attributes
        raise RuntimeError(
            f"torch.ops.reparam.corr defaults {defaults} differ from the ONNX translation's "
            f"{ATTRIBUTE_DEFAULTS}"
        )
    reparam_opset = Opset(DOMAIN, DOMAIN_VERSION)

    def corr(x, kernel, groups: int = 1, stride: int = 1, padding: int = 0, dilation: int = 1):
        return reparam_opset.Corr(
            x, kernel, groups=groups, stride=stride, padding=padding, dilation=dilation
        )

    return {torch.ops.reparam.corr.default: corr}


def register_legacy_symbolic() -> None:
    """Teach the legacy TorchScript exporter to write ``reparam::corr`` as a Corr node."""
    global _legacy_registered
    if _legacy_registered:
        return
    import torch
    from torch.onnx import symbolic_helper

    import reparam.ops.corr  # noqa: F401

    @symbolic_helper.parse_args("v", "v", "i", "i", "i", "i")
    def corr_symbolic(g, x, kernel, groups, stride, padding, dilation):
        out = g.op(
            f"{DOMAIN}::{OP_TYPE}",
            x,
            kernel,
            groups_i=groups,
            stride_i=stride,
            padding_i=padding,
            dilation_i=dilation,
        )
        out.setType(x.type().with_sizes([None] * 4))
        return out

    register_schema()
    torch.onnx.register_custom_op_symbolic("reparam::corr", corr_symbolic, DOMAIN_VERSION)
    _legacy_registered = True


def corr_nodes(model: Any) -> list:
    """The ``com.reparam::Corr`` nodes of an ``onnx.ModelProto``'s main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def corr_function_proto(opset: int = FUNCTION_OPSET) -> Any:
    """``com.reparam::Corr`` as an ONNX function of standard operators (see module docstring).

    Args:
        opset: the default-domain opset the body imports (the model's own, when attached).

    Returns:
        An ``onnx.FunctionProto`` with inputs ``x``, ``kernel``, output ``y`` and attributes
        groups, stride, padding, dilation (with the operator's defaults).
    """
    import onnx
    from onnx import helper

    nodes = []

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(name: str, values: list[int]) -> str:
        tensor = helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values)
        return node("Constant", [], name, value=tensor)

    def attr_scalar(attr: str) -> str:
        # A Constant's value_int referencing the Corr node's attribute: a 0-d int64 tensor.
        constant = helper.make_node("Constant", [], [f"{attr}_0d"])
        # helper.make_attribute_ref names the referencing and referenced attribute alike.
        constant.attribute.append(
            onnx.AttributeProto(name="value_int", type=onnx.AttributeProto.INT, ref_attr_name=attr)
        )
        nodes.append(constant)
        return node("Reshape", [f"{attr}_0d", "one_shape"], f"{attr}_1d")  # shape (1,)

    const("one_shape", [1])
    zero, one = const("zero", [0]), const("one", [1])
    zero2, minus_one = const("zero2", [0, 0]), const("minus_one", [-1])
    stride, padding = attr_scalar("stride"), attr_scalar("padding")
    dilation, groups = attr_scalar("dilation"), attr_scalar("groups")
    zero_0d, one_0d = (node("Squeeze", [v, zero], f"{v}_0d") for v in (zero, one))

    x_shape = node("Shape", ["x"], "x_shape")
    k_shape = node("Shape", ["kernel"], "k_shape")

    def dim(shape: str, index: int, name: str) -> str:
        return node("Gather", [shape, const(f"{name}_index", [index])], name, axis=0)

    batch, height, width = dim(x_shape, 0, "B"), dim(x_shape, 2, "H"), dim(x_shape, 3, "W")
    out_channels, kh, kw = dim(k_shape, 1, "O"), dim(k_shape, 3, "kh"), dim(k_shape, 4, "kw")
    two_p = node("Add", [padding, padding], "two_p")
    padded_h = node("Add", [height, two_p], "h_padded")
    padded_w = node("Add", [width, two_p], "w_padded")
    # A stride beyond the padded input leaves one output pixel per axis whatever its value;
    # capping it there keeps the phase grid below about the padded input's size.
    largest = node("Max", [padded_h, padded_w], "largest")
    stride = node("Min", [stride, largest], "stride_capped")

    def axis_geometry(padded: str, size: str, k: str, axis: str) -> tuple[str, ...]:
        """Output size, taps per phase Q, phase-grid size, end padding and tap offsets."""
        span = node("Mul", [dilation, node("Sub", [k, one], f"{axis}_k1")], f"{axis}_span")
        last = node("Sub", [node("Sub", [padded, span], f"{axis}_room"), one], f"{axis}_last")
        out = node("Add", [node("Div", [last, stride], f"{axis}_steps"), one], f"{axis}_out")
        taps = node("Add", [node("Div", [span, stride], f"{axis}_q_last"), one], f"{axis}_q")
        grid = node("Sub", [node("Add", [out, taps], f"{axis}_grid1"), one], f"{axis}_grid")
        reach = node("Mul", [grid, stride], f"{axis}_reach")
        end = node("Sub", [reach, node("Add", [size, padding], f"{axis}_front")], f"{axis}_end")
        k0 = node("Squeeze", [k, zero], f"{axis}_k_0d")
        positions = node("Range", [zero_0d, k0, one_0d], f"{axis}_positions")
        offsets = node("Mul", [positions, dilation], f"{axis}_offsets")  # d·i, i < k
        phase = node("Mod", [offsets, stride], f"{axis}_phase")
        shift = node("Div", [offsets, stride], f"{axis}_shift")
        return out, taps, grid, end, phase, shift

    out_h, q_h, grid_h, end_h, phase_h, shift_h = axis_geometry(padded_h, height, kh, "h")
    out_w, q_w, grid_w, end_w, phase_w, shift_w = axis_geometry(padded_w, width, kw, "w")

    # Phase grid: pad (cropping with a negative end pad where the last rows are never read)
    # to grid·s rows and columns, fold the channels into the batch and split each axis as
    # (grid, s): channel (a, b) holds xp[.., s·u + a, s·v + b] at (u, v).
    pads = node("Concat", [zero2, padding, padding, zero2, end_h, end_w], "pads", axis=0)
    padded = node("Pad", ["x", pads], "xp", mode="constant")
    split_shape = node("Concat", [minus_one, grid_h, stride, grid_w, stride], "split", axis=0)
    split = node("Reshape", [padded, split_shape], "split_x")  # (B·C, Hg, s, Wg, s)
    phases = node("Transpose", [split], "phases", perm=[0, 2, 4, 1, 3])  # (B·C, s, s, Hg, Wg)
    phase_count = node("Mul", [stride, stride], "phase_count")
    grid_shape = node("Concat", [minus_one, phase_count, grid_h, grid_w], "grid_shape", axis=0)
    grid = node("Reshape", [phases, grid_shape], "grid")  # (B·C, s², Hg, Wg)

    # One-hot weight (kh·kw, s², Qh, Qw): tap (i, j) reads padded row s·oh + d·i, i.e. phase
    # (d·i mod s) at grid row oh + d·i div s (columns likewise), so a stride-1 convolution
    # of the grid with it is the strided, dilated im2col (B·C, kh·kw, H', W').
    area = node("Mul", [q_h, q_w], "area")
    row_phase = node("Mul", [node("Mul", [phase_h, stride], "h_phase_row"), area], "h_phase_at")
    row_at = node("Add", [row_phase, node("Mul", [shift_h, q_w], "h_shift_at")], "h_at")
    col_at = node("Add", [node("Mul", [phase_w, area], "w_phase_at"), shift_w], "w_at")
    hot = node(
        "Add",
        [node("Unsqueeze", [row_at, one], "h_at_col"), node("Unsqueeze", [col_at, zero], "w_row")],
        "hot",
    )
    hot = node("Reshape", [hot, minus_one], "hot_flat")  # (kh·kw,), tap i·kw + j
    depth = node("Mul", [phase_count, area], "depth")
    cells = node("Range", [zero_0d, node("Squeeze", [depth, zero], "depth_0d"), one_0d], "cells")
    hits = node("Equal", [node("Unsqueeze", [hot, one], "hot_col"), cells], "hits")
    if opset >= 15:
        off = node("CastLike", [zero, "x"], "off")
        on = node("CastLike", [one, "x"], "on")
    else:  # no CastLike: EyeLike keeps its (2, 2) input's type, whatever x's values are
        total = node("ReduceSum", ["x"], "x_sum", keepdims=0)
        square = node("Expand", [total, const("two_two", [2, 2])], "x_square")
        first_row = node("Gather", [node("EyeLike", [square], "eye"), zero], "eye_row")  # [[1, 0]]
        off = node("Gather", [first_row, one], "off", axis=1)
        on = node("Gather", [first_row, zero], "on", axis=1)
    one_hot = node("Where", [hits, on, off], "one_hot")  # (kh·kw, s²·Qh·Qw) of x's type
    weight_shape = node("Concat", [minus_one, phase_count, q_h, q_w], "weight_shape", axis=0)
    weight = node("Reshape", [one_hot, weight_shape], "weight")
    patches = node("Conv", [grid, weight], "patches")  # (B·C, kh·kw, H', W')

    pixels = node("Mul", [out_h, out_w], "pixels")
    columns_shape = node("Concat", [batch, groups, minus_one, pixels], "columns_shape", axis=0)
    columns = node("Reshape", [patches, columns_shape], "columns")  # (B, g, C/g·kh·kw, H'W')
    # Row length C/g·kh·kw from the kernel's own shape (its O/g is the -1).
    k_tail = node("Slice", [k_shape, const("two", [2]), const("five", [5])], "k_tail")
    row = node("ReduceProd", [k_tail], "row", keepdims=1)
    weights_shape = node("Concat", [batch, groups, minus_one, row], "weights_shape", axis=0)
    weights = node("Reshape", ["kernel", weights_shape], "weights")  # (B, g, O/g, C/g·kh·kw)
    product = node("MatMul", [weights, columns], "product")  # (B, g, O/g, H'W')
    y_shape = node("Concat", [batch, out_channels, out_h, out_w], "y_shape", axis=0)
    node("Reshape", [product, y_shape], "y")

    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        ["x", "kernel"],
        ["y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=[],
        attribute_protos=[
            helper.make_attribute(name, value) for name, value in ATTRIBUTE_DEFAULTS.items()
        ],
        doc_string="Per-sample cross-correlation y[b] = Conv(x[b], kernel[b]); standard-op body.",
    )


def attach_corr_function(model: Any) -> Any:
    """Add :func:`corr_function_proto` to ``model.functions`` (in place) and return ``model``.

    Idempotent; a no-op when the graph has no Corr node. The function imports the model's own
    default-domain opset, and the model imports ``com.reparam`` version 1.
    """
    from onnx import helper

    if not corr_nodes(model):
        return model
    if any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        return model
    opset = next(
        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), FUNCTION_OPSET
    )
    model.functions.append(corr_function_proto(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


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


_MAX_ATTRIBUTE = 1 << 16  # beyond this a size computation is nonsense, not a model
