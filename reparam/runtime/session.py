"""Run exported ONNX models under onnxruntime.

:func:`load` opens a model file as an :class:`OnnxModel`: an ``InferenceSession`` with

- the ``com.reparam`` custom operators registered when the graph uses them (through
  onnxruntime-extensions; a clear error says what to install when it is missing);
- execution providers chosen from ``onnxruntime.get_available_providers()``;
- as many intra-op threads as this process may use (at most 16; an explicit count is capped
  at four per usable CPU, since onnxruntime crashes creating a hundred thousand threads),
  one inter-op thread, and ``session.intra_op.allow_spinning = 0``: spinning threads distort
  timings and starve other sessions on small machines
  (https://onnxruntime.ai/docs/performance/tune-performance/threading.html);
- onnxruntime's own log limited to errors (fatal only when ``quiet``), so its coloured
  warning lines do not precede reparam's one-line errors;

and named, shape-checked inputs and outputs for numpy arrays. The graph is checked before
onnxruntime sees it (:mod:`reparam.runtime.safety`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reparam.errors import UserInputError, summarize
from reparam.resources import max_threads, usable_cpus
from reparam.runtime.graph_io import GraphModel, TensorSpec
from reparam.runtime.safety import (
    check_domains,
    check_graph,
    custom_domains,
)
from reparam.runtime.text import printable

__all__ = [
    "OPTIMIZATION_LEVELS",
    "PREFERRED_PROVIDERS",
    "OnnxModel",
    "TensorSpec",
    "custom_domains",
    "default_providers",
    "load",
    "load_onnx",
    "thread_count",
]

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
OPTIMIZATION_LEVELS = ("all", "basic", "extended", "disable")
MAX_THREADS = 16  # the default: more rarely helps a CNN and costs memory per thread

_ELEMENT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def load_onnx(path: str | os.PathLike) -> Any:
    """``onnx.load`` with one-line errors for a missing or unreadable file.

    Raises:
        UserInputError: the file does not exist or is not an ONNX model.
    """
    import onnx

    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"ONNX file '{printable(str(path))}' is a directory")
    if not path.is_file():
        raise UserInputError(f"ONNX file '{printable(str(path))}' does not exist")
    if path.suffix.lower() == ".xml":  # protobuf would call the XML text "corrupt"
        raise UserInputError(
            f"'{printable(str(path))}' is an OpenVINO IR, not an ONNX model: run it with "
            "--runtime openvino (API: reparam.runtime.openvino.load_openvino)"
        )
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf DecodeError, external data errors, ...
        raise UserInputError(
            f"'{printable(str(path))}' is not a readable ONNX model: {summarize(error)}"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise UserInputError(
            f"'{printable(str(path))}' is not a readable ONNX model: it has an empty graph"
        )
    return model


def _serialized(proto: Any, path: Path) -> bytes:
    """The model as bytes for onnxruntime; one line when protobuf cannot hold it (2 GiB)."""
    try:
        return proto.SerializeToString()
    except ValueError as error:
        raise UserInputError(
            f"'{printable(str(path))}': the file name is not UTF-8 and the model is too large "
            f"to pass as bytes ({summarize(error)}): rename the file"
        ) from None


def default_providers() -> list[str]:
    """The preferred execution providers this onnxruntime build has, best first."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or list(available)


def thread_count(requested: int | None = None) -> int:
    """Intra-op threads: the usable CPUs (at most 16) by default; a requested count is kept
    between 1 and four per usable CPU."""
    if requested is None:
        return max(1, min(usable_cpus(), MAX_THREADS))
    return max(1, min(int(requested), max_threads()))


class OnnxModel(GraphModel):
    """An ONNX model loaded into onnxruntime, with named inputs and outputs.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers; default :func:`default_providers`.
        optimization: ORT graph optimisation level: "all" (ORT's default), "extended",
            "basic" or "disable" (no rewrites at all, so ORT's own fusions cannot hide a bug).
        threads: intra-op threads; default the CPUs this process may use, at most 16
            (see :func:`thread_count` for the cap on a given count).
        quiet: onnxruntime logs fatal errors only (else errors too).

    Raises:
        UserInputError: missing or corrupt file, custom operators that cannot be registered,
            or a graph onnxruntime rejects.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        optimization: str = "all",
        threads: int | None = None,
        quiet: bool = True,
    ) -> None:
        import onnxruntime as ort  # heavy, optional at import time

        if optimization not in OPTIMIZATION_LEVELS:
            raise UserInputError(
                f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got "
                f"{optimization!r}"
            )
        self.path = Path(path)
        proto = load_onnx(self.path)
        self.metadata = {prop.key: prop.value for prop in proto.metadata_props}
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        check_graph(proto, self.path)
        from reparam.ops.corr_onnx import DOMAIN, OP_TYPE, validate_corr_nodes

        self.custom_domains = check_domains(proto, self.path, {DOMAIN})
        # A crafted Corr node (groups 0, negative padding, a kernel of the wrong rank) is
        # refused here, before any kernel could trip over it.
        problems = validate_corr_nodes(proto)
        if problems:
            raise UserInputError(f"'{printable(str(self.path))}': {printable(problems[0])}")
        self.node_count = len(proto.graph.node)
        # A graph that ships Corr's meaning as a model-local function runs on plain
        # onnxruntime (it inlines functions it has no kernel for); only a bare Corr node
        # needs the onnxruntime-extensions Python kernel.
        shipped = {(f.domain, f.name) for f in proto.functions}
        self.python_corr_kernel = bool(self.custom_domains) and (DOMAIN, OP_TYPE) not in shipped

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        self.threads = thread_count(threads)
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime prints coloured warnings to stderr unasked: they would precede the one
        # line a user should see. 3 = errors, 4 = fatal only.
        options.log_severity_level = 4 if quiet else 3
        if self.python_corr_kernel:
            from reparam.ops.corr_ort import custom_ops_library  # imports onnxruntime-extensions

            options.register_custom_ops_library(custom_ops_library())
        self.providers = list(providers) if providers else default_providers()
        # onnxruntime takes a file name as UTF-8 only: a name that is not (a POSIX name is
        # bytes) fails in its constructor with a binding signature. The graph read above
        # (external data included) is given as bytes instead.
        source: str | bytes = str(self.path)
        try:
            str(self.path).encode("utf-8")
        except UnicodeEncodeError:
            source = _serialized(proto, self.path)
        try:
            self.session = ort.InferenceSession(source, options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own exception types
            message = printable(" ".join(str(error).split()))
            raise UserInputError(
                f"onnxruntime cannot load '{printable(str(self.path))}': {message[:400]}"
            ) from None
        # ONNX lets an input leave its shape out; onnxruntime then reports rank 0
        undeclared = {v.name for v in proto.graph.input if not v.type.tensor_type.HasField("shape")}
        self.inputs = [self._spec(arg, undeclared) for arg in self.session.get_inputs()]
        self.outputs = [self._spec(arg, set()) for arg in self.session.get_outputs()]

    runtime_name = "onnxruntime"

    @staticmethod
    def _spec(arg: Any, undeclared: set[str]) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
        dtype = np.dtype(_ELEMENT_TYPES.get(arg.type, np.float32))
        return TensorSpec(arg.name, shape, dtype, declared=arg.name not in undeclared)

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked feeds (see :meth:`feeds`); outputs in graph order.

        Raises:
            UserInputError: onnxruntime fails on them (e.g. a size the graph's operators
                cannot take), or the Corr kernel reported an error.
        """
        try:
            values = self.session.run(None, feeds)
        except Exception as error:  # onnxruntime's own exception types
            message = printable(" ".join(str(error).split()))
            raise UserInputError(
                f"onnxruntime failed on '{printable(str(self.path))}': {message[:400]}"
            ) from None
        if self.python_corr_kernel:
            # The Python kernel never raises (an exception there aborts the process): it
            # records what went wrong and returns NaN, which is reported here instead.
            from reparam.ops.corr_ort import pop_kernel_errors

            errors = pop_kernel_errors()
            if errors:
                raise UserInputError(
                    f"the Corr kernel failed on '{printable(str(self.path))}': "
                    f"{printable(errors[-1])}"
                )
        return list(values)


def load(
    path: str | os.PathLike,
    *,
    providers: Sequence[str] | None = None,
    optimization: str = "all",
    threads: int | None = None,
    quiet: bool = True,
) -> OnnxModel:
    """Load ``path`` into onnxruntime; see :class:`OnnxModel`."""
    return OnnxModel(
        path, providers=providers, optimization=optimization, threads=threads, quiet=quiet
    )
