"""Run exported ONNX models under onnxruntime, or OpenVINO.

- :mod:`~reparam.runtime.session`: :func:`load` / :class:`OnnxModel`, a checked session with
  named inputs and outputs;
- :mod:`~reparam.runtime.graph_io`: what every session shares (:class:`GraphModel`): inputs
  checked by rank, fixed sizes and the valid ranges recorded under ``reparam.shape_ranges``;
- :mod:`~reparam.runtime.openvino`: OpenVINO IR conversion and :class:`OpenVinoModel` (the
  optional extra ``reparam[openvino]``; imported on use), with
  :mod:`~reparam.runtime.openvino_corr` lowering the custom Corr;
- :mod:`~reparam.runtime.verify_runtimes`: verification in each runtime;
- :mod:`~reparam.runtime.safety`: what a graph must be before onnxruntime loads it (allowed
  operator domains, function bodies included; tensor inputs and outputs) and what an input
  may cost in memory;
- :mod:`~reparam.runtime.inputs`: input arrays from .npy/.npz files, outputs to .npz;
- :mod:`~reparam.runtime.timing`: timed runs and their report.
"""

from reparam.runtime.graph_io import GraphModel, check_input_ranges
from reparam.runtime.inputs import read_inputs, save_outputs
from reparam.runtime.safety import STANDARD_DOMAINS, check_allocation, custom_domains
from reparam.runtime.session import (
    OPTIMIZATION_LEVELS,
    PREFERRED_PROVIDERS,
    OnnxModel,
    TensorSpec,
    default_providers,
    load,
    load_onnx,
    thread_count,
)
from reparam.runtime.timing import RunReport, run_timed

__all__ = [
    "OPTIMIZATION_LEVELS",
    "PREFERRED_PROVIDERS",
    "STANDARD_DOMAINS",
    "GraphModel",
    "OnnxModel",
    "RunReport",
    "TensorSpec",
    "check_allocation",
    "check_input_ranges",
    "custom_domains",
    "default_providers",
    "load",
    "load_onnx",
    "read_inputs",
    "run_timed",
    "save_outputs",
    "thread_count",
]
