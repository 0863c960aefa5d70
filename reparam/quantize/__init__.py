"""Static INT8 quantization of an exported ONNX model, measured against its fp32 graph.

:func:`quantize_onnx` runs onnxruntime's pre-processing (``quant_pre_process``: shape
inference and graph cleanup) then ``quantize_static`` in QDQ format, uint8 activations and
int8 weights (the pairing x86 CPUs have fast kernels for), per-channel weight scales by
default. Per-tensor scales are the known accuracy trap of reparameterized networks: a fused
kernel sums branches whose output channels differ widely in range, and one scale for all of
them wastes most of the int8 levels on a few channels.

Then it measures what the user needs to decide: file sizes, onnxruntime latency fp32 vs
INT8 (one thread, batch 1 and batch N, runs interleaved so that load drift hits both, medians)
and accuracy against the fp32 graph on held-out calibration samples (max and mean relative
error, cosine, top-1 agreement when an output looks like class scores), optionally per
layer. ``min_cosine`` / ``min_agreement`` turn it into a gate: nothing is written when the
INT8 model falls short.

Dynamic quantization (weights int8, activations quantized at run time) is refused for graphs
with convolutions: onnxruntime then runs ConvInteger plus float rescaling, measured 3.9–4.7x
*slower* than fp32 on a fused ResNet-18 (one thread, batch 1 and 8).

DRConv's correlation and its guide conv stay in float (:mod:`reparam.quantize.graph`).

The modules: :mod:`~reparam.quantize.core` (:func:`quantize_onnx`, onnxruntime's
quantizer), :mod:`~reparam.quantize.report` (:class:`QuantizeReport`, :class:`LayerError`),
:mod:`~reparam.quantize.calibration` (:func:`load_calibration`, :class:`CalibrationData`),
:mod:`~reparam.quantize.graph` (graph inspection) and :mod:`~reparam.quantize.measure`
(accuracy, per-layer errors, timing, gates). onnx and onnxruntime are imported inside the
functions that need them, not on import.
"""

from reparam.quantize.calibration import CalibrationData, load_calibration
from reparam.quantize.core import METHODS, quantize_onnx
from reparam.quantize.report import LayerError, QuantizeReport

__all__ = [
    "METHODS",
    "CalibrationData",
    "LayerError",
    "QuantizeReport",
    "load_calibration",
    "quantize_onnx",
]
