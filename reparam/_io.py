"""Atomic file output: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from reparam.errors import UserInputError

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``.

    A failure anywhere leaves no partial file: readers see the old file or the new one.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise UserInputError(f"output directory '{target.parent}' does not exist")
    if target.is_dir():
        raise UserInputError(f"output path '{target}' is a directory")
    try:
        handle, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
    except OSError as error:  # read-only or full file system, no permission
        raise UserInputError(f"cannot write to '{target.parent}': {error.strerror}") from None
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserInputError(f"writing '{target}' failed: {error}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
