"""Arrays in and out of files for a graph: ``.npy``/``.npz`` inputs, ``.npz`` outputs.

Inputs are read with ``allow_pickle=False`` (an object array would unpickle code from the
file) and every member is read and checked before anything runs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from reparam._io import atomic_write
from reparam.errors import UserInputError, summarize
from reparam.runtime.text import printable

__all__ = ["read_inputs", "save_outputs"]


def _checked(array: np.ndarray, path: Path, member: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":  # bool, signed, unsigned, float
        raise UserInputError(
            f"'{printable(str(path))}'{member} holds a {array.dtype} array: give numeric arrays"
        )
    return array


def read_inputs(path: str | Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """Arrays for the graph inputs from a .npy (one input) or .npz (by name, or in order).

    Raises:
        UserInputError: a missing, unreadable or corrupt file, an object or string array,
            or members that do not match the inputs.
    """
    path = Path(path)
    shown = printable(str(path))
    if path.is_dir():
        raise UserInputError(f"input file '{shown}' is a directory")
    if not path.is_file():
        raise UserInputError(f"input file '{shown}' does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UserInputError(f"cannot read '{shown}' as .npy/.npz: {summarize(error)}") from None
    if isinstance(loaded, np.ndarray):
        if len(input_names) != 1:
            raise UserInputError(
                f"the model takes {len(input_names)} inputs "
                f"({', '.join(map(printable, input_names))}): give a .npz"
            )
        return {input_names[0]: _checked(loaded, path, "")}
    arrays: dict[str, np.ndarray] = {}
    with loaded:
        for key in loaded.files:
            try:
                arrays[key] = _checked(loaded[key], path, f" member '{printable(key)}'")
            except UserInputError:
                raise
            except Exception as error:  # a corrupt member: zlib, zipfile, numpy format errors
                raise UserInputError(
                    f"cannot read member '{printable(key)}' of '{shown}': {summarize(error)}"
                ) from None
    if set(arrays) >= set(input_names):
        return {name: arrays[name] for name in input_names}
    if len(arrays) == len(input_names):
        return dict(zip(input_names, arrays.values(), strict=True))
    raise UserInputError(
        f"'{shown}' holds {', '.join(map(printable, arrays)) or 'no arrays'}; the model's "
        f"inputs are {', '.join(map(printable, input_names))}"
    )


def save_outputs(path: str | Path, outputs: dict[str, np.ndarray]) -> Path:
    """Write ``outputs`` to a ``.npz`` atomically (the old file stays on any failure)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **outputs)

    return atomic_write(path, write)


def describe_source(source: Any) -> str:
    """How the inputs were made, for reports."""
    return f"from {printable(str(source))}" if source is not None else "random normal"
