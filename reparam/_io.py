"""Safe file output: check the destination before any work, then write it atomically.

Every command calls :func:`prepare_output` before it starts (so a bad ``-o`` fails in a
second, not after a ten-second export), then :func:`atomic_write` to write a temporary file
beside the target and rename it over the target. Rules:

- A symlink output is followed: its target is written (atomically); the link stays a link.
- Only regular files are replaced: ``/dev/null``, ``/dev/stdout``, devices, FIFOs and sockets
  are refused (an atomic rename would swap a regular file in for them).
- An output that is the same file as an input (same path, symlink or hard link) is refused.
- Modes: a new file gets what any new file gets under the user's umask (``0o666 & ~umask``),
  not ``mkstemp``'s 0600; a replaced file keeps its permission bits, so replacing a file
  never widens (or narrows) who can read it.
- On any failure or signal (``KeyboardInterrupt``, ``SystemExit`` raised by the CLI's SIGTERM
  handler) the temporary file is removed and the old file is untouched.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from reparam.errors import UnsafeInputError, UserInputError, printable

__all__ = [
    "atomic_write",
    "check_distinct_paths",
    "describe_os_error",
    "new_file_mode",
    "prepare_output",
]

_KINDS = {
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISSOCK: "a socket",
}


def _kind(mode: int) -> str:
    for test, name in _KINDS.items():
        if test(mode):
            return name
    return "not a regular file"


def _resolve(path: Path) -> Path:
    """``path`` with every symlink followed (also a dangling one: its target is written)."""
    return Path(os.path.realpath(path))


def prepare_output(path: str | os.PathLike, *, inputs: Iterable[object] = ()) -> Path:
    """Check that ``path`` can be written, before any work; return the file to write.

    Args:
        path: The output the user asked for; a symlink is followed.
        inputs: Files the command reads (``None`` entries are ignored); the output must not
            be any of them.

    Returns:
        The resolved path (symlinks followed) that :func:`atomic_write` should replace.

    Raises:
        UnsafeInputError: The output exists and is not a regular file, or is an input.
        UserInputError: It is a directory, or its directory is missing or not writable.
    """
    requested = Path(path)
    shown = printable(requested)
    target = _resolve(requested)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise UserInputError(f"cannot use output '{shown}': {error.strerror}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserInputError(f"output path '{shown}' is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        raise UnsafeInputError(
            f"output '{shown}' is {_kind(mode)}; reparam writes only regular files "
            "(it would replace it, not write into it)"
        )
    for source in inputs:
        if source is None:
            continue
        source_path = Path(source)  # type: ignore[arg-type]
        same = _resolve(source_path) == target
        if not same and mode is not None and source_path.exists():
            same = os.path.samefile(source_path, target)  # hard links
        if same:
            raise UnsafeInputError(
                f"--output '{shown}' would overwrite the input file '{printable(source_path)}'; "
                "choose another path"
            )
    directory = target.parent
    if not directory.is_dir():
        raise UserInputError(f"output directory '{printable(directory)}' does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserInputError(
            f"cannot write to '{printable(directory)}': permission denied or read-only"
        )
    return target


def new_file_mode() -> int:
    """The permission bits a new file gets under the process's umask (``0o666 & ~umask``)."""
    try:  # Linux reports the umask without changing it (no window where it is 0)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _cut_name(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes in the file-system encoding."""
    encoded = os.fsencode(name)
    if len(encoded) <= limit:
        return name
    return os.fsdecode(encoded[:limit].decode("utf-8", "ignore").encode("utf-8"))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (symlinks followed).

    A failure anywhere, a ``KeyboardInterrupt`` or ``SystemExit`` included, leaves no
    partial file and no temporary file: readers see the old file or the new one.

    Returns:
        ``path`` as given.
    """
    requested = Path(path)
    target = prepare_output(requested)  # checked again: things may have changed meanwhile
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = new_file_mode()
    tmp: Path | None = None
    try:
        try:
            # The temporary name is the target's, cut so that it stays within the 255
            # bytes a file name may have: a legal 249-character output must not fail after
            # the work because ".NAME.XXXXXXXX.tmp" is longer.
            handle, tmp_name = tempfile.mkstemp(
                prefix=f".{_cut_name(target.name, 200)}.", suffix=".tmp", dir=target.parent
            )
        except OSError as error:  # read-only or full file system, no permission
            raise UserInputError(
                f"cannot write to '{printable(target.parent)}': {error.strerror}"
            ) from None
        tmp = Path(tmp_name)
        os.close(handle)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except OSError as error:
        raise UserInputError(
            f"writing '{printable(requested)}' failed: {printable(error)}"
        ) from None
    finally:
        if tmp is not None:  # any exception or signal between mkstemp and the rename
            tmp.unlink(missing_ok=True)
    return requested


def _same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file: the same path after links, or one hard-linked file."""
    if _resolve(first) == _resolve(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # either does not exist (yet): only the resolved paths could collide
        return False


def check_distinct_paths(writes: dict[str, object], reads: dict[str, object] | None = None) -> None:
    """Refuse, before any work, a command whose paths collide.

    Every path the command writes must differ from every other path it writes and from
    every path it reads, through symlinks and hard links too: ``reparam fuse -o X.pt
    --report X.pt`` would otherwise keep only one of its outputs, and ``verify --report
    fused.pt -m fused.pt`` would replace its own input.

    Args:
        writes: ``{option name: path}`` of every output (``None`` values are ignored).
        reads: ``{option name: path}`` of every input (``None`` values are ignored).

    Raises:
        UnsafeInputError: Two outputs, or an output and an input, are one file.
    """
    outputs = [(name, Path(path)) for name, path in writes.items() if path is not None]  # type: ignore[arg-type]
    inputs = [(name, Path(path)) for name, path in (reads or {}).items() if path is not None]  # type: ignore[arg-type]
    for index, (name, path) in enumerate(outputs):
        for other_name, other in outputs[index + 1 :]:
            if _same_file(path, other):
                raise UnsafeInputError(
                    f"{name} '{printable(path)}' and {other_name} '{printable(other)}' are "
                    "the same file; one would overwrite the other: choose two paths"
                )
        for input_name, source in inputs:
            if _same_file(path, source):
                raise UnsafeInputError(
                    f"{name} '{printable(path)}' would overwrite the input {input_name} "
                    f"'{printable(source)}'; choose another path"
                )


def _in_temp_dir(filename: object) -> bool:
    if not filename:
        return False
    try:
        return (
            Path(os.fsdecode(filename))
            .resolve()
            .is_relative_to(Path(tempfile.gettempdir()).resolve())
        )
    except (OSError, ValueError, TypeError):
        return False


def describe_os_error(error: OSError) -> str | None:
    """One line for an environment failure the user can fix, or None for anything else.

    A closed output pipe (``reparam ... | head -1``), a full disk or ``> /dev/full``, a full
    or missing temporary folder, a read-only file system, a denied permission: these are the
    user's environment, not reparam's bugs, so they are named as such instead of "internal
    error". The file involved, if the error has one, is named (escaped, cut).
    """
    if "No usable temporary directory" in str(error):
        return (
            "no usable temporary folder (TMPDIR is full, missing or read-only): set TMPDIR "
            "to a folder with free space"
        )
    code = error.errno
    where = f" ('{printable(os.fsdecode(error.filename))}')" if error.filename else ""
    if code == errno.EPIPE:
        return "the output was closed before everything was written (a pipe such as | head)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        if _in_temp_dir(error.filename):
            return (
                f"no space left in the temporary folder{where}: free space there, or set "
                "TMPDIR to a folder with space"
            )
        if not error.filename:
            return "no space left on the device being written (the disk, or stdout is full)"
        return f"no space left on the device{where}: free space, or write elsewhere"
    if code == errno.EROFS:
        return f"read-only file system{where}: write elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    if code == errno.EIO:
        return f"input/output error{where}"
    if code == errno.ENAMETOOLONG:
        return f"a file name is too long{where}"
    return None
