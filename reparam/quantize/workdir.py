"""The quantizer's work folder: every temporary file inside it, removed on any exit.

onnxruntime's quantizer makes its own temporary folders (``ort.quant.*``, ``pre.quant.*``)
and files beside the model it reads. While :func:`work_directory` is open, Python's
``tempfile`` default directory points into the work folder, so all of them are created
inside it, and the one ``finally`` that removes the folder removes them too, whether the
quantizer returns, raises, or is interrupted by Ctrl-C or the CLI's SIGTERM exception.
(``tempfile.tempdir`` is process-wide: it is restored on exit.)
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from reparam.errors import UserInputError, printable

__all__ = ["work_directory"]


@contextlib.contextmanager
def work_directory() -> Iterator[Path]:
    """A fresh folder in TMPDIR (short name), removed with its contents on exit."""
    try:
        path = Path(tempfile.mkdtemp(prefix="rp-q-"))
    except OSError as error:
        where = printable(tempfile.gettempdir())
        reason = "it is full" if error.errno == errno.ENOSPC else error.strerror
        raise UserInputError(
            f"cannot make a work folder in the temporary folder '{where}' ({reason}); free "
            "space or point TMPDIR at another folder"
        ) from None
    previous = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)
