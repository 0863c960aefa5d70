"""``com.reparam::Corr`` lowered to OpenVINO operations: an ONNX frontend conversion extension.

Corr is a per-sample cross-correlation, ``y[b] = Conv(x[b], kernel[b])`` (groups g, stride s,
padding p, dilation d). The standard-op function that reparam ships in the ONNX file cannot
be used here: its stride cap depends on H and W, so with a dynamic H/W its one-hot Conv
weight has a shape known only at run time, and OpenVINO's CPU plugin refuses a Convolution
with dynamic weights ("Doesn't support dynamic weights shape"). The extension builds the
same im2col product from operations that take dynamic shapes::

    xp      = Pad(x, p)                                             (B, C, Hp, Wp)
    patches = ExtractImagePatches(xp, [kh, kw], [s, s], [d, d], valid)
              depth ordered (i, j, c): patches[b, (i·kw + j)·C + c, u, v]
                                       = xp[b, c, s·u + d·i, s·v + d·j]
    columns = patches as (B, K, g, C/g, P) → (B, g, K, C/g, P) → (B, g, K·C/g, P)
    weights = kernel as (B, g, O/g, C/g, K) → (B, g, O/g, K, C/g) → (B, g, O/g, K·C/g)
    y       = MatMul(weights, columns) as (B, O, H', W')

(a 1×1 window at stride 1 skips ExtractImagePatches: the padded input is its own patches),
with K = kh·kw and P = H'·W', H' = floor((Hp − d(kh − 1) − 1)/s) + 1 (the Corr output size;
a stride beyond the padded input gives one output pixel, as in the function). Every value
is copied or multiplied once, as in the function's im2col, so the result matches onnxruntime
to float32 rounding. kh and kw must be static (they are in every graph reparam exports).
"""

from __future__ import annotations

from typing import Any

__all__ = ["corr_extension"]


def _convert_corr(node: Any) -> list[Any]:
    import numpy as np
    import openvino.opset13 as ops

    from reparam.ops.corr_onnx import ATTRIBUTE_DEFAULTS

    attributes = {
        name: int(node.get_attribute(name, default)) if node.has_attribute(name) else default
        for name, default in ATTRIBUTE_DEFAULTS.items()
    }
    groups, stride = attributes["groups"], attributes["stride"]
    padding, dilation = attributes["padding"], attributes["dilation"]
    x, kernel = node.get_input(0), node.get_input(1)
    kernel_shape = kernel.get_partial_shape()
    if kernel_shape.rank.is_dynamic or kernel_shape.rank.get_length() != 5:
        raise ValueError("Corr's kernel must have rank 5 (B, O, C/groups, kh, kw)")
    if kernel_shape[3].is_dynamic or kernel_shape[4].is_dynamic:
        raise ValueError("Corr's kernel height and width must be static for OpenVINO")
    kh, kw = kernel_shape[3].get_length(), kernel_shape[4].get_length()
    taps = kh * kw

    def const(values: list[int]) -> Any:
        return ops.constant(np.array(values, dtype=np.int64))

    def dims(tensor: Any, *axes: int) -> Any:
        return ops.gather(ops.shape_of(tensor), const(list(axes)), const([0]))

    if padding:
        x = ops.pad(x, const([0, 0, padding, padding]), const([0, 0, padding, padding]), "constant")
    if taps == 1 and stride == 1:  # the input is its own patches (no copy)
        patches = x
    else:
        patches = ops.extract_image_patches(
            x, [kh, kw], [stride, stride], [dilation, dilation], "valid"
        )
    batch, out_h, out_w = dims(patches, 0), dims(patches, 2), dims(patches, 3)
    pixels = ops.multiply(out_h, out_w)
    g = const([groups])
    columns = ops.reshape(
        patches, ops.concat([batch, const([taps]), g, const([-1]), pixels], 0), False
    )
    columns = ops.transpose(columns, const([0, 2, 1, 3, 4]))
    columns = ops.reshape(columns, ops.concat([batch, g, const([-1]), pixels], 0), False)
    out_channels, group_channels = dims(kernel, 1), dims(kernel, 2)
    per_group = ops.divide(out_channels, g)
    weights = ops.reshape(
        kernel,
        ops.concat([dims(kernel, 0), g, per_group, group_channels, const([taps])], 0),
        False,
    )
    weights = ops.transpose(weights, const([0, 1, 2, 4, 3]))
    weights = ops.reshape(
        weights, ops.concat([dims(kernel, 0), g, per_group, const([-1])], 0), False
    )
    product = ops.matmul(weights, columns, False, False)
    y = ops.reshape(product, ops.concat([batch, out_channels, out_h, out_w], 0), False)
    return [y.output(0)]


def corr_extension() -> Any:
    """The ONNX frontend extension converting ``com.reparam::Corr`` (pass to
    ``openvino.convert_model(..., extension=[...])``)."""
    from openvino.frontend.onnx import ConversionExtension

    from reparam.ops.corr_onnx import DOMAIN, OP_TYPE

    return ConversionExtension(OP_TYPE, DOMAIN, _convert_corr)
