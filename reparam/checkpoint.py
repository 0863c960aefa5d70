"""Reading training checkpoints safely, and writing/reading fused checkpoints.

Training checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, no code runs. A file holding a pickled ``nn.Module`` is refused unless the
caller says it trusts the file (``trust_pickle=True``), because unpickling runs code from it.

A fused checkpoint is a dict of plain types plus the fused state dict::

    {"reparam": {"format": "reparam.fused", "format_version": 1, "reparam_version": ...,
                 "model": "acnet_resnet18" or "pkg.mod:factory", "kwargs": {...},
                 "input_shapes": [[1, 3, 224, 224]], "trace": True},
     "state_dict": {...}}

:func:`load` rebuilds the model from its factory, fuses it (which fixes the structure), and
loads the weights with strict key matching.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam._io import atomic_write
from reparam._version import __version__
from reparam.errors import ReparamError, UserInputError

__all__ = [
    "ModelSpec",
    "apply_state_dict",
    "build_model",
    "is_fused_checkpoint",
    "load",
    "load_state_dict_file",
    "save_fused",
]

FORMAT = "reparam.fused"
FORMAT_VERSION = 1
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")
DATA_PARALLEL_PREFIX = "module."
SHOWN_KEYS = 5


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: a bundled name or ``package.module:callable``, and kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_factory(self) -> bool:
        return ":" in self.name


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the training-time model ``spec`` names; clear errors for every way it can fail."""
    if not spec.is_factory:
        from reparam.models import create_model, get_model_info

        get_model_info(spec.name)  # unknown names fail here with the list of choices
        factory = lambda **kw: create_model(spec.name, **kw)  # noqa: E731
        label = f"model '{spec.name}'"
    else:
        module_name, _, attribute = spec.name.partition(":")
        if not module_name or not attribute:
            raise UserInputError(f"factory '{spec.name}' must look like package.module:callable")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UserInputError(f"cannot import module '{module_name}': {error}") from None
        except Exception as error:  # the module itself is broken (SyntaxError, its own raise)
            raise UserInputError(
                f"cannot import module '{module_name}': {_reason(error)}"
            ) from None
        factory = module
        for part in attribute.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise UserInputError(f"module '{module_name}' has no attribute '{attribute}'")
        if not callable(factory):
            raise UserInputError(f"'{spec.name}' is not callable")
        label = f"factory '{spec.name}'"
    try:
        model = factory(**spec.kwargs)
    except TypeError as error:
        raise UserInputError(f"{label} rejected its arguments {spec.kwargs}: {error}") from None
    except ReparamError:
        raise
    except Exception as error:  # e.g. a negative width reaching torch.empty
        raise UserInputError(
            f"{label} failed with arguments {spec.kwargs}: {_reason(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{label} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _read(path: Path, *, trust_pickle: bool) -> Any:
    if not path.exists():
        raise UserInputError(f"checkpoint '{path}' does not exist")
    if not path.is_file():
        raise UserInputError(f"checkpoint '{path}' is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        # Only a disallowed global means "pickled objects"; torch wraps every other unpickling
        # failure of a corrupt file in a message that also talks about weights_only.
        if "Unsupported global" in str(error):
            raise UserInputError(
                f"'{path}' holds pickled Python objects (a whole model?), which can run code "
                "when loaded; save a state_dict instead, or pass --trust-pickle if you trust "
                "the file"
            ) from None
        raise UserInputError(f"'{path}' is not a PyTorch checkpoint ({_reason(error)})") from None
    except Exception as error:  # a corrupt file fails in many ways (KeyError, EOFError, ...)
        raise UserInputError(f"'{path}' is not a PyTorch checkpoint ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    """``TypeName: first line`` of an exception, preferring torch's WeightsUnpickler detail."""
    text = str(error)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in WRAPPER_KEYS:
            if key in obj:
                return _unwrap(obj[key], path)
    if isinstance(obj, Mapping) and _is_state_dict(obj):
        return dict(obj)
    raise UserInputError(
        f"'{path}' does not contain a state dict (expected a mapping of names to tensors, "
        f"possibly under one of {', '.join(WRAPPER_KEYS)})"
    )


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def load_state_dict_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """The state dict in a checkpoint file, unwrapped and without a DataParallel prefix.

    Accepts a bare state dict, the common ``{"state_dict": ...}`` / ``{"model": ...}``
    wrappers, a fused checkpoint, and (only with ``trust_pickle``) a pickled ``nn.Module``.
    """
    path = Path(path)
    state_dict = _unwrap(_read(path, trust_pickle=trust_pickle), path)
    if all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key[len(DATA_PARALLEL_PREFIX) :]: v for key, v in state_dict.items()}
    return state_dict


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` with strict matching, naming what does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:SHOWN_KEYS])})")
        if unexpected:
            shown = ", ".join(unexpected[:SHOWN_KEYS])
            parts.append(f"{len(unexpected)} unexpected (e.g. {shown})")
        raise UserInputError(f"keys in '{source}' do not match the model: {'; '.join(parts)}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise UserInputError(
                f"'{source}': {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


def save_fused(
    fused: nn.Module,
    path: str | os.PathLike,
    spec: ModelSpec,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    trace: bool = True,
) -> Path:
    """Write ``fused``'s state dict with what :func:`load` needs to rebuild it, atomically."""
    payload = {
        "reparam": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "reparam_version": __version__,
            "model": spec.name,
            "kwargs": dict(spec.kwargs),
            "input_shapes": [list(shape) for shape in input_shapes or []],
            "trace": trace,
            "dtype": _float_dtype_name(fused),
        },
        "state_dict": {key: value.detach().cpu() for key, value in fused.state_dict().items()},
    }

    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as error:  # torch reports a failed write (disk full) this way
            raise OSError(f"torch.save failed ({_reason(error)})") from None

    return atomic_write(path, write)


def _float_dtype_name(model: nn.Module) -> str:
    """The dtype of the first floating-point tensor of ``model`` ("float32" if none)."""
    for value in model.state_dict().values():
        if value.is_floating_point():
            return str(value.dtype).removeprefix("torch.")
    return "float32"


def is_fused_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fused checkpoint written by :func:`save_fused`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not loadable at all: certainly not ours
        return False
    return isinstance(obj, Mapping) and _metadata(obj) is not None


def _metadata(obj: Mapping) -> dict | None:
    meta = obj.get("reparam")
    return meta if isinstance(meta, Mapping) and meta.get("format") == FORMAT else None


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the deploy model of a fused checkpoint, weights loaded with strict keys.

    Returns:
        The fused model in eval mode. Its ``reparam_spec`` attribute holds the
        :class:`ModelSpec` and ``reparam_input_shapes`` the recorded example input shapes.
    """
    from reparam.convert import fuse

    path = Path(path)
    obj = _read(path, trust_pickle=False)
    meta = _metadata(obj) if isinstance(obj, Mapping) else None
    if meta is None:
        raise UserInputError(f"'{path}' is not a fused checkpoint written by reparam")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserInputError(
            f"'{path}' uses fused-checkpoint format {meta['format_version']}; this reparam "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade reparam"
        )
    spec = ModelSpec(meta["model"], dict(meta.get("kwargs", {})))
    model = fuse(build_model(spec), inplace=True, trace=bool(meta.get("trace", True)))
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise UserInputError(f"'{path}' has reparam metadata but no state_dict")
    apply_state_dict(model, state_dict, str(path))
    model.reparam_spec = spec
    model.reparam_input_shapes = [tuple(shape) for shape in meta.get("input_shapes", [])]
    return model.to(map_location).eval()
