"""Exceptions raised for problems a user can fix; the CLI prints them as one-line errors."""

from __future__ import annotations

__all__ = ["FusionError", "ReparamError", "UserInputError"]


class ReparamError(Exception):
    """Base class: something about the user's model, files or options is not usable."""


class FusionError(ReparamError, ValueError):
    """A block or layer cannot be fused exactly as configured."""


class UserInputError(ReparamError, ValueError):
    """A file, model name or option given by the user is missing or malformed."""
