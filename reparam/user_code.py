"""Building the model a user names: a bundled name, or their own ``package.module:callable``.

A factory is resolved with :func:`pkgutil.resolve_name`, as ``python -m`` would see it: the
current directory is on ``sys.path`` while the module is imported *and* while the factory
runs, so ``reparam fuse mynet:build`` works next to ``mynet.py``, including when ``mynet``
imports a sibling module (``import layers``) at import time or inside ``build()``, without
``PYTHONPATH=.``. Only ever called for a factory the caller named (never for one that a file
names, unless the caller trusts the file).
"""

from __future__ import annotations

import contextlib
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reparam.errors import ReparamError, UserInputError, printable, summarize
from reparam.resources import check_allocation

__all__ = ["ModelSpec", "build_model", "user_code_path"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: a bundled name or ``package.module:callable``, and kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_factory(self) -> bool:
        return ":" in self.name


@contextlib.contextmanager
def user_code_path() -> Iterator[None]:
    """The current directory on ``sys.path`` (first) for the duration, as ``python -m`` has it.

    A console script's ``sys.path`` holds the script's directory, not the current one; the
    entry is removed again afterwards so that later imports are not affected.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _reason(error: BaseException) -> str:
    return printable(summarize(error))


def _resolve_factory(name: str) -> Callable[..., Any]:
    """``package.module:callable`` (dots allowed after the colon) → the callable."""
    module_name, _, attribute = name.partition(":")
    if not all(
        part.isidentifier() for text in (module_name, attribute) for part in text.split(".")
    ):
        raise UserInputError(f"factory '{printable(name)}' must look like package.module:callable")
    shown = printable(module_name)
    try:
        factory = pkgutil.resolve_name(name)
    except ModuleNotFoundError as error:
        missing = printable(error.name or "")
        where = "" if error.name == module_name else f" (it imports '{missing}', not found)"
        raise UserInputError(
            f"cannot import module '{shown}'{where}: {printable(error)}; run reparam from the "
            "directory that holds it, or install it"
        ) from None
    except ImportError as error:
        raise UserInputError(f"cannot import module '{shown}': {printable(error)}") from None
    except AttributeError:
        if module_name not in sys.modules:  # raised while importing the module itself
            raise
        raise UserInputError(
            f"module '{shown}' has no attribute '{printable(attribute)}'"
        ) from None
    if not callable(factory):
        raise UserInputError(f"'{printable(name)}' is not callable")
    return factory


def _check_model_size(factory: Callable[..., Any], kwargs: dict, label: str) -> None:
    """Refuse a model whose parameters and buffers would not fit in memory, before building it.

    The model is built once on the meta device (shapes only, no memory, the random-number
    stream untouched). A factory that cannot build there is left to the real build.
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = factory(**kwargs)
    except Exception:
        return
    if isinstance(probe, nn.Module):
        tensors = [*probe.parameters(), *probe.buffers()]
        check_allocation(
            [tuple(t.shape) for t in tensors],
            [t.dtype for t in tensors],
            f"{label} with arguments {printable(repr(kwargs), 120)}",
            hint="use smaller arguments",
        )


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the training-time model ``spec`` names; clear errors for every way it can fail."""
    with user_code_path():
        return _build(spec)


def _build(spec: ModelSpec) -> nn.Module:
    if not spec.is_factory:
        from reparam.models import create_model, get_model_info

        get_model_info(spec.name)  # unknown names fail here, with a suggestion
        factory: Callable[..., Any] = lambda **kw: create_model(spec.name, **kw)  # noqa: E731
        label = f"model '{printable(spec.name)}'"
    else:
        try:
            factory = _resolve_factory(spec.name)
        except ReparamError:
            raise
        except Exception as error:  # the module itself is broken (SyntaxError, its own raise)
            module_name = spec.name.partition(":")[0]
            raise UserInputError(
                f"cannot import module '{printable(module_name)}': {_reason(error)}"
            ) from None
        label = f"factory '{printable(spec.name)}'"
    if spec.kwargs:  # arguments from the command line or a file may ask for absurd sizes
        _check_model_size(factory, spec.kwargs, label)
    arguments = printable(repr(spec.kwargs))
    try:
        model = factory(**spec.kwargs)
    except ReparamError:  # first: a block's BlockConfigError is also a TypeError
        raise
    except TypeError as error:
        raise UserInputError(
            f"{label} rejected its arguments {arguments}: {_reason(error)}"
        ) from None
    except Exception as error:  # e.g. a negative width reaching torch.empty
        raise UserInputError(
            f"{label} failed with arguments {arguments}: {_reason(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{label} returned {type(model).__name__}, not a torch.nn.Module")
    return model
