"""OpenVINO (the optional extra ``reparam[openvino]``): ONNX graphs to IR, and a session.

- :func:`convert_onnx_to_openvino` writes OpenVINO IR (``.xml`` + ``.bin``) with OpenVINO's
  own converter (``openvino.convert_model`` then ``openvino.save_model``), both files
  together: they are written under temporary names beside the target and renamed only when
  both exist, so a failure leaves the old pair (or nothing), never half of a new one.
- :class:`OpenVinoModel` runs an ``.onnx`` or ``.xml`` file with the interface of the
  onnxruntime session (:class:`~reparam.runtime.session.OnnxModel`).

The custom ``com.reparam::Corr`` node. OpenVINO's ONNX frontend has no conversion rule for
it and ignores the model-local function that defines it ("No conversion rule found for
operations: com.reparam.Corr"). Inlining that function (standard ONNX) converts, but its
one-hot Conv weight has a run-time shape when H/W are dynamic, which OpenVINO's CPU plugin
refuses; so reparam registers a frontend conversion extension
(:mod:`reparam.runtime.openvino_corr`) that lowers Corr to ExtractImagePatches and MatMul,
the same im2col product, exact to float32 rounding.

Precision. OpenVINO's CPU plugin runs float32 graphs in bfloat16 on CPUs that support it
(``INFERENCE_PRECISION_HINT`` defaults to bf16 there: 2.6e-3 relative off on the detector,
against 6e-8 in f32). The session asks for f32, so a float32 graph matches the
training-time model as closely as onnxruntime does; an fp16 IR (``compress_to_fp16``)
keeps float16 weights and computes in f32, and an INT8 QDQ graph runs OpenVINO's integer
kernels.

The reparam metadata of the ONNX file (export shapes, shape ranges, input tree) is kept in
the IR's ``rt_info`` under ``reparam/metadata`` so that an ``.xml`` is checked and verified
like the ``.onnx`` it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reparam.errors import UserInputError, summarize
from reparam.runtime.graph_io import GraphModel, TensorSpec
from reparam.runtime.safety import STANDARD_DOMAINS, check_domains, check_graph
from reparam.runtime.text import printable

__all__ = [
    "EXTRA",
    "OpenVinoModel",
    "RuntimeNotInstalledError",
    "convert_onnx_to_openvino",
    "inline_for_openvino",
    "load_openvino",
    "require_openvino",
]

EXTRA = 'pip install "reparam[openvino]"'
RT_INFO_KEY = ["reparam", "metadata"]
DEVICE = "CPU"


class RuntimeNotInstalledError(UserInputError):
    """An optional runtime is not installed; the message names the extra to install."""


def require_openvino() -> Any:
    """The ``openvino`` module, or one line naming the extra to install.

    Raises:
        RuntimeNotInstalledError: openvino is not importable.
    """
    try:
        import openvino
    except ImportError:
        raise RuntimeNotInstalledError(f"the OpenVINO runtime is not installed: {EXTRA}") from None
    return openvino


def _one_line(error: BaseException) -> str:
    """OpenVINO's multi-line errors ("Check 'false' failed at src/...: ... Summary: ...") as
    one line, keeping what follows the source location."""
    text = " ".join(str(error).split())
    for marker in ("Summary:", "FrontEnd API failed with"):
        if marker in text:
            text = text[text.index(marker) :]
            break
    return printable(text or type(error).__name__, 400)


def inline_for_openvino(proto: Any, path: Path) -> Any:
    """``proto`` ready for OpenVINO's ONNX frontend: Corr's model-local function dropped
    (:func:`~reparam.runtime.openvino_corr.corr_extension` converts the node) and any other
    model-local function inlined.

    Raises:
        UserInputError: a custom-domain node other than Corr is left.
    """
    from onnx import inliner

    from reparam.ops.corr_onnx import DOMAIN, OP_TYPE

    others = [f for f in proto.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    del proto.functions[:]
    proto.functions.extend(others)
    inlined = inliner.inline_local_functions(proto) if others else proto
    left = sorted(
        {
            f"{n.domain}::{n.op_type}"
            for n in inlined.graph.node
            if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) != (DOMAIN, OP_TYPE)
        }
    )
    if left:
        raise UserInputError(
            f"'{printable(str(path))}' uses {printable(', '.join(left))}, which OpenVINO "
            "cannot convert"
        )
    return inlined


def _convert(path: Path) -> tuple[Any, dict[str, str], Any]:
    """An ONNX file as an ``openvino.Model``, its reparam metadata and the checked proto."""
    ov = require_openvino()
    import onnx

    from reparam.ops.corr_onnx import DOMAIN, validate_corr_nodes
    from reparam.runtime.openvino_corr import corr_extension
    from reparam.runtime.session import load_onnx

    proto = load_onnx(path)
    check_graph(proto, path)
    check_domains(proto, path, {DOMAIN})
    problems = validate_corr_nodes(proto)
    if problems:
        raise UserInputError(f"'{printable(str(path))}': {printable(problems[0])}")
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    inlined = inline_for_openvino(proto, path)
    with tempfile.TemporaryDirectory(prefix="reparam-ov-") as folder:
        staged = Path(folder) / "graph.onnx"  # also sidesteps a file name that is not UTF-8
        try:
            onnx.save(inlined, str(staged))
        except (ValueError, OSError) as error:
            raise UserInputError(
                f"cannot stage '{printable(str(path))}' for OpenVINO: {summarize(error)}"
            ) from None
        try:
            model = ov.convert_model(str(staged), extension=[corr_extension()])
        except Exception as error:  # OpenVINO raises its own exception types
            raise UserInputError(
                f"OpenVINO cannot convert '{printable(str(path))}': {_one_line(error)}"
            ) from None
    model.set_rt_info(json.dumps(metadata), RT_INFO_KEY)
    return model, metadata, proto


def _pair(xml_path: Path) -> Path:
    return xml_path.with_suffix(".bin")


def convert_onnx_to_openvino(
    onnx_path: str | os.PathLike,
    xml_path: str | os.PathLike,
    *,
    compress_to_fp16: bool = False,
) -> None:
    """Write OpenVINO IR for an ONNX file: ``xml_path`` and the ``.bin`` beside it.

    Args:
        onnx_path: the ``.onnx`` file (fp32, fp16, or INT8 QDQ from ``quantize_onnx``;
            ``com.reparam::Corr`` nodes are inlined to standard operators).
        xml_path: the ``.xml`` to write; the weights go to the same name with ``.bin``.
        compress_to_fp16: store float weights as float16 (OpenVINO computes in f32).

    Raises:
        RuntimeNotInstalledError: openvino is not installed.
        UserInputError: a bad path, a graph reparam or OpenVINO cannot take; nothing is
            written then.
    """
    from reparam._io import check_distinct_paths, prepare_output

    ov = require_openvino()
    source, xml = Path(onnx_path), Path(xml_path)
    if xml.suffix != ".xml":
        raise UserInputError(f"the OpenVINO output '{printable(str(xml))}' should end in .xml")
    weights = _pair(xml)
    check_distinct_paths({"the IR .xml": xml, "the IR .bin": weights}, {"the ONNX input": source})
    targets = [prepare_output(xml, inputs=(source,)), prepare_output(weights, inputs=(source,))]
    model, _, _ = _convert(source)
    _save_pair(ov, model, targets, compress_to_fp16)


def _save_pair(ov: Any, model: Any, targets: list[Path], compress_to_fp16: bool) -> None:
    """``save_model`` into a temporary folder beside the target, then both renames.

    The .bin is renamed first and the .xml last; if the second rename fails, the old pair
    is put back (moved aside first), so a reader never sees a new .xml with an old .bin.
    """
    xml, weights = targets
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{xml.stem[:40]}.", dir=xml.parent))
    except OSError as error:
        raise UserInputError(
            f"cannot write to '{printable(str(xml.parent))}': {error.strerror}"
        ) from None
    try:
        staged = folder / "model.xml"
        try:
            ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        except Exception as error:  # OpenVINO's own types; a full disk
            raise UserInputError(
                f"OpenVINO cannot write '{printable(str(xml))}': {_one_line(error)}"
            ) from None
        olds = []
        for target, name in ((weights, "old.bin"), (xml, "old.xml")):
            if target.exists():
                os.replace(target, folder / name)
                olds.append((folder / name, target))
        try:
            os.replace(staged.with_suffix(".bin"), weights)
            os.replace(staged, xml)
        except OSError as error:
            for old, target in olds:
                os.replace(old, target)
            raise UserInputError(
                f"writing '{printable(str(xml))}' failed: {printable(error)}"
            ) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ov_spec(port: Any, index: int, stem: str) -> TensorSpec:
    shape = port.get_partial_shape()
    try:
        name = port.get_any_name()
    except RuntimeError:  # a port without a tensor name
        name = f"{stem}{index}"
    dtype = np.dtype(port.get_element_type().to_dtype())
    if shape.rank.is_dynamic:
        return TensorSpec(name, (), dtype, declared=False)
    dims = tuple(d.get_length() if d.is_static else "?" for d in shape)
    return TensorSpec(name, dims, dtype)


def _onnx_spec(value: Any, ov_spec: TensorSpec) -> TensorSpec:
    """The ONNX input's name and symbolic axis names, with OpenVINO's dtype."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return TensorSpec(value.name, (), ov_spec.dtype, declared=False)
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
    )
    return TensorSpec(value.name, dims, ov_spec.dtype)


class OpenVinoModel(GraphModel):
    """An ``.onnx`` or OpenVINO ``.xml`` file compiled for OpenVINO's CPU plugin.

    Same interface as :class:`~reparam.runtime.session.OnnxModel`: ``inputs``/``outputs``
    (:class:`TensorSpec`), ``metadata``, :meth:`feeds`, :meth:`run`, :meth:`random_inputs`.

    Args:
        path: an ``.onnx`` file (converted in memory, Corr inlined) or an ``.xml`` IR file
            with its ``.bin`` beside it.
        threads: inference threads; default as onnxruntime's (the usable CPUs, ≤ 16).
        quiet: unused (OpenVINO prints nothing on success); kept for the common interface.

    Raises:
        RuntimeNotInstalledError: openvino is not installed.
        UserInputError: a missing or corrupt file, or a graph OpenVINO cannot convert or
            compile (one line).
    """

    runtime_name = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        quiet: bool = True,
        providers: Sequence[str] | None = None,
    ) -> None:
        from reparam.runtime.session import thread_count

        ov = require_openvino()
        self.path = Path(path)
        core = ov.Core()
        onnx_inputs = None
        if self.path.suffix == ".xml":
            model = self._read_ir(core)
            self.metadata = self._ir_metadata(model)
        else:
            model, self.metadata, proto = _convert(self.path)
            initializers = {init.name for init in proto.graph.initializer}
            onnx_inputs = [v for v in proto.graph.input if v.name not in initializers]
        self.threads = thread_count(threads)
        self.providers = [f"OpenVINO {ov.get_version().split('-')[0]} {DEVICE}"]
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": str(self.threads),
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self.compiled = core.compile_model(model, DEVICE, config)
        except Exception as error:  # OpenVINO's own exception types
            raise UserInputError(
                f"OpenVINO cannot compile '{printable(str(self.path))}': {_one_line(error)}"
            ) from None
        self.request = self.compiled.create_infer_request()
        self.node_count = len(model.get_ordered_ops())
        try:
            self.opset = int(self.metadata.get("reparam.opset", "0"))
        except ValueError:
            self.opset = 0
        inputs = [_ov_spec(p, i, "input") for i, p in enumerate(self.compiled.inputs)]
        if onnx_inputs is not None and len(onnx_inputs) == len(inputs):
            inputs = [_onnx_spec(v, s) for v, s in zip(onnx_inputs, inputs, strict=True)]
        self.inputs = inputs
        self.outputs = [_ov_spec(p, i, "output") for i, p in enumerate(self.compiled.outputs)]

    def _read_ir(self, core: Any) -> Any:
        xml, weights = self.path, _pair(self.path)
        for file, what in ((xml, "OpenVINO IR file"), (weights, "OpenVINO weights file")):
            if not file.is_file():
                raise UserInputError(f"{what} '{printable(str(file))}' does not exist")
        try:
            # bytes, not a file name: OpenVINO's binding takes UTF-8 names only
            return core.read_model(model=xml.read_bytes(), weights=weights.read_bytes())
        except Exception as error:  # OpenVINO's own exception types
            raise UserInputError(
                f"'{printable(str(xml))}' is not a readable OpenVINO IR: {_one_line(error)}"
            ) from None

    @staticmethod
    def _ir_metadata(model: Any) -> dict[str, str]:
        if not model.has_rt_info(RT_INFO_KEY):
            return {}
        try:
            table = json.loads(model.get_rt_info(RT_INFO_KEY).astype(str))
        except (ValueError, RecursionError):
            return {}
        if not isinstance(table, dict):
            return {}
        return {str(k): str(v) for k, v in table.items()}

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked feeds (see :meth:`feeds`); outputs in graph order (copies).

        Raises:
            UserInputError: OpenVINO fails on them.
        """
        try:
            results = self.request.infer(list(feeds.values()))
            return [np.array(results[port], copy=True) for port in self.compiled.outputs]
        except Exception as error:  # OpenVINO's own exception types
            raise UserInputError(
                f"OpenVINO failed on '{printable(str(self.path))}': {_one_line(error)}"
            ) from None


def load_openvino(
    path: str | os.PathLike, *, threads: int | None = None, quiet: bool = True
) -> OpenVinoModel:
    """Load ``path`` (``.onnx`` or ``.xml``) into OpenVINO; see :class:`OpenVinoModel`."""
    return OpenVinoModel(path, threads=threads, quiet=quiet)
