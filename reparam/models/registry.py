"""Registry of bundled models: built by name from the CLI and the API."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from reparam.errors import UserInputError, printable

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model"]


@dataclass(frozen=True)
class ModelInfo:
    """A bundled model: its factory, the input shapes it expects, and one line about it."""

    name: str
    factory: Callable[..., nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]
    description: str


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, *input_shapes: tuple[int, ...], description: str = ""):
    """Decorator registering a model factory under ``name`` with its example input shapes."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            warnings.warn(f"replacing the bundled model registered as '{name}'", stacklevel=2)
        doc = description or next(iter((factory.__doc__ or "").strip().splitlines()), name)
        _MODELS[name] = ModelInfo(name, factory, tuple(input_shapes), doc)
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the bundled models."""
    return sorted(_MODELS)


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; a clear error otherwise, with the closest names.

    The closest names come from :func:`difflib.get_close_matches` (a typo such as
    ``repvgg_ao`` suggests ``repvgg_a0``); without one close enough, all names are listed.
    """
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name)[:200], list_models(), n=3, cutoff=0.6)
    if close:
        choices = f"did you mean {' or '.join(close)}?"
    else:
        choices = f"bundled models: {', '.join(list_models())}"
    raise UserInputError(
        f"unknown model '{printable(name)}'; {choices} (or give a factory as "
        "package.module:callable, or a file as ./NAME.pt)"
    )


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the bundled model ``name`` in its training-time form."""
    return get_model_info(name).factory(**kwargs)
