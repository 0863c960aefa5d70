"""Expanded (training-time) checkpoints: written by ``reparam expand``, rebuilt without
running code from the file.

The file is a dict of plain types plus the expanded model's state dict::

    {"reparam": {"format": "reparam.expanded", "format_version": 1, "reparam_version": ...,
                 "model": "resnet18" or "pkg.mod:factory", "kwargs": {...},
                 "base": "training" or "deploy", "family": "dbb",
                 "options": {"include": [...] or None, "exclude": [...] or None,
                             "num_conv_branches": 2, "trace": true},
                 "input_shapes": [[1, 3, 224, 224]], "dtype": "float32"},
     "state_dict": {...}}

:func:`load_expanded` rebuilds the model from its factory (``base`` "deploy": then fused, as
a deploy-form source was), expands it with the recorded family and options (which fixes
the structure), and loads the weights with strict key matching. It reads the file with
``torch.load(weights_only=True)`` and imports a factory the file names only when the caller
names it (``model=``) or trusts the file (``trust_code=True``), as :func:`reparam.load` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reparam._version import __version__
from reparam.errors import (
    NotAnExpandedCheckpointError,
    UnsafeInputError,
    UserInputError,
    printable,
)
from reparam.expansion_blocks import FAMILIES
from reparam.safe_weights import check_path, check_tensors, read_checkpoint, write_checkpoint

__all__ = ["FORMAT", "load_expanded", "save_expanded"]

FORMAT = "reparam.expanded"
FORMAT_VERSION = 1
BASES = ("training", "deploy")
DTYPES = ("float16", "bfloat16", "float32", "float64")


def save_expanded(
    model: nn.Module,
    path: str | os.PathLike,
    spec: Any,
    family: str,
    *,
    options: Mapping[str, Any],
    base: str = "training",
    input_shapes: list[tuple[int, ...]] | None = None,
) -> Path:
    """Write ``model`` (the result of :func:`reparam.expansion.expand` on ``spec``'s model)
    with what :func:`load_expanded` needs to rebuild it, atomically."""
    dtype = next((v.dtype for v in model.state_dict().values() if v.is_floating_point()), None)
    payload = {
        "reparam": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "reparam_version": __version__,
            "model": spec.name,
            "kwargs": dict(spec.kwargs),
            "base": base,
            "family": family,
            "options": dict(options),
            "input_shapes": [list(shape) for shape in input_shapes or []],
            "dtype": str(dtype or torch.float32).removeprefix("torch."),
        },
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }

    return write_checkpoint(payload, path)


def _check_metadata(meta: Mapping, shown: str) -> None:
    """Type-check every field before any of it is used."""

    def bad(name: str, expected: str) -> UserInputError:
        return UserInputError(
            f"'{shown}' has malformed expand metadata: '{name}' must be {expected}, not "
            f"{printable(repr(meta.get(name)), 60)}"
        )

    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("format_version", "an integer")
    if version > FORMAT_VERSION:
        raise UserInputError(
            f"'{shown}' uses expanded-checkpoint format {version}; this reparam ({__version__}) "
            f"reads up to {FORMAT_VERSION}: upgrade reparam"
        )
    if not isinstance(meta.get("model"), str) or not meta["model"]:
        raise bad("model", "a model name or package.module:callable")
    kwargs = meta.get("kwargs")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise bad("kwargs", "a mapping of argument names to values")
    if meta.get("family") not in FAMILIES:
        raise bad("family", f"one of {', '.join(FAMILIES)}")
    if meta.get("base") not in BASES:
        raise bad("base", "'training' or 'deploy'")
    if meta.get("dtype") not in DTYPES:
        raise bad("dtype", f"one of {', '.join(DTYPES)}")
    options = meta.get("options")
    if not isinstance(options, Mapping):
        raise bad("options", "a mapping")
    for name in ("include", "exclude"):
        value = options.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(p, str) for p in value)
        ):
            raise bad(f"options.{name}", "a list of glob patterns or null")
    branches = options.get("num_conv_branches", 2)
    if not isinstance(branches, int) or isinstance(branches, bool) or not 1 <= branches <= 64:
        raise bad("options.num_conv_branches", "an integer from 1 to 64")
    if not isinstance(options.get("trace", True), bool):
        raise bad("options.trace", "true or false")
    shapes = meta.get("input_shapes", [])
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(isinstance(d, int) and d > 0 for d in s) for s in shapes
    ):
        raise bad("input_shapes", "a list of shapes of positive integers")


def is_expanded_checkpoint(obj: object) -> bool:
    """Whether a loaded checkpoint object is one :func:`save_expanded` wrote."""
    meta = obj.get("reparam") if isinstance(obj, Mapping) else None
    return isinstance(meta, Mapping) and meta.get("format") == FORMAT


def load_expanded(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    trust_code: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the expanded training-time model of a ``reparam expand`` checkpoint.

    Args:
        path: a file written by :func:`save_expanded` (``reparam expand -o``).
        model: build this model (bundled name or ``package.module:callable``) instead of the
            one the file records.
        trust_code: import and call the factory the file names (only for files you trust).
        map_location: device of the returned model.

    Returns:
        The expanded model in training mode, weights loaded with strict keys; its
        ``reparam_expand`` attribute holds the recorded metadata.

    Raises:
        UserInputError: not an expanded checkpoint, malformed metadata, or weights that do
            not fit the rebuilt model.
        UnsafeInputError: the file names a factory and neither ``model`` nor ``trust_code``
            allows importing it.
    """
    from reparam.checkpoint import ModelSpec, apply_state_dict, build_model
    from reparam.convert import fuse
    from reparam.expansion import expand
    from reparam.fused_format import probe_inputs

    path = check_path(path, "load_expanded")
    shown = printable(path)
    obj = read_checkpoint(path, trust_pickle=False)
    if not is_expanded_checkpoint(obj):
        raise NotAnExpandedCheckpointError(
            f"'{shown}' is not an expanded checkpoint written by reparam expand"
        )
    meta = obj["reparam"]
    _check_metadata(meta, shown)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise UserInputError(f"'{shown}' has expand metadata but no state_dict")
    check_tensors(state_dict, shown)
    name = _choose_model(meta["model"], model, trust_code, shown)
    built = build_model(ModelSpec(name, dict(meta["kwargs"])))
    if meta["base"] == "deploy":
        built = fuse(built, inplace=True)
    built.to(getattr(torch, meta["dtype"]))
    options = meta["options"]
    # The recorded probe shapes: a model fx cannot trace had its pairs found on a probe.
    shapes = meta.get("input_shapes") or []
    example = tuple(probe_inputs(shapes, 0, getattr(torch, meta["dtype"]))) if shapes else None
    expanded = expand(
        built,
        meta["family"],
        example_inputs=example,
        include=options.get("include"),
        exclude=options.get("exclude"),
        num_conv_branches=options.get("num_conv_branches", 2),
        trace=options.get("trace", True),
        inplace=True,
    )
    apply_state_dict(expanded, state_dict, str(path))
    expanded.reparam_expand = dict(meta)
    return expanded.to(map_location).train()


def _choose_model(recorded: str, model: str | None, trust_code: bool, shown: str) -> str:
    """The model to build: never a factory the file names unless the caller allows it."""
    if model is not None:
        return model
    if ":" not in recorded:
        from reparam.models import list_models

        if recorded not in list_models():
            raise UserInputError(f"'{shown}' names the unknown model '{printable(recorded)}'")
        return recorded
    if trust_code:
        return recorded
    raise UnsafeInputError(
        f"'{shown}' names the factory '{printable(recorded)}', and reparam does not import "
        f"code named by a file: pass --model {printable(recorded)} (API: model=...) to use "
        "that factory, or --trust-code (trust_code=True) if you trust the file"
    )
