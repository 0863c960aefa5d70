"""Every exception reparam raises for a problem a user can fix, and how messages are shortened.

The CLI prints any :class:`ReparamError` as one ``error: <line>`` and exits 1; the API lets it
propagate. Bad constructor arguments of a block raise :class:`BlockConfigError`.
"""

from __future__ import annotations

__all__ = [
    "BlockConfigError",
    "ExportError",
    "FusionError",
    "MissingCustomOpError",
    "NotAFusedCheckpointError",
    "QualityGateError",
    "ReparamError",
    "UnsafeInputError",
    "UserInputError",
    "printable",
    "summarize",
]

MAX_SUMMARY = 300


class ReparamError(Exception):
    """Base class: something about the user's model, files or options is not usable."""


class FusionError(ReparamError, ValueError):
    """A block or layer cannot be fused exactly as configured."""


class UserInputError(ReparamError, ValueError):
    """A file, model name or option given by the user is missing or malformed."""


class BlockConfigError(FusionError, UserInputError, TypeError):
    """A block constructor was given arguments it cannot honour (odd kernel, groups, ...).

    The one class every block constructor raises. It is also a ``FusionError``, a
    ``UserInputError``, a ``ValueError`` and a ``TypeError``, so code written against the
    classes the blocks raised before keeps catching it.
    """


class UnsafeInputError(UserInputError):
    """A file asks reparam to import or run code, or an output would destroy a file."""


class NotAFusedCheckpointError(UserInputError):
    """A file read as a fused checkpoint is a readable checkpoint, but not one reparam wrote."""


class NotAnExpandedCheckpointError(UserInputError):
    """A file read as an expanded checkpoint is a readable checkpoint, but not one
    ``reparam expand`` wrote."""


class ExportError(ReparamError):
    """The model cannot be exported as asked (unsupported operator, opset or dynamic axis)."""


class QualityGateError(ExportError):
    """An output fails an accuracy gate the user asked for (``--min-cosine`` and the like)."""


class MissingCustomOpError(UserInputError):
    """A graph uses a custom operator whose kernel library is not installed."""


def summarize(error: BaseException, limit: int = MAX_SUMMARY) -> str:
    """``TypeName: first non-empty line`` of ``error``, at most ``limit`` characters.

    Safe for any exception: an empty message gives the type name alone (no ``IndexError``).
    torch's ``WeightsUnpickler error:`` detail is preferred over its generic preamble.
    """
    text = str(error)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    summary = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"


_ECHO_LIMIT = 160  # characters of one user-supplied value an error line shows


def _escape(char: str) -> str:
    """A non-printable character as Python writes it; a byte of a non-UTF-8 file name
    (which Python decodes to a lone surrogate U+DC80..U+DCFF) as the byte, ``\\xff``."""
    if "\udc80" <= char <= "\udcff":
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]


def printable(text: object, limit: int = _ECHO_LIMIT) -> str:
    """``text`` made safe to echo in a one-line message: escaped and cut to ``limit``.

    Names taken from files (checkpoint keys, factory names) can hold terminal escape
    sequences or newlines; a message that shows one must neither drive the terminal nor
    break the one-line ``error:`` contract. A value longer than ``limit`` characters (a
    10 MB model name in a file's metadata, say) is cut, and the cut says how long it was.
    """
    text = str(text)
    length = len(text)
    if length > limit:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(char if char.isprintable() else _escape(char) for char in text)
    if length > limit:
        text = f"{text[:limit]}… ({length} characters)"
    return text
