"""What every command shares: option types, argument parsing, model loading, error exits."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from reparam.checkpoint import (
    ModelSpec,
    apply_state_dict,
    build_model,
    is_fused_checkpoint,
    load,
    load_state_dict_file,
)
from reparam.errors import ReparamError, UserInputError
from reparam.models import get_model_info, list_models
from reparam.testing import randomize_batchnorm

ModelArg = Annotated[
    str,
    typer.Argument(
        help=f"A bundled model ({', '.join(list_models())}), a factory "
        "package.module:callable, or a fused checkpoint written by `reparam fuse`.",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        help="State-dict checkpoint (.pt/.pth), loaded with torch.load(weights_only=True). "
        "Without it the model keeps its initial weights, with randomised BN statistics.",
    ),
]
KwargOpt = Annotated[
    list[str] | None,
    typer.Option("--kwarg", "-k", help="Factory keyword argument KEY=VALUE (VALUE as JSON)."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        "-s",
        help="Probe input shape such as 1,3,224,224; repeat for several inputs. "
        "Defaults to the bundled model's shape.",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Accept a checkpoint holding a pickled nn.Module. Unpickling RUNS CODE from the "
        "file: only use it for files you trust.",
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed for probe inputs and randomised BN statistics.")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`ReparamError` into ``error: <one line>`` on stderr and exit code 1."""
    try:
        yield
    except ReparamError as error:
        message = " ".join(str(error).split())
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=1) from None


def parse_kwargs(pairs: Sequence[str] | None) -> dict:
    """``["depth=3", "name=x"]`` → ``{"depth": 3, "name": "x"}``; values are JSON or strings."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserInputError(f"--kwarg '{pair}' must look like KEY=VALUE")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` → ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UserInputError(f"input shape '{text}' must be integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserInputError(f"input shape '{text}' must have positive sizes")
    return shape


@dataclass
class LoadedModel:
    """A model as named on the command line, with what the commands need to report on it."""

    model: nn.Module
    spec: ModelSpec
    input_shapes: list[tuple[int, ...]]
    description: str
    fused: bool = False

    def probe_inputs(self, seed: int) -> list[torch.Tensor]:
        """Random normal inputs of the model's dtype and device, one per input shape."""
        reference = next(self.model.parameters(), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = reference.device if reference is not None else "cpu"
        generator = torch.Generator().manual_seed(seed)
        return [
            torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
            for shape in self.input_shapes
        ]


def load_model(
    name: str,
    *,
    weights: Path | None = None,
    kwargs: Sequence[str] | None = None,
    input_shapes: Sequence[str] | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Build the model a command names, load its weights, and settle its input shapes."""
    shapes = [parse_shape(text) for text in input_shapes or []]
    path = Path(name)
    if path.suffix in {".pt", ".pth"} or path.exists():
        if not path.is_file():
            raise UserInputError(f"model file '{path}' does not exist")
        if weights is not None:
            raise UserInputError("a fused checkpoint carries its weights: drop --weights")
        if kwargs:
            raise UserInputError("a fused checkpoint records its factory arguments: drop --kwarg")
        if not is_fused_checkpoint(path):
            raise UserInputError(
                f"'{path}' is not a fused checkpoint; name the model and pass this file "
                "with --weights"
            )
        model = load(path)
        return LoadedModel(
            model,
            model.reparam_spec,
            shapes or list(model.reparam_input_shapes),
            f"{model.reparam_spec.name} (fused checkpoint {path})",
            fused=True,
        )

    spec = ModelSpec(name, parse_kwargs(kwargs))
    # Seeded so that a model without --weights gets the same initial weights in every
    # command: `reparam export` now and `reparam verify` later agree.
    torch.manual_seed(seed)
    model = build_model(spec)
    if weights is not None:
        apply_state_dict(model, load_state_dict_file(weights, trust_pickle=trust_pickle), weights)
        description = f"{name} with weights {weights}"
    else:
        randomize_batchnorm(model, seed)
        description = f"{name} (initial weights, randomised BN statistics)"
    if not shapes:
        shapes = _default_shapes(spec, model)
    return LoadedModel(model.eval(), spec, shapes, description)


def _default_shapes(spec: ModelSpec, model: nn.Module) -> list[tuple[int, ...]]:
    if not spec.is_factory:
        return list(get_model_info(spec.name).input_shapes)
    shapes = getattr(model, "example_input_shapes", None)
    if shapes:
        return [tuple(shape) for shape in shapes]
    raise UserInputError(f"give --input-shape for factory '{spec.name}' (e.g. -s 1,3,224,224)")
