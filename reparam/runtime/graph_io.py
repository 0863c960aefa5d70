"""Named, checked inputs and outputs of a graph, whatever runtime runs it.

:class:`GraphModel` is what :class:`~reparam.runtime.session.OnnxModel` (onnxruntime) and
:class:`~reparam.runtime.openvino.OpenVinoModel` (OpenVINO) share: the graph's inputs and
outputs as :class:`TensorSpec`, its reparam metadata, and

- :meth:`GraphModel.feeds`: positional or named arrays mapped to the inputs and checked
  (rank, sizes on fixed axes, and the valid range of each symbolic axis recorded by the
  exporter under ``reparam.shape_ranges``: outside it the graph computes something else);
- :meth:`GraphModel.concrete_shapes` / :meth:`GraphModel.random_inputs`: inputs drawn at the
  export example's shapes.

A graph input without a declared shape (legal ONNX; onnxruntime runs it) takes any array;
random inputs cannot be drawn for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reparam.errors import UserInputError
from reparam.runtime.safety import check_allocation
from reparam.runtime.text import printable

__all__ = ["GraphModel", "TensorSpec", "check_input_ranges"]


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (ints, or names for symbolic axes), dtype.

    ``declared`` is False for a value whose shape the graph does not declare (any rank).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype
    declared: bool = True

    def describe(self) -> str:
        if not self.declared:
            return f"{printable(self.name)} (shape not declared) {np.dtype(self.dtype).name}"
        dims = ", ".join(printable(str(d)) for d in self.shape)
        return f"{printable(self.name)} ({dims}) {np.dtype(self.dtype).name}"


def check_input_ranges(metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse input sizes outside the symbolic axes' recorded valid ranges.

    The check is :func:`reparam.runtime.range_check.check_shapes` (also exported as
    ``reparam.export.shape_ranges.check_shapes``, the exporter's side that writes them).

    Raises:
        UserInputError: one line naming input, axis, size and the valid range.
    """
    from reparam.runtime.range_check import check_shapes

    check_shapes(dict(metadata), dict(shapes))


class GraphModel:
    """A loaded graph's inputs, outputs and metadata; subclasses set them and run it.

    Subclasses set ``path``, ``metadata``, ``inputs``, ``outputs`` (and ``opset``,
    ``node_count``, ``providers``, ``threads`` for reports) and implement
    :meth:`run_feeds` (checked arrays in graph input order → output arrays in graph order).
    """

    path: Path
    metadata: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    node_count: int
    providers: list[str]
    threads: int
    runtime_name = "runtime"

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def example_shapes(self) -> list[tuple[int, ...]] | None:
        """The input shapes the model was exported with, if ``reparam`` wrote them."""
        raw = self.metadata.get("reparam.input_shapes")
        if not raw:
            return None
        try:
            shapes = [tuple(int(d) for d in shape) for shape in json.loads(raw)]
        except (ValueError, TypeError, RecursionError):
            return None
        # a hand-edited file may hold anything: negative sizes are ignored here, huge ones
        # are refused by check_allocation before random inputs are drawn
        if len(shapes) != len(self.inputs) or any(d < 1 for s in shapes for d in s):
            return None
        return shapes

    def concrete_shapes(self, batch: int | None = None) -> list[tuple[int, ...]]:
        """Input shapes with every symbolic axis filled in.

        The batch axis (axis 0) becomes ``batch`` when given; other symbolic axes take the
        sizes of the export example (stored in the metadata by ``export_onnx``).

        Raises:
            UserInputError: a symbolic axis has no known size, or an input has no declared
                shape.
        """
        examples = self.example_shapes()
        shapes = []
        for i, spec in enumerate(self.inputs):
            if not spec.declared:
                if examples is not None:
                    shapes.append(examples[i])
                    continue
                raise UserInputError(
                    f"input {spec.describe()} has no declared shape: give an input file"
                )
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
        """Standard-normal inputs of the graph's shapes and dtypes (see :meth:`concrete_shapes`).

        Raises:
            UserInputError: as :meth:`concrete_shapes`, or sizes outside the recorded range.
        """
        shapes = self.concrete_shapes(batch)
        check_input_ranges(self.metadata, dict(zip(self.input_names, shapes, strict=True)))
        # standard_normal draws float64 first: count those bytes too
        check_allocation(shapes, [np.float64] * len(shapes), "the random input")
        rng = np.random.default_rng(seed)
        return {
            spec.name: rng.standard_normal(shape).astype(spec.dtype)
            for spec, shape in zip(self.inputs, shapes, strict=True)
        }

    def feeds(self, *arrays: Any, **named: Any) -> dict[str, np.ndarray]:
        """Map positional or named arrays (numpy or torch) to the graph inputs, checking them.

        Raises:
            UserInputError: missing/unknown inputs, a wrong rank or size on a fixed axis, or
                a size outside a symbolic axis's recorded valid range.
        """
        if arrays and named:
            raise UserInputError("give the inputs positionally or by name, not both")
        if arrays:
            if len(arrays) == 1 and isinstance(arrays[0], Mapping):
                named = dict(arrays[0])
            elif len(arrays) != len(self.inputs):
                raise UserInputError(
                    f"the model takes {len(self.inputs)} input(s) "
                    f"({', '.join(map(printable, self.input_names))}), got {len(arrays)}"
                )
            else:
                named = dict(zip(self.input_names, arrays, strict=True))
        missing = [printable(name) for name in self.input_names if name not in named]
        unknown = [printable(name) for name in named if name not in self.input_names]
        if missing or unknown:
            raise UserInputError(
                f"the model's inputs are {', '.join(map(printable, self.input_names))}; "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {', '.join(unknown)}" if unknown else "")
            )
        checked = {spec.name: self._check(spec, named[spec.name]) for spec in self.inputs}
        check_input_ranges(self.metadata, {name: a.shape for name, a in checked.items()})
        return checked

    @staticmethod
    def _check(spec: TensorSpec, value: Any) -> np.ndarray:
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if not spec.declared:
            return np.ascontiguousarray(array, dtype=spec.dtype)
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
            UserInputError: bad inputs, or the runtime fails on them.
        """
        values = self.run_feeds(self.feeds(*arrays, **named))
        return dict(zip(self.output_names, values, strict=True))
