"""``com.reparam::Corr`` as a model-local ONNX function of standard operators (onnxscript).

:func:`attach_corr_function` ships the node's meaning inside the file: a runtime with no Corr
kernel (plain onnxruntime, no custom-op library) inlines the function; a runtime with a
native kernel may use its own.

The body cannot give Conv the stride, padding and dilation as ``corr="standard"`` does,
because Conv's ``strides``/``pads``/``dilations`` are lists and an attribute reference must
keep the referenced attribute's type (Corr's are single ints), and Conv's ``group`` would
have to be the (dynamic) channel count. So it pads with ``Pad``, folds the channels into the
batch and splits each axis into s stride phases, which turns the strided, dilated im2col into
one stride-1 Conv with a one-hot weight built at run time (Q = d(k−1) div s + 1 grid taps per
axis)::

    xp     = Pad(x, p before, Hg·s − H − p after)      (B, C, Hg·s, Wg·s), Hg = H' + Qh − 1
    grid   = xp as (B·C, Hg, s, Wg, s) → (B·C, s², Hg, Wg), [a·s + b, u, v] = xp[s·u + a, s·v + b]
    weight = one-hot (kh·kw, s², Qh, Qw): tap (i, j) at phase (d·i mod s, d·j mod s),
             grid offset (d·i div s, d·j div s)
    im2col = Conv(grid, weight)                         (B·C, kh·kw, H', W')
    y      = MatMul(kernel as (B, g, O/g, C/g·kh·kw), im2col as (B, g, C/g·kh·kw, H'·W'))

A 1×1 window at stride 1 without padding (DRConv's region products in ``--corr custom``
graphs) takes an ``If`` branch that is the MatMul alone, on ``x`` as (B, g, C/g, H·W): the
pad, phase split and one-hot Conv would only copy the input there.

A negative end pad crops rows no output reads; a stride beyond the padded input is capped
there (one output pixel either way). Every scalar (s, p, d, g) comes from a ``Constant``
whose ``value_int`` references the node's attribute (onnxscript writes an attribute
parameter used as a value that way). onnxruntime's CPU Conv has no double kernel, so there
the function runs float and float16 inputs only (as ``corr="standard"`` graphs do).

The body's ops (Pad with a pads input, Squeeze with an axes input, Range, Conv, MatMul, …)
exist unchanged since opset 13; below 15, where CastLike is missing, the two CastLike nodes
are replaced by an EyeLike of a (2, 2) tensor of x's type (:func:`_without_castlike`).
"""

from __future__ import annotations

from typing import Any

from reparam.ops.corr_schema import ATTRIBUTE_DEFAULTS, DOMAIN, DOMAIN_VERSION, OP_TYPE
from reparam.ops.corr_validation import corr_nodes

__all__ = ["FUNCTION_OPSET", "attach_corr_function", "corr_function_proto"]

FUNCTION_OPSET = 18
_CASTLIKE_OPSET = 15


def _script() -> Any:
    """The onnxscript function (built on first use: onnxscript is a heavy import)."""
    from onnxscript import opset18 as op
    from onnxscript import script
    from onnxscript.values import Opset

    @script(Opset(DOMAIN, DOMAIN_VERSION), default_opset=op)
    def Corr(x, kernel, groups: int = 1, stride: int = 1, padding: int = 0, dilation: int = 1):
        one_shape = op.Constant(value_ints=[1])
        zero = op.Constant(value_ints=[0])
        one = op.Constant(value_ints=[1])
        zero2 = op.Constant(value_ints=[0, 0])
        minus_one = op.Constant(value_ints=[-1])
        s_attr = op.Reshape(op.Constant(value_int=stride), one_shape)  # shape (1,)
        p = op.Reshape(op.Constant(value_int=padding), one_shape)
        d = op.Reshape(op.Constant(value_int=dilation), one_shape)
        g = op.Reshape(op.Constant(value_int=groups), one_shape)
        zero_0d = op.Squeeze(zero, zero)
        one_0d = op.Squeeze(one, zero)

        x_shape = op.Shape(x)
        k_shape = op.Shape(kernel)
        batch = op.Gather(x_shape, op.Constant(value_ints=[0]), axis=0)
        out_channels = op.Gather(k_shape, op.Constant(value_ints=[1]), axis=0)
        # Both axes at once: each of these is the pair (height axis, width axis).
        size = op.Slice(x_shape, op.Constant(value_ints=[2]), op.Constant(value_ints=[4]))
        k = op.Slice(k_shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[5]))
        padded = op.Add(size, op.Add(p, p))
        # A stride beyond the padded input leaves one output pixel per axis whatever its
        # value; capping it there keeps the phase grid below about the padded input's size.
        s = op.Min(s_attr, op.ReduceMax(padded, keepdims=1))
        span = op.Mul(d, op.Sub(k, one))
        out = op.Add(op.Div(op.Sub(op.Sub(padded, span), one), s), one)  # (H', W')
        q = op.Add(op.Div(span, s), one)  # taps per stride phase (Qh, Qw)
        grid = op.Sub(op.Add(out, q), one)  # phase-grid size (Hg, Wg)
        end = op.Sub(op.Mul(grid, s), op.Add(size, p))  # end pads (negative: a crop)
        h_index, w_index = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        out_h, out_w = op.Gather(out, h_index, axis=0), op.Gather(out, w_index, axis=0)
        q_h, q_w = op.Gather(q, h_index, axis=0), op.Gather(q, w_index, axis=0)
        grid_h, grid_w = op.Gather(grid, h_index, axis=0), op.Gather(grid, w_index, axis=0)
        # Tap offsets d·i (i < k) per axis, as stride phase (d·i mod s) and grid shift.
        offsets_h = op.Mul(op.Range(zero_0d, op.Gather(k, zero_0d, axis=0), one_0d), d)
        offsets_w = op.Mul(op.Range(zero_0d, op.Gather(k, one_0d, axis=0), one_0d), d)
        phase_h, shift_h = op.Mod(offsets_h, s), op.Div(offsets_h, s)
        phase_w, shift_w = op.Mod(offsets_w, s), op.Div(offsets_w, s)

        # One-hot weight (kh·kw, s², Qh, Qw): tap (i, j) reads padded row s·oh + d·i, i.e.
        # phase (d·i mod s) at grid row oh + d·i div s (columns likewise), so a stride-1
        # convolution of the grid with it is the strided, dilated im2col (B·C, kh·kw, H', W').
        phase_count = op.Mul(s, s)
        area = op.Mul(q_h, q_w)
        row_at = op.Add(op.Mul(op.Mul(phase_h, s), area), op.Mul(shift_h, q_w))
        col_at = op.Add(op.Mul(phase_w, area), shift_w)
        hot = op.Add(op.Unsqueeze(row_at, one), op.Unsqueeze(col_at, zero))
        hot_flat = op.Reshape(hot, minus_one)  # (kh·kw,), tap i·kw + j
        depth = op.Mul(phase_count, area)
        cells = op.Range(zero_0d, op.Squeeze(depth, zero), one_0d)
        hits = op.Equal(op.Unsqueeze(hot_flat, one), cells)
        off = op.CastLike(zero, x)
        on = op.CastLike(one, x)
        one_hot = op.Where(hits, on, off)  # (kh·kw, s²·Qh·Qw) of x's type
        weight = op.Reshape(one_hot, op.Concat(minus_one, phase_count, q_h, q_w, axis=0))
        # Row length C/g·kh·kw from the kernel's own shape (its O/g is the -1).
        row = op.ReduceProd(
            op.Slice(k_shape, op.Constant(value_ints=[2]), op.Constant(value_ints=[5])),
            keepdims=1,
        )

        # A 1×1 window at stride 1 without padding (DRConv's region products in --corr
        # custom graphs) is one MatMul: skip the pad, phase split and one-hot Conv copies.
        unit = op.Concat(k, s_attr, op.Add(p, one), axis=0)  # all ≥ 1; all 1 iff pointwise
        if op.Equal(op.ReduceMax(unit, keepdims=0), one_0d):
            pixels_in = op.ReduceProd(size, keepdims=1)
            columns = op.Reshape(x, op.Concat(batch, g, minus_one, pixels_in, axis=0))
            weights = op.Reshape(kernel, op.Concat(batch, g, minus_one, row, axis=0))
            product = op.MatMul(weights, columns)  # (B, g, O/g, H·W)
            y = op.Reshape(product, op.Concat(batch, out_channels, size, axis=0))
        else:
            # Phase grid: pad (cropping with a negative end pad where the last rows are never
            # read) to grid·s rows and columns, fold the channels into the batch and split each
            # axis as (grid, s): channel (a, b) holds xp[.., s·u + a, s·v + b] at (u, v).
            pads = op.Concat(zero2, p, p, zero2, end, axis=0)
            xp = op.Pad(x, pads, mode="constant")
            split = op.Reshape(xp, op.Concat(minus_one, grid_h, s, grid_w, s, axis=0))
            phases = op.Transpose(split, perm=[0, 2, 4, 1, 3])  # (B·C, s, s, Hg, Wg)
            phase_shape = op.Concat(minus_one, phase_count, grid_h, grid_w, axis=0)
            phase_grid = op.Reshape(phases, phase_shape)
            patches = op.Conv(phase_grid, weight)  # (B·C, kh·kw, H', W')

            pixels = op.Mul(out_h, out_w)
            columns = op.Reshape(patches, op.Concat(batch, g, minus_one, pixels, axis=0))
            weights = op.Reshape(kernel, op.Concat(batch, g, minus_one, row, axis=0))
            product = op.MatMul(weights, columns)  # (B, g, O/g, H'W')
            y = op.Reshape(product, op.Concat(batch, out_channels, out_h, out_w, axis=0))
        return y

    return Corr


def _without_castlike(nodes: list) -> list:
    """Below opset 15: take the one-hot's type from an EyeLike of a (2, 2) tensor of x's type.

    EyeLike keeps its input's type whatever its values, and ``[[1, 0], [0, 1]]`` gives the
    1 and the 0 the two CastLike nodes made.
    """
    from onnx import helper

    casts = [n for n in nodes if n.op_type == "CastLike"]
    position = nodes.index(casts[0])
    off_name, on_name = (
        next(c.output[0] for c in casts if c.input[0] == v) for v in ("zero", "one")
    )
    eye = [
        helper.make_node("ReduceSum", ["x"], ["x_sum"], keepdims=0),
        helper.make_node("Constant", [], ["two_two"], value_ints=[2, 2]),
        helper.make_node("Expand", ["x_sum", "two_two"], ["x_square"]),
        helper.make_node("EyeLike", ["x_square"], ["eye"]),
        helper.make_node("Gather", ["eye", "zero"], ["eye_row"]),  # [[1, 0]]
        helper.make_node("Gather", ["eye_row", "one"], [off_name], axis=1),
        helper.make_node("Gather", ["eye_row", "zero"], [on_name], axis=1),
    ]
    kept = [n for n in nodes if n.op_type != "CastLike"]
    return kept[:position] + eye + kept[position:]


def corr_function_proto(opset: int = FUNCTION_OPSET) -> Any:
    """``com.reparam::Corr`` as an ONNX function of standard operators (see module docstring).

    Args:
        opset: the default-domain opset the body imports (the model's own, when attached).

    Returns:
        An ``onnx.FunctionProto`` with inputs ``x``, ``kernel``, output ``y`` and attributes
        groups, stride, padding, dilation (with the operator's defaults).
    """
    from onnx import helper

    script = _script().to_function_proto()
    defaults = {a.name: a.i for a in script.attribute_proto}
    if defaults != ATTRIBUTE_DEFAULTS:  # the script's signature must be the schema's
        raise RuntimeError(f"Corr function defaults {defaults} differ from {ATTRIBUTE_DEFAULTS}")
    nodes = list(script.node)
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(script.input),
        list(script.output),
        _without_castlike(nodes) if opset < _CASTLIKE_OPSET else nodes,
        [helper.make_opsetid("", opset)],  # the model's own version (the body is 13+)
        attributes=[],
        attribute_protos=list(script.attribute_proto),
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
