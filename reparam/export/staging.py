"""All of a command's outputs written as temporary files first, renamed only if all succeed.

``reparam export -o e.onnx --int8`` writes two files; a failure in the second step (bad
calibration data, a quality gate, SIGTERM) must not leave the first one replaced. So each
output is *staged*: a temporary file beside its target (same file system, so the final
rename is atomic) that the work writes into; :meth:`Staging.commit` renames them all over
their targets at the end, and leaving the ``with`` block any other way (an exception,
``KeyboardInterrupt``, the CLI's SIGTERM exception) removes every temporary file, so the
targets stay as they were.

Temporary names are short (``.rp-XXXXXXXX.onnx``), never derived from the target's name: a
legal 249-character output name stays legal however long the name of its temporary is
(255 bytes is the usual file-name limit).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from types import TracebackType

from reparam._io import new_file_mode, prepare_output
from reparam.errors import UserInputError, printable

__all__ = ["Staging"]


class Staging:
    """Temporary files beside each target; renamed over the targets together by commit."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, int]] = []  # (temporary, target, mode)

    def stage(self, target: str | os.PathLike, *, suffix: str | None = None) -> Path:
        """A new empty temporary file for ``target`` (checked writable); returns its path.

        ``suffix`` defaults to the target's (``.onnx``), so tools that look at the extension
        treat the temporary file as the real one.
        """
        resolved = prepare_output(target)
        try:
            mode = stat.S_IMODE(resolved.stat().st_mode)
        except FileNotFoundError:
            mode = new_file_mode()
        try:
            handle, name = tempfile.mkstemp(
                prefix=".rp-", suffix=resolved.suffix if suffix is None else suffix,
                dir=resolved.parent,
            )  # fmt: skip
        except OSError as error:  # read-only or full file system, no permission
            raise UserInputError(
                f"cannot write to '{printable(resolved.parent)}': {error.strerror}"
            ) from None
        os.close(handle)
        temporary = Path(name)
        self._staged.append((temporary, resolved, mode))
        return temporary

    def scratch(self, near: str | os.PathLike, *, suffix: str) -> Path:
        """A temporary file beside ``near`` that is never renamed: removed on exit."""
        temporary = self.stage(near, suffix=suffix)
        self._staged[-1] = (temporary, temporary, 0)  # its own target: commit skips it
        return temporary

    def adopt(self, temporary: Path, target: str | os.PathLike) -> None:
        """Rename ``temporary`` (written by another writer, e.g. an IR's .bin) over ``target``
        at commit too, and remove it on failure."""
        resolved = prepare_output(target)
        try:
            mode = stat.S_IMODE(resolved.stat().st_mode)
        except FileNotFoundError:
            mode = new_file_mode()
        self._staged.append((Path(temporary), resolved, mode))

    def commit(self) -> None:
        """Rename every temporary file over its target (permissions: see reparam._io)."""
        try:
            renames = [entry for entry in self._staged if entry[0] != entry[1]]
            for temporary, _target, mode in renames:
                os.chmod(temporary, mode)
            for temporary, target, _ in renames:
                os.replace(temporary, target)
                self._staged.remove((temporary, target, _))
        except OSError as error:
            raise UserInputError(f"writing the outputs failed: {printable(error)}") from None

    def discard(self) -> None:
        """Remove every temporary file not yet renamed."""
        for temporary, _, _ in self._staged:
            temporary.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()  # after commit this removes nothing
