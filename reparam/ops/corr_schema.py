"""``com.reparam::Corr`` (domain version 1): its ONNX schema and the exporters' translations.

The node has inputs ``x`` (B, C, H, W) and ``kernel`` (B, O, C/groups, kh, kw), one output
(B, O, H', W') with H' = floor((H + 2p − d(kh−1) − 1)/s) + 1, and int attributes
``groups``, ``stride``, ``padding``, ``dilation`` — the operator's own arguments, always
written out (a symbolic that drops stride/padding or gives no domain exports a node no
runtime can interpret).

Two exporters, two routes (https://pytorch.org/docs/stable/onnx.html):

- the torch.export-based exporter ignores ``autograd.Function.symbolic``; it maps the
  registered op ``torch.ops.reparam.corr.default`` through :func:`translation_table`, an
  onnxscript function. Trailing arguments equal to their defaults are dropped from the
  traced graph, so the function's defaults must be the op's (checked when the table is made);
- the legacy TorchScript exporter uses :func:`register_legacy_symbolic`.

:func:`register_schema` teaches ``onnx`` the node (once per process) so that
``check_model(full_check=True)`` and shape inference accept and type it. The node's meaning
as standard operators is :mod:`reparam.ops.corr_function`; its checks are
:mod:`reparam.ops.corr_validation`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ATTRIBUTE_DEFAULTS",
    "DOMAIN",
    "DOMAIN_VERSION",
    "OP_TYPE",
    "output_size",
    "register_legacy_symbolic",
    "register_schema",
    "translation_table",
]

DOMAIN = "com.reparam"
DOMAIN_VERSION = 1
OP_TYPE = "Corr"
ATTRIBUTE_DEFAULTS = {"groups": 1, "stride": 1, "padding": 0, "dilation": 1}
_legacy_registered = False


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """floor((size + 2p − d(k−1) − 1)/s) + 1: the correlation's output size on one axis."""
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
                dim.dim_value = output_size(
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
