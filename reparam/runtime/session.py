"""Run exported ONNX models under onnxruntime.

:func:`load` opens a model file as an :class:`OnnxModel`: an ``InferenceSession`` with

- the ``com.reparam`` custom operators registered when the graph uses them (through
  onnxruntime-extensions; a clear error says what to install when it is missing);
- execution providers chosen from ``onnxruntime.get_available_providers()``;
- as many intra-op threads as this process may use (at most 16), one inter-op thread, and
  ``session.intra_op.allow_spinning = 0``: spinning threads distort timings and starve other
  sessions on small machines (REFERENCE.md §4);

and named, shape-checked inputs and outputs for numpy arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reparam.errors import UserInputError

__all__ = [
    "OPTIMIZATION_LEVELS",
    "PREFERRED_PROVIDERS",
    "OnnxModel",
    "TensorSpec",
    "custom_domains",
    "default_providers",
    "load",
    "load_onnx",
]

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
OPTIMIZATION_LEVELS = ("all", "basic", "extended", "disable")
MAX_THREADS = 16

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


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (ints, or names for symbolic axes), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name} ({dims}) {np.dtype(self.dtype).name}"


def load_onnx(path: str | os.PathLike) -> Any:
    """``onnx.load`` with one-line errors for a missing or unreadable file.

    Raises:
        UserInputError: the file does not exist or is not an ONNX model.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf DecodeError, external data errors, ...
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"'{path}' is not a readable ONNX model: {first}") from None
    if not model.graph.node and not model.graph.output:
        raise UserInputError(f"'{path}' is not a readable ONNX model: it has an empty graph")
    return model


def custom_domains(model: Any) -> set[str]:
    """Operator domains of an ``onnx.ModelProto`` beyond those onnxruntime knows."""
    used = {node.domain for node in model.graph.node}
    used |= {opset.domain for opset in model.opset_import}
    return used - STANDARD_DOMAINS


def default_providers() -> list[str]:
    """The preferred execution providers this onnxruntime build has, best first."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or list(available)


def _thread_count() -> int:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(usable, MAX_THREADS))


class OnnxModel:
    """An ONNX model loaded into onnxruntime, with named inputs and outputs.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers; default :func:`default_providers`.
        optimization: ORT graph optimisation level: "all" (ORT's default), "extended",
            "basic" or "disable" (no rewrites at all, so ORT's own fusions cannot hide a bug).
        threads: intra-op threads; default the CPUs this process may use, at most 16.

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
    ) -> None:
        import onnxruntime as ort

        if optimization not in OPTIMIZATION_LEVELS:
            raise UserInputError(
                f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got "
                f"{optimization!r}"
            )
        self.path = Path(path)
        proto = load_onnx(self.path)
        self.metadata = {prop.key: prop.value for prop in proto.metadata_props}
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.custom_domains = custom_domains(proto)
        self.node_count = len(proto.graph.node)

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        options.intra_op_num_threads = threads or _thread_count()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: warnings go to stderr unasked
        if self.custom_domains:
            from reparam.ops.corr_onnx import DOMAIN

            unknown = self.custom_domains - {DOMAIN}
            if unknown:
                raise UserInputError(
                    f"'{self.path}' uses operator domain(s) {', '.join(sorted(unknown))} that "
                    "reparam has no implementation for"
                )
            from reparam.ops.corr_ort import custom_ops_library

            options.register_custom_ops_library(custom_ops_library())
        self.providers = list(providers) if providers else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own exception types
            message = " ".join(str(error).split())
            raise UserInputError(
                f"onnxruntime cannot load '{self.path}': {message[:400]}"
            ) from None
        self.inputs = [self._spec(arg) for arg in self.session.get_inputs()]
        self.outputs = [self._spec(arg) for arg in self.session.get_outputs()]

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
        return TensorSpec(arg.name, shape, np.dtype(_ELEMENT_TYPES.get(arg.type, np.float32)))

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def example_shapes(self) -> list[tuple[int, ...]] | None:
        """The input shapes the model was exported with, if ``reparam`` wrote them."""
        raw = self.metadata.get("reparam.input_shapes")
        if not raw:
            return None
        try:
            shapes = [tuple(int(d) for d in shape) for shape in json.loads(raw)]
        except (ValueError, TypeError):
            return None
        return shapes if len(shapes) == len(self.inputs) else None

    def concrete_shapes(self, batch: int | None = None) -> list[tuple[int, ...]]:
        """Input shapes with every symbolic axis filled in.

        The batch axis (axis 0) becomes ``batch`` when given; other symbolic axes take the
        sizes of the export example (stored in the metadata by ``export_onnx``).

        Raises:
            UserInputError: a symbolic axis has no known size.
        """
        examples = self.example_shapes()
        shapes = []
        for i, spec in enumerate(self.inputs):
            shape = []
            for axis, dim in enumerate(spec.shape):
                if axis == 0 and batch is not None:
                    shape.append(batch)
                elif isinstance(dim, int) and dim > 0:
                    shape.append(dim)
                elif examples is not None and axis < len(examples[i]):
                    shape.append(examples[i][axis])
                elif axis == 0:
                    shape.append(1)
                else:
                    raise UserInputError(
                        f"input {spec.describe()} has a symbolic axis {axis} ({dim}) of "
                        "unknown size: give an input file"
                    )
            shapes.append(tuple(shape))
        return shapes

    def random_inputs(self, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Standard-normal inputs of the graph's shapes and dtypes (see :meth:`concrete_shapes`)."""
        rng = np.random.default_rng(seed)
        return {
            spec.name: rng.standard_normal(shape).astype(spec.dtype)
            for spec, shape in zip(self.inputs, self.concrete_shapes(batch), strict=True)
        }

    def feeds(self, *arrays: Any, **named: Any) -> dict[str, np.ndarray]:
        """Map positional or named arrays (numpy or torch) to the graph inputs, checking them.

        Raises:
            UserInputError: missing/unknown inputs, or a wrong rank or size on a fixed axis.
        """
        if arrays and named:
            raise UserInputError("give the inputs positionally or by name, not both")
        if arrays:
            if len(arrays) == 1 and isinstance(arrays[0], Mapping):
                named = dict(arrays[0])
            elif len(arrays) != len(self.inputs):
                raise UserInputError(
                    f"the model takes {len(self.inputs)} input(s) "
                    f"({', '.join(self.input_names)}), got {len(arrays)}"
                )
            else:
                named = dict(zip(self.input_names, arrays, strict=True))
        missing = [name for name in self.input_names if name not in named]
        unknown = [name for name in named if name not in self.input_names]
        if missing or unknown:
            raise UserInputError(
                f"the model's inputs are {', '.join(self.input_names)}; "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {', '.join(unknown)}" if unknown else "")
            )
        return {spec.name: self._check(spec, named[spec.name]) for spec in self.inputs}

    @staticmethod
    def _check(spec: TensorSpec, value: Any) -> np.ndarray:
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.ndim != len(spec.shape):
            raise UserInputError(
                f"input {spec.describe()} needs rank {len(spec.shape)}, got an array of shape "
                f"{array.shape}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int) and want > 0 and want != got:
                what = "channels" if axis == 1 else f"axis {axis}"
                raise UserInputError(
                    f"input {spec.describe()} needs {want} {what}, got an array of shape "
                    f"{array.shape}"
                )
        return np.ascontiguousarray(array, dtype=spec.dtype)

    def run(self, *arrays: Any, **named: Any) -> dict[str, np.ndarray]:
        """Run the graph; inputs as in :meth:`feeds`; returns outputs by name, in graph order.

        Raises:
            UserInputError: bad inputs, or onnxruntime fails on them (e.g. a size the
                graph's operators cannot take).
        """
        feeds = self.feeds(*arrays, **named)
        try:
            values = self.session.run(None, feeds)
        except Exception as error:  # onnxruntime's own exception types
            message = " ".join(str(error).split())
            raise UserInputError(f"onnxruntime failed on '{self.path}': {message[:400]}") from None
        return dict(zip(self.output_names, values, strict=True))


def load(
    path: str | os.PathLike,
    *,
    providers: Sequence[str] | None = None,
    optimization: str = "all",
    threads: int | None = None,
) -> OnnxModel:
    """Load ``path`` into onnxruntime; see :class:`OnnxModel`."""
    return OnnxModel(path, providers=providers, optimization=optimization, threads=threads)
