"""A model's example arguments as flat graph inputs, and back.

An ONNX graph takes a flat list of tensors; a model's ``forward`` may take positional
tensors, ``*args``, keyword arguments with defaults, and nested tuples, lists and dicts of
tensors (ASFF's ``forward((x2, x1, x0))``). :class:`InputTree` flattens the example
``(args, kwargs)`` with torch's pytree utilities: every tensor leaf becomes one graph input,
in order; every other leaf (``None``, a bool, int or float) is a constant of the graph.
:class:`FlatInputs` is the ``forward(*tensors)`` wrapper that the exporters trace, so that
``dynamic_shapes`` is one entry per tensor whatever the model's own signature is.
The tree is stored in the ONNX metadata so that :func:`reparam.verify_onnx` can call the
PyTorch model with the graph's inputs regrouped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils import _pytree as pytree

from reparam.errors import UserInputError

__all__ = ["FlatInputs", "InputTree", "flatten_inputs", "unflatten_inputs"]

CONSTANT_TYPES = (bool, int, float, type(None))


@dataclass
class InputTree:
    """Where each graph input goes in the model's ``(args, kwargs)``.

    Attributes:
        spec: the pytree structure of ``(args, kwargs)``.
        slots: for each leaf, the index of its graph input, or None for a constant leaf.
        constants: the constant leaves by leaf index.
    """

    spec: pytree.TreeSpec
    slots: list[int | None]
    constants: dict[int, Any]

    @classmethod
    def from_example(
        cls, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None
    ) -> tuple[InputTree, tuple[Tensor, ...]]:
        """Flatten example arguments; returns the tree and the tensors in graph order.

        ``example_inputs`` is one tensor or a sequence of positional arguments.

        Raises:
            UserInputError: a leaf that is neither a tensor nor a constant, or no tensor.
        """
        args = (example_inputs,) if isinstance(example_inputs, Tensor) else example_inputs
        if not isinstance(args, list | tuple):
            raise UserInputError(
                "example_inputs must be a tensor or a sequence of arguments, got "
                f"{type(example_inputs).__name__}"
            )
        kwargs = dict(example_kwargs or {})
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        tensors: list[Tensor] = []
        slots: list[int | None] = []
        constants: dict[int, Any] = {}
        for index, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                slots.append(len(tensors))
                tensors.append(leaf)
            elif isinstance(leaf, CONSTANT_TYPES):
                slots.append(None)
                constants[index] = leaf
            else:
                raise UserInputError(
                    "example_inputs must be a tensor or a sequence whose items are tensors or "
                    "(nested) tuples, lists and dicts of tensors, got an item of type "
                    f"{type(leaf).__name__}"
                )
        if not tensors:
            raise UserInputError("example_inputs holds no tensor")
        return cls(spec, slots, constants), tuple(tensors)

    def rebuild(self, flat: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model's ``(args, kwargs)`` with the graph inputs ``flat`` in place."""
        leaves = [
            self.constants[index] if slot is None else flat[slot]
            for index, slot in enumerate(self.slots)
        ]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)

    def to_json(self) -> str | None:
        """The tree as JSON for the ONNX metadata; None where pytree cannot serialise it
        (a namedtuple argument whose type is not registered with pytree)."""
        try:
            spec = pytree.treespec_dumps(self.spec)
        except (TypeError, NotImplementedError):
            return None
        constants = {str(index): value for index, value in self.constants.items()}
        return json.dumps({"spec": spec, "slots": self.slots, "constants": constants})

    @classmethod
    def from_json(cls, text: str) -> InputTree | None:
        """Inverse of :meth:`to_json`; None for text it cannot read (a hand-edited file)."""
        try:
            data = json.loads(text)
            spec = pytree.treespec_loads(data["spec"])
            slots = [None if s is None else int(s) for s in data["slots"]]
            constants = {int(index): value for index, value in data["constants"].items()}
        except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError):
            return None
        if spec.num_leaves != len(slots):
            return None
        return cls(spec, slots, constants)


class FlatInputs(nn.Module):
    """Calls the wrapped model with flat graph inputs regrouped by an :class:`InputTree`."""

    def __init__(self, model: nn.Module, tree: InputTree) -> None:
        super().__init__()
        self.model = model
        self.tree = tree

    def forward(self, *flat: Tensor) -> Any:
        args, kwargs = self.tree.rebuild(flat)
        return self.model(*args, **kwargs)


def flatten_inputs(example_inputs: Any) -> tuple[tuple[Tensor, ...], list[int | None]]:
    """Positional arguments → (flat tensors, structure); the older, one-level form.

    Each argument is a tensor (structure entry ``None``) or a list/tuple of n tensors (entry
    n). Files written before :class:`InputTree` record this structure.
    """
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    flat: list[Tensor] = []
    structure: list[int | None] = []
    for arg in args:
        if isinstance(arg, Tensor):
            flat.append(arg)
            structure.append(None)
        elif isinstance(arg, list | tuple) and arg and all(isinstance(t, Tensor) for t in arg):
            flat.extend(arg)
            structure.append(len(arg))
        else:
            raise UserInputError(
                "example_inputs must be a tensor or a sequence whose items are tensors or "
                f"sequences of tensors, got an item of type {type(arg).__name__}"
            )
    if not flat:
        raise UserInputError("example_inputs is empty")
    return tuple(flat), structure


def unflatten_inputs(flat: Sequence[Any], structure: Sequence[int | None]) -> list[Any]:
    """Inverse of :func:`flatten_inputs`: the positional arguments for the model."""
    args: list[Any] = []
    position = 0
    for entry in structure:
        if entry is None:
            args.append(flat[position])
            position += 1
        else:
            args.append(list(flat[position : position + entry]))
            position += entry
    return args
