"""The fuser registry: which function turns a block type into its deploy form.

A fuser takes a block in eval mode and returns the module that replaces it (it may modify
and return the block itself), a :class:`FuseOutcome` carrying a note for the fuse report, or
``None`` when the block is already in its deploy form. Lookup follows the MRO, so a fuser
registered for a base class serves every subclass.

Two more registries let higher layers extend model-wide fusion without this layer importing
them: *leaf modules* (types that torch.fx tracing must not enter: dynamic blocks whose
forward is data-dependent) and *pre-fuse passes* (functions run on the model before blocks
are fused, such as :func:`reparam.adopt.adopt_foreign_blocks`, which adopts users' copies
of published blocks). :mod:`reparam.builtins` registers reparam's own, explicitly, when a
fuse starts.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

__all__ = [
    "FuseOutcome",
    "Fuser",
    "PreFusePass",
    "get_fuser",
    "leaf_module_types",
    "list_fusers",
    "override_fuser",
    "pre_fuse_passes",
    "register_fuser",
    "register_leaf_module",
    "register_pre_fuse_pass",
    "unregister_fuser",
]


@dataclass
class FuseOutcome:
    """What a fuser may return instead of a bare module: the module plus a report note."""

    module: nn.Module
    detail: str = ""


Fuser = Callable[[nn.Module], "nn.Module | FuseOutcome | None"]
"""Takes a block in eval mode; returns its deploy form, or None when it is already fused."""

_FUSERS: dict[type, Fuser] = {}


def register_fuser(block_type: type, fuser: Fuser | None = None):
    """Register ``fuser`` for ``block_type`` (and its subclasses); usable as a decorator.

    Replacing a different fuser already registered for the same type warns.

    Example::

        @reparam.register_fuser(MyBlock)
        def fuse_my_block(block):
            return block.to_conv()
    """

    def decorator(fn: Fuser) -> Fuser:
        if block_type in _FUSERS and _FUSERS[block_type] is not fn:
            warnings.warn(f"replacing the fuser registered for {block_type.__name__}", stacklevel=3)
        _FUSERS[block_type] = fn
        return fn

    return decorator(fuser) if fuser is not None else decorator


def unregister_fuser(block_type: type) -> Fuser | None:
    """Remove the fuser registered for exactly ``block_type``; returns it (None if absent)."""
    return _FUSERS.pop(block_type, None)


@contextlib.contextmanager
def override_fuser(block_type: type, fuser: Fuser) -> Iterator[Fuser]:
    """Use ``fuser`` for ``block_type`` inside a ``with`` block, then restore what was there.

    No warning is given for the temporary replacement.
    """
    previous = _FUSERS.get(block_type)
    _FUSERS[block_type] = fuser
    try:
        yield fuser
    finally:
        if previous is None:
            _FUSERS.pop(block_type, None)
        else:
            _FUSERS[block_type] = previous


def get_fuser(block_type: type) -> Fuser | None:
    """The fuser registered for ``block_type`` or its nearest registered base class."""
    for cls in block_type.__mro__:
        if cls in _FUSERS:
            return _FUSERS[cls]
    return None


def _concrete_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _concrete_subclasses(sub)


def list_fusers() -> list[str]:
    """Names of every block type that has a fuser: the registered types and every
    subclass of them defined so far (a base class registered once serves all its blocks)."""
    names: set[str] = set()
    for cls in _FUSERS:
        names.add(cls.__name__)
        names.update(sub.__name__ for sub in _concrete_subclasses(cls))
    return sorted(names)


PreFusePass = Callable[[nn.Module], list]
"""Takes the model (already a copy, eval mode), may replace submodules in place, and returns
notes with ``path``, ``foreign_type``, ``adopted_as`` (None: left alone) and ``reason``."""

_LEAF_TYPES: list[type] = []
_PRE_FUSE_PASSES: list[PreFusePass] = []


def register_leaf_module(module_type: type) -> type:
    """Never trace into ``module_type`` with torch.fx; usable as a class decorator."""
    if module_type not in _LEAF_TYPES:
        _LEAF_TYPES.append(module_type)
    return module_type


def leaf_module_types() -> tuple[type, ...]:
    """The types registered with :func:`register_leaf_module`."""
    return tuple(_LEAF_TYPES)


def register_pre_fuse_pass(fn: PreFusePass) -> PreFusePass:
    """Run ``fn`` on every model before its blocks are fused; usable as a decorator."""
    if fn not in _PRE_FUSE_PASSES:
        _PRE_FUSE_PASSES.append(fn)
    return fn


def pre_fuse_passes() -> tuple[PreFusePass, ...]:
    """The passes registered with :func:`register_pre_fuse_pass`, in registration order."""
    return tuple(_PRE_FUSE_PASSES)
