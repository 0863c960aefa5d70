"""Registry of bundled models: built by name from the CLI and the API."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from reparam.errors import UserInputError

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
    """The registry entry for ``name``; a clear error listing the choices otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise UserInputError(
            f"unknown model '{name}'; bundled models: {', '.join(list_models())} "
            "(or give a factory as package.module:callable)"
        ) from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the bundled model ``name`` in its training-time form."""
    return get_model_info(name).factory(**kwargs)
