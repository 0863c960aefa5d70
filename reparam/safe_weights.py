"""Reading training checkpoints without running code from them, and finding the weights inside;
writing reparam's own checkpoints atomically (:func:`write_checkpoint`).

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no
code runs. A file holding a pickled ``nn.Module`` is refused unless the caller says it trusts
the file (``trust_pickle=True``), because unpickling runs code from it.

Inside a file, the state dict is searched in this order (:func:`read_weights`): the file
itself when it is a mapping of names to tensors; else the EMA entries (``ema``,
``model_ema``, ``state_dict_ema``: what YOLOv5's loader and timm deploy), then the wrapper
entries (``state_dict``, ``model_state_dict``, ``model``, ``net``), recursively. Which entry
was used is always reported, and so is an entry that was skipped because it holds no weights.
"""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam._io import atomic_write
from reparam.errors import UnsafeInputError, UserInputError, printable, summarize

__all__ = [
    "Weights",
    "apply_state_dict",
    "check_tensors",
    "load_state_dict_file",
    "read_checkpoint",
    "read_weights",
    "write_checkpoint",
]

# Exponential-moving-average weights are what YOLOv5's loader and timm deploy when a
# checkpoint holds both, so they are looked for before the raw training weights.
EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
DATA_PARALLEL_PREFIX = "module."
SHOWN_KEYS = 5


def check_path(path: Any, what: str) -> Path:
    """``path`` as a :class:`Path`; a ``TypeError`` naming the expected type otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} expects a path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def write_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` through :func:`reparam._io.atomic_write` (a
    temporary file renamed over the target: a failure or signal leaves the old file).

    torch reports a failed write (a full disk) as a RuntimeError; it becomes the OSError
    that ``atomic_write`` turns into one error line.
    """

    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as error:
            raise OSError(f"torch.save failed ({printable(summarize(error))})") from None

    return atomic_write(path, write)


def read_checkpoint(path: Path, *, trust_pickle: bool) -> Any:
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
    skipped: tuple[str, ...] = ()
    """Entries searched before the one used that hold no weights (e.g. a broken ``ema``)."""
    others: tuple[str, ...] = ()
    """Other top-level entries that also hold weights (``--weights-key`` picks one)."""

    def describe(self) -> str:
        """``entry 'model' (entry 'ema' skipped: it holds no state dict)``, for messages."""
        if not self.skipped:
            return self.entry
        skipped = ", ".join(self.skipped)
        return f"{self.entry} ({skipped} skipped: no state dict in it)"


def _entry_label(trail: tuple[str, ...]) -> str:
    if not trail:
        return "the whole file"
    return "entry " + " → ".join(f"'{printable(key)}'" for key in trail)


def _find_state_dict(
    obj: Any, trail: tuple[str, ...], skipped: list[str] | None = None
) -> tuple[dict, tuple[str, ...]] | None:
    """The first state dict in ``obj``: itself, or under an EMA key, then a wrapper key.

    Entries present but holding no state dict are appended to ``skipped`` (as labels), so
    the caller can say that a broken EMA entry was passed over for the raw weights.
    """
    if isinstance(obj, nn.Module):
        return obj.state_dict(), trail
    if not isinstance(obj, Mapping):
        return None
    if _is_state_dict(obj):
        return dict(obj), trail
    for key in (*EMA_KEYS, *WRAPPER_KEYS):
        if key in obj and obj[key] is not None:
            found = _find_state_dict(obj[key], (*trail, key), skipped)
            if found is not None:
                return found
            if skipped is not None:
                skipped.append(_entry_label((*trail, key)))
    return None


def _other_entries(obj: Any, used: tuple[str, ...]) -> tuple[str, ...]:
    """Top-level EMA/wrapper entries other than the one used that also hold a state dict."""
    if not isinstance(obj, Mapping) or not used:
        return ()
    return tuple(
        key
        for key in (*EMA_KEYS, *WRAPPER_KEYS)
        if key != used[0] and key in obj and _find_state_dict(obj[key], (key,)) is not None
    )


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def check_tensors(state_dict: Mapping, source: str) -> None:
    """Refuse entries that cannot be weights: not tensors, no data, complex, sparse."""
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise UserInputError(
                f"'{source}': state dict key {printable(repr(key))} is not a string"
            )
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
    path = check_path(path, "read_weights")
    shown = printable(path)
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    skipped: list[str] = []
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = [printable(k) for k in obj] if isinstance(obj, Mapping) else []
            available = f"; it has {', '.join(keys[:10])}" if keys else ""
            raise UserInputError(f"'{shown}' has no entry '{printable(key)}'{available}")
        found = _find_state_dict(obj[key], (key,))
    else:
        found = _find_state_dict(obj, (), skipped)
    if found is None:
        if isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values()):
            check_tensors(obj, shown)  # names the entry that is not a tensor
        raise UserInputError(
            f"'{shown}' does not contain a state dict (expected a mapping of names to tensors, "
            f"possibly under one of {', '.join((*WRAPPER_KEYS, *EMA_KEYS))})"
        )
    state_dict, trail = found
    check_tensors(state_dict, shown)
    entry = _entry_label(trail)
    if state_dict and all(name.startswith(DATA_PARALLEL_PREFIX) for name in state_dict):
        state_dict = {name[len(DATA_PARALLEL_PREFIX) :]: v for name, v in state_dict.items()}
        entry += f" ({DATA_PARALLEL_PREFIX!r} prefix removed)"
    return Weights(state_dict, entry, tuple(skipped), _other_entries(obj, trail))


def load_state_dict_file(
    path: str | os.PathLike, *, trust_pickle: bool = False, key: str | None = None
) -> dict:
    """The state dict of :func:`read_weights`, without saying where it came from."""
    return read_weights(path, trust_pickle=trust_pickle, key=key).state_dict


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` with strict matching, naming what does not fit."""
    source = printable(source)
    check_tensors(state_dict, source)
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
