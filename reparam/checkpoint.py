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
loads the weights with strict key matching. Reading a file never imports or calls anything
the file names: a bundled model name is rebuilt by reparam itself; a ``pkg.mod:factory``
recorded in a file is used only when the caller names a factory (``model=``) or says it
trusts the file (``trust_code=True``). Every field of the metadata is type-checked first.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam._io import atomic_write
from reparam._version import __version__
from reparam.errors import (
    NotAFusedCheckpointError,
    ReparamError,
    UnsafeInputError,
    UserInputError,
    printable,
    summarize,
)
from reparam.resources import check_allocation

__all__ = [
    "ModelSpec",
    "Weights",
    "apply_state_dict",
    "build_model",
    "is_fused_checkpoint",
    "load",
    "load_state_dict_file",
    "read_weights",
    "save_fused",
]

FORMAT = "reparam.fused"
FORMAT_VERSION = 1
# Exponential-moving-average weights are what YOLOv5's loader and timm deploy when a
# checkpoint holds both, so they are looked for before the raw training weights.
EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
FUSED_DTYPES = ("float16", "bfloat16", "float32", "float64")
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


def _import_user_module(module_name: str):
    """Import a module the user named, finding it in the current directory too.

    As ``uvicorn app:app`` does: ``reparam fuse mynet:build`` next to ``mynet.py`` works
    although a console script's ``sys.path`` does not hold the current directory. Only ever
    called for a factory the caller named (never for one a file names without trust).
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _check_model_size(factory: Any, kwargs: dict, label: str) -> None:
    """Refuse a model whose parameters and buffers would not fit in memory, before building it.

    The model is built once on the meta device (shapes only, no memory, the random-number
    stream untouched). A factory that cannot build there is left to the real build.
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = factory(**kwargs)
    except Exception:
        return
    if isinstance(probe, nn.Module):
        tensors = [*probe.parameters(), *probe.buffers()]
        check_allocation(
            [tuple(t.shape) for t in tensors],
            [t.dtype for t in tensors],
            f"{label} with arguments {printable(repr(kwargs))[:120]}",
            hint="use smaller arguments",
        )


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the training-time model ``spec`` names; clear errors for every way it can fail."""
    if not spec.is_factory:
        from reparam.models import create_model, get_model_info

        get_model_info(spec.name)  # unknown names fail here with the list of choices
        factory = lambda **kw: create_model(spec.name, **kw)  # noqa: E731
        label = f"model '{printable(spec.name)}'"
    else:
        module_name, _, attribute = spec.name.partition(":")
        if not module_name or not attribute:
            raise UserInputError(
                f"factory '{printable(spec.name)}' must look like package.module:callable"
            )
        try:
            module = _import_user_module(module_name)
        except ImportError as error:
            raise UserInputError(
                f"cannot import module '{printable(module_name)}': {printable(error)}"
            ) from None
        except Exception as error:  # the module itself is broken (SyntaxError, its own raise)
            raise UserInputError(
                f"cannot import module '{printable(module_name)}': {_reason(error)}"
            ) from None
        factory = module
        for part in attribute.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise UserInputError(
                    f"module '{printable(module_name)}' has no attribute '{printable(attribute)}'"
                )
        if not callable(factory):
            raise UserInputError(f"'{printable(spec.name)}' is not callable")
        label = f"factory '{printable(spec.name)}'"
    if spec.kwargs:  # arguments from the command line or a file may ask for absurd sizes
        _check_model_size(factory, spec.kwargs, label)
    try:
        model = factory(**spec.kwargs)
    except ReparamError:  # first: a block's BlockConfigError is also a TypeError
        raise
    except TypeError as error:
        raise UserInputError(
            f"{label} rejected its arguments {spec.kwargs!r}: {printable(error)}"
        ) from None
    except Exception as error:  # e.g. a negative width reaching torch.empty
        raise UserInputError(
            f"{label} failed with arguments {spec.kwargs!r}: {_reason(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{label} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_path(path: Any, what: str) -> Path:
    """``path`` as a :class:`Path`; a ``TypeError`` naming the expected type otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} expects a path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def _read(path: Path, *, trust_pickle: bool) -> Any:
    shown = printable(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserInputError(f"checkpoint '{shown}' does not exist") from None
    except OSError as error:
        raise UserInputError(f"cannot read '{shown}': {printable(error.strerror)}") from None
    if stat.S_ISDIR(mode):
        raise UserInputError(f"checkpoint '{shown}' is a directory, not a file")
    if not stat.S_ISREG(mode):
        # Reading a FIFO or a device would block or never end.
        raise UserInputError(f"checkpoint '{shown}' is not a regular file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        # Only a disallowed global means "pickled objects"; torch wraps every other unpickling
        # failure of a corrupt file in a message that also talks about weights_only.
        if "Unsupported global" in str(error):
            raise UnsafeInputError(
                f"'{shown}' holds pickled Python objects (a whole model?), which can run code "
                "when loaded; save a state_dict instead, or pass --trust-pickle if you trust "
                "the file"
            ) from None
        raise UserInputError(f"'{shown}' is not a PyTorch checkpoint ({_reason(error)})") from None
    except MemoryError:
        raise UserInputError(f"'{shown}' does not fit in memory") from None
    except Exception as error:  # a corrupt file fails in many ways (KeyError, EOFError, ...)
        raise UserInputError(f"'{shown}' is not a PyTorch checkpoint ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    """``TypeName: first line`` of an exception, escaped for the terminal."""
    return printable(summarize(error))


@dataclass(frozen=True)
class Weights:
    """A state dict read from a checkpoint, and which entry of the file it came from."""

    state_dict: dict[str, Tensor]
    entry: str
    """Human-readable: ``"the whole file"`` or ``"entry 'ema'"`` (nested: ``'a' → 'b'``)."""


def _entry_label(trail: tuple[str, ...]) -> str:
    if not trail:
        return "the whole file"
    return "entry " + " → ".join(f"'{printable(key)}'" for key in trail)


def _find_state_dict(obj: Any, trail: tuple[str, ...]) -> tuple[dict, tuple[str, ...]] | None:
    """The first state dict in ``obj``: itself, or under an EMA key, then a wrapper key."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), trail
    if not isinstance(obj, Mapping):
        return None
    if _is_state_dict(obj):
        return dict(obj), trail
    for key in (*EMA_KEYS, *WRAPPER_KEYS):
        if key in obj and obj[key] is not None:
            found = _find_state_dict(obj[key], (*trail, key))
            if found is not None:
                return found
    return None


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _check_tensors(state_dict: Mapping, source: str) -> None:
    """Refuse entries that cannot be weights: not tensors, no data, complex, sparse."""
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise UserInputError(f"'{source}': state dict key {key!r} is not a string")
        name = printable(key)
        if not isinstance(value, Tensor):
            raise UserInputError(f"'{source}': {name} is a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise UserInputError(
                f"'{source}': {name} is a meta-device tensor (shape only, no values); "
                "save the checkpoint from a model with real weights"
            )
        if value.is_complex():
            # Casting to a real dtype would silently drop the imaginary part.
            raise UserInputError(
                f"'{source}': {name} is complex ({str(value.dtype).removeprefix('torch.')}); "
                "reparam fuses real-valued models only"
            )
        if value.layout != torch.strided or value.is_quantized:
            raise UserInputError(
                f"'{source}': {name} is a sparse or quantized tensor; save dense weights"
            )


def read_weights(
    path: str | os.PathLike, *, trust_pickle: bool = False, key: str | None = None
) -> Weights:
    """The state dict in a checkpoint file, and which entry of the file it was taken from.

    Accepts a bare state dict, the common ``{"state_dict": ...}`` / ``{"model": ...}``
    wrappers, a fused checkpoint, and (only with ``trust_pickle``) a pickled ``nn.Module``.
    When a checkpoint holds EMA weights (``ema``, ``model_ema``, ``state_dict_ema``) next to
    the raw ones, the EMA weights are used, as YOLOv5 and timm do; ``key`` names the
    top-level entry to use instead. A DataParallel ``module.`` prefix on every key is removed.
    """
    path = _check_path(path, "read_weights")
    shown = printable(path)
    obj = _read(path, trust_pickle=trust_pickle)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = [printable(k) for k in obj] if isinstance(obj, Mapping) else []
            available = f"; it has {', '.join(keys[:10])}" if keys else ""
            raise UserInputError(f"'{shown}' has no entry '{printable(key)}'{available}")
        found = _find_state_dict(obj[key], (key,))
    else:
        found = _find_state_dict(obj, ())
    if found is None:
        if isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values()):
            _check_tensors(obj, shown)  # names the entry that is not a tensor
        raise UserInputError(
            f"'{shown}' does not contain a state dict (expected a mapping of names to tensors, "
            f"possibly under one of {', '.join((*WRAPPER_KEYS, *EMA_KEYS))})"
        )
    state_dict, trail = found
    _check_tensors(state_dict, shown)
    entry = _entry_label(trail)
    if state_dict and all(name.startswith(DATA_PARALLEL_PREFIX) for name in state_dict):
        state_dict = {name[len(DATA_PARALLEL_PREFIX) :]: v for name, v in state_dict.items()}
        entry += f" ({DATA_PARALLEL_PREFIX!r} prefix removed)"
    return Weights(state_dict, entry)


def load_state_dict_file(
    path: str | os.PathLike, *, trust_pickle: bool = False, key: str | None = None
) -> dict:
    """The state dict of :func:`read_weights`, without saying where it came from."""
    return read_weights(path, trust_pickle=trust_pickle, key=key).state_dict


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` with strict matching, naming what does not fit."""
    source = printable(source)
    _check_tensors(state_dict, source)
    expected = model.state_dict()
    missing = [printable(key) for key in expected if key not in state_dict]
    unexpected = [printable(key) for key in state_dict if key not in expected]
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
                f"'{source}': {printable(key)} has shape {tuple(value.shape)}, the model expects "
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
        obj = _read(_check_path(path, "is_fused_checkpoint"), trust_pickle=False)
    except (ReparamError, TypeError):  # not loadable at all: certainly not ours
        return False
    return isinstance(obj, Mapping) and _metadata(obj) is not None


def _metadata(obj: Mapping) -> Mapping | None:
    meta = obj.get("reparam")
    return meta if isinstance(meta, Mapping) and meta.get("format") == FORMAT else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(meta: Mapping, shown: str) -> None:
    """Type-check every metadata field before any of it is used."""

    def bad(field_name: str, expected: str) -> UserInputError:
        value = meta[field_name]
        return UserInputError(
            f"'{shown}' has malformed reparam metadata: '{field_name}' must be {expected}, "
            f"not {type(value).__name__} {printable(repr(value))[:60]}"
        )

    version = meta.get("format_version", 0)
    if "format_version" in meta and not _is_int(version):
        raise bad("format_version", "an integer")
    if version > FORMAT_VERSION:
        raise UserInputError(
            f"'{shown}' uses fused-checkpoint format {version}; this reparam "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade reparam"
        )
    if not isinstance(meta.get("model"), str) or not meta["model"]:
        if "model" not in meta:
            raise UserInputError(f"'{shown}' has malformed reparam metadata: no 'model'")
        raise bad("model", "a model name or package.module:callable")
    kwargs = meta.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise bad("kwargs", "a mapping of argument names to values")
    shapes = meta.get("input_shapes", [])
    if not isinstance(shapes, (list, tuple)) or not all(
        isinstance(shape, (list, tuple)) and all(_is_int(d) and d > 0 for d in shape)
        for shape in shapes
    ):
        raise bad("input_shapes", "a list of shapes of positive integers")
    if not isinstance(meta.get("trace", True), bool):
        raise bad("trace", "true or false")
    if meta.get("dtype", "float32") not in FUSED_DTYPES:
        raise bad("dtype", f"one of {', '.join(FUSED_DTYPES)}")


def _choose_factory(recorded: str, model: str | None, trust_code: bool, shown: str) -> str:
    """The model name to build: never a factory the file names unless the caller allows it."""
    if model is not None:
        if not isinstance(model, str):
            raise TypeError(
                f"model must be a str (name or package.module:callable), got {type(model).__name__}"
            )
        return model
    if ":" not in recorded:
        from reparam.models import list_models

        if recorded not in list_models():
            raise UserInputError(f"'{shown}' names the unknown model '{printable(recorded)}'")
        return recorded  # a bundled name is rebuilt by reparam's own code
    if trust_code:
        return recorded
    raise UnsafeInputError(
        f"'{shown}' names the factory '{printable(recorded)}', and reparam does not import "
        f"code named by a file: pass --model {printable(recorded)} (API: "
        "model=...) to use that factory, or --trust-code (trust_code=True) if you trust the file"
    )


def _check_device(map_location: str | torch.device) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as error:
        raise UserInputError(
            f"map_location {map_location!r} is not a device: {_reason(error)}"
        ) from None
    try:
        torch.empty(0, device=device)
    except Exception as error:  # AssertionError "Torch not compiled with CUDA enabled", ...
        raise UserInputError(
            f"map_location '{device}' is not available here ({_reason(error)})"
        ) from None
    return device


def load(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    model: str | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild the deploy model of a fused checkpoint, weights loaded with strict keys.

    Args:
        path: A fused checkpoint written by :func:`save_fused`.
        map_location: Device of the returned model.
        model: Build this model (bundled name or ``package.module:callable``) instead of the
            one recorded in the file. A factory recorded in the file is imported only when
            named here or with ``trust_code``.
        trust_code: Import and call the factory the file names. The file decides what code
            runs: only for files you trust.

    Returns:
        The fused model in eval mode. Its ``reparam_spec`` attribute holds the
        :class:`ModelSpec` built, ``reparam_input_shapes`` the recorded example input shapes
        and ``reparam_note`` a sentence when ``model`` differs from the recorded one (else None).
    """
    from reparam.convert import fuse

    path = _check_path(path, "reparam.load")
    shown = printable(path)
    device = _check_device(map_location)
    obj = _read(path, trust_pickle=False)
    meta = _metadata(obj) if isinstance(obj, Mapping) else None
    if meta is None:
        raise NotAFusedCheckpointError(f"'{shown}' is not a fused checkpoint written by reparam")
    _check_metadata(meta, shown)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise UserInputError(f"'{shown}' has reparam metadata but no state_dict")
    _check_tensors(state_dict, shown)
    recorded = meta["model"]
    name = _choose_factory(recorded, model, trust_code, shown)
    note = None
    if name != recorded:
        note = f"built {printable(name)} instead of the recorded {printable(recorded)}"
    spec = ModelSpec(name, dict(meta.get("kwargs", {})))
    built = fuse(build_model(spec), inplace=True, trace=meta.get("trace", True))
    built.to(getattr(torch, meta.get("dtype", "float32")))
    apply_state_dict(built, state_dict, str(path))
    built.reparam_spec = spec
    built.reparam_input_shapes = [tuple(shape) for shape in meta.get("input_shapes", [])]
    built.reparam_note = note
    return built.to(device).eval()
