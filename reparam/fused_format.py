"""The fused checkpoint: writing it, and rebuilding the deploy model from it.

A fused checkpoint is a dict of plain types plus the fused state dict::

    {"reparam": {"format": "reparam.fused", "format_version": 1, "reparam_version": ...,
                 "model": "acnet_resnet18" or "pkg.mod:factory", "kwargs": {...},
                 "input_shapes": [[1, 3, 224, 224]], "trace": True, "dtype": "float32",
                 "probe_seed": 0},
     "state_dict": {...}}

The state dict holds weights only; the architecture is whatever fusing the factory's model
gives. Fusing can depend on an example input: a model torch.fx cannot trace has its Conv→BN
pairs found by a probe forward, and a pasted copy of a published block is adopted after a
check on the probe. So the file records the probe (``input_shapes`` and ``probe_seed``: the
inputs are ``torch.randn`` from ``Generator().manual_seed(probe_seed)``, one per shape) and
:func:`load` fuses the rebuilt model with the same probe. The fused architecture is then
compared with the file's keys and shapes; a file whose architecture cannot be reproduced
(the factory's code changed, say) is refused with one line instead of half-loaded.

Reading a file never imports or calls anything the file names: a bundled model name is
rebuilt by reparam itself; a ``pkg.mod:factory`` recorded in a file is used only when the
caller names a factory (``model=``) or says it trusts the file (``trust_code=True``). Every
field of the metadata is type-checked first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
from reparam.safe_weights import (
    apply_state_dict,
    check_path,
    check_tensors,
    read_checkpoint,
    write_checkpoint,
)
from reparam.user_code import ModelSpec, build_model

__all__ = ["FORMAT", "FORMAT_VERSION", "is_fused_checkpoint", "load", "probe_inputs", "save_fused"]

FORMAT = "reparam.fused"
FORMAT_VERSION = 1
FUSED_DTYPES = ("float16", "bfloat16", "float32", "float64")
SHOWN_KEYS = 3


def probe_inputs(
    shapes: Sequence[Sequence[int]],
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """The probe inputs ``reparam fuse`` checks with and records: standard normal, seeded.

    Drawn in float32 from one CPU generator and then cast, so the same seed gives the same
    values on every device and dtype.
    """
    shapes = [tuple(shape) for shape in shapes]
    check_allocation(shapes, dtype, "probe input", copies=2)
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        for shape in shapes
    ]


def save_fused(
    fused: nn.Module,
    path: str | os.PathLike,
    spec: ModelSpec,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    trace: bool = True,
    probe_seed: int | None = None,
) -> Path:
    """Write ``fused``'s state dict with what :func:`load` needs to rebuild it, atomically.

    ``probe_seed``: ``fused`` was made with ``example_inputs=probe_inputs(input_shapes,
    probe_seed)``; :func:`load` fuses with the same inputs, so that pairs the probe folded
    and blocks adopted on it are folded and adopted again.
    """
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "reparam_version": __version__,
        "model": spec.name,
        "kwargs": dict(spec.kwargs),
        "input_shapes": [list(shape) for shape in input_shapes or []],
        "trace": trace,
        "dtype": _float_dtype_name(fused),
    }
    if probe_seed is not None:
        meta["probe_seed"] = probe_seed
    payload = {
        "reparam": meta,
        "state_dict": {key: value.detach().cpu() for key, value in fused.state_dict().items()},
    }

    return write_checkpoint(payload, path)


def _float_dtype_name(model: nn.Module) -> str:
    """The dtype of the first floating-point tensor of ``model`` ("float32" if none)."""
    for value in model.state_dict().values():
        if value.is_floating_point():
            return str(value.dtype).removeprefix("torch.")
    return "float32"


def is_fused_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fused checkpoint written by :func:`save_fused`."""
    try:
        obj = read_checkpoint(check_path(path, "is_fused_checkpoint"), trust_pickle=False)
    except (ReparamError, TypeError):  # not loadable at all: certainly not ours
        return False
    return isinstance(obj, Mapping) and _metadata(obj) is not None


def _metadata(obj: Mapping) -> Mapping | None:
    meta = obj.get("reparam")
    return meta if isinstance(meta, Mapping) and meta.get("format") == FORMAT else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_text(value: int) -> str:
    """``str(value)``, also for integers too long for Python to convert (over 4300 digits)."""
    try:
        return str(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except (ValueError, RecursionError):  # a 5000-digit integer, a deeply nested list
        return "(too large to show)"


def _check_metadata(meta: Mapping, shown: str) -> None:
    """Type-check every metadata field before any of it is used."""

    def bad(field_name: str, expected: str) -> UserInputError:
        value = meta[field_name]
        return UserInputError(
            f"'{shown}' has malformed reparam metadata: '{field_name}' must be {expected}, "
            f"not {type(value).__name__} {printable(_safe_repr(value), 60)}"
        )

    version = meta.get("format_version", 0)
    if "format_version" in meta and not _is_int(version):
        raise bad("format_version", "an integer")
    if version > FORMAT_VERSION:
        raise UserInputError(
            f"'{shown}' uses fused-checkpoint format {printable(_int_text(version))}; this reparam "
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
    seed = meta.get("probe_seed", 0)
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise bad("probe_seed", "an integer in 0..2**63-1")


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
    name = printable(recorded)
    raise UnsafeInputError(
        f"'{shown}' names the factory '{name}', and reparam does not import code named by a "
        f"file: pass --model {name} (API: model=...) to use that factory, or --trust-code "
        "(trust_code=True) if you trust the file"
    )


def _check_device(map_location: str | torch.device) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as error:
        raise UserInputError(
            f"map_location {printable(repr(map_location))} is not a device: "
            f"{printable(summarize(error))}"
        ) from None
    try:
        torch.empty(0, device=device)
    except Exception as error:  # AssertionError "Torch not compiled with CUDA enabled", ...
        raise UserInputError(
            f"map_location '{device}' is not available here ({printable(summarize(error))})"
        ) from None
    return device


def _architecture(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _difference(built: Mapping[str, tuple], stored: Mapping[str, Tensor]) -> str:
    """``"2 missing (e.g. a, b); 1 unexpected (e.g. c)"`` (keys of the file against the
    fused model), or a shape mismatch, or "" when the architectures are the same."""
    missing = [key for key in built if key not in stored]
    unexpected = [key for key in stored if key not in built]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(printable(key) for key in keys[:SHOWN_KEYS])
            parts.append(f"{len(keys)} {label} (e.g. {shown})")
    if not parts:
        for key, shape in built.items():
            if tuple(stored[key].shape) != shape:
                return (
                    f"{printable(key)} has shape {tuple(stored[key].shape)} in the file, "
                    f"{shape} in the model"
                )
    return "; ".join(parts)


def _fuse_like_the_file(
    model: nn.Module, meta: Mapping, state_dict: Mapping[str, Tensor], shown: str, name: str
) -> nn.Module:
    """Fuse ``model`` the way the file's model was fused: same probe, same tracing.

    The recorded probe is tried first (the file says fusing used it), then fusing without
    one (files written by the API without a probe, and older files); the first whose keys
    and shapes equal the file's wins. None matching is refused with what differs.
    """
    from reparam.convert import fuse

    trace = meta.get("trace", True)
    shapes = [tuple(shape) for shape in meta.get("input_shapes", [])]
    attempts: list[tuple | None] = []
    if shapes:
        attempts.append(tuple(probe_inputs(shapes, meta.get("probe_seed", 0))))
    if "probe_seed" not in meta or not shapes:
        attempts.append(None)
    first_difference = ""
    for example in attempts:
        try:
            fused = fuse(model, trace=trace, example_inputs=example)
        except ReparamError:
            raise
        except Exception as error:  # the recorded shapes no longer fit the factory's model
            if not first_difference:
                first_difference = f"fusing it failed ({printable(summarize(error))})"
            continue
        difference = _difference(_architecture(fused), state_dict)
        if not difference:
            return fused
        first_difference = first_difference or difference
    raise UserInputError(
        f"keys in '{shown}' do not match {printable(name)} as fused now: {first_difference}; "
        "the model's code or arguments changed since the file was written (build it as it "
        "was, or run reparam fuse again)"
    )


def _refuse_nan(state_dict: Mapping, shown: str) -> None:
    """``reparam fuse`` never writes NaN weights (its check refuses them), so a fused file
    holding one was damaged or edited; loading it would only give NaN outputs later."""
    for key, value in state_dict.items():
        if value.is_floating_point() and bool(torch.isnan(value).any()):
            raise UserInputError(
                f"'{shown}': {printable(key)} holds NaN; reparam fuse never writes that, so "
                "the file is damaged: fuse the model again"
            )


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
    path = check_path(path, "reparam.load")
    shown = printable(path)
    device = _check_device(map_location)
    obj = read_checkpoint(path, trust_pickle=False)
    meta = _metadata(obj) if isinstance(obj, Mapping) else None
    if meta is None:
        raise NotAFusedCheckpointError(f"'{shown}' is not a fused checkpoint written by reparam")
    _check_metadata(meta, shown)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise UserInputError(f"'{shown}' has reparam metadata but no state_dict")
    check_tensors(state_dict, shown)
    _refuse_nan(state_dict, shown)
    recorded = meta["model"]
    name = _choose_factory(recorded, model, trust_code, shown)
    note = None
    if name != recorded:
        note = f"built {printable(name)} instead of the recorded {printable(recorded)}"
    spec = ModelSpec(name, dict(meta.get("kwargs", {})))
    built = _fuse_like_the_file(build_model(spec).eval(), meta, state_dict, shown, name)
    built.to(getattr(torch, meta.get("dtype", "float32")))
    apply_state_dict(built, state_dict, str(path))
    built.reparam_spec = spec
    built.reparam_input_shapes = [tuple(shape) for shape in meta.get("input_shapes", [])]
    built.reparam_note = note
    return built.to(device).eval()
