"""What every command shares: option types, argument parsing, model loading, error exits.

torch and the model code are imported inside the functions that need them, not at module
level: every command module imports this one, and ``reparam --help`` / ``--version`` should
not pay for ``import torch``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from reparam.cli.app import settings, stdout_gone_quietly
from reparam.errors import (
    NotAFusedCheckpointError,
    ReparamError,
    UserInputError,
    printable,
    summarize,
)
from reparam.resources import check_allocation, check_threads  # noqa: F401 (for commands)

if TYPE_CHECKING:  # annotations only: no torch import at run time
    import torch
    from torch import nn

    from reparam.checkpoint import ModelSpec

MAX_SEED = 2**63 - 1
MODEL_FILE_SUFFIXES = (".pt", ".pth")


def _bundled_names() -> str:
    # A static list: the registry would import torch and every model, and help must be fast.
    from reparam.cli._model_names import BUNDLED_MODELS

    return ", ".join(BUNDLED_MODELS)


MODEL_RULE = (
    "A bundled name always means the bundled model; an argument containing a path "
    "separator or ending in .pt/.pth is a file (write ./NAME for a file named like a bundled "
    "model); anything else with a colon is a factory."
)
ModelArg = Annotated[
    str,
    typer.Argument(
        help=f"A bundled model ({_bundled_names()}), a factory package.module:callable, or a "
        f"fused checkpoint written by `reparam fuse`. {MODEL_RULE}",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        help="State-dict checkpoint (.pt/.pth), loaded with torch.load(weights_only=True). "
        "EMA weights (ema, model_ema, state_dict_ema) are preferred when present. "
        "Without it the model keeps its initial weights, with randomised BN statistics.",
    ),
]
WeightsKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--weights-key",
        help="Take the state dict from this top-level entry of the --weights file "
        "(e.g. model, ema, state_dict) instead of choosing one.",
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
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Let a fused checkpoint name the factory that rebuilds it: this IMPORTS AND RUNS "
        "CODE named in the file. Only for files you trust; --model names it yourself instead.",
    ),
]
_MODEL_OVERRIDE_HELP = (
    "Rebuild a fused checkpoint with this model (bundled name or package.module:callable) "
    "instead of the one the file records; needed for a file recording a factory, unless "
    "--trust-code."
)
ModelOverrideOpt = Annotated[
    str | None, typer.Option("--model", "--factory", help=_MODEL_OVERRIDE_HELP)
]
FactoryOverrideOpt = Annotated[str | None, typer.Option("--factory", help=_MODEL_OVERRIDE_HELP)]
SeedOpt = Annotated[
    int,
    typer.Option(min=0, max=MAX_SEED, help="Seed for probe inputs and randomised BN statistics."),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Whatever a command raises becomes one ``error:`` line on stderr and a non-zero exit.

    A :class:`ReparamError` prints its message (exit 1). An environment failure the user can
    fix (a closed output pipe, a full disk or TMPDIR, ``> /dev/full``, a denied permission:
    :func:`reparam._io.describe_os_error`) is named as such. Anything else is a bug:
    ``error: internal error: <Type: first line>`` (exit 1), with the traceback only under
    ``--verbose``. Under ``--json`` the same message is also printed on stdout as
    ``{"error": "..."}``, so a script reading stdout always gets one JSON object. Warnings
    raised meanwhile (torch's, onnx's) are held back: shown after success as
    ``warning: <line>`` (each once), dropped on failure unless ``--verbose``, so a failing
    user sees one line. ``typer.Exit``, ``KeyboardInterrupt`` and ``SystemExit`` pass through.
    """
    from reparam._io import describe_os_error

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield
        except ReparamError as error:
            _fail(" ".join(str(error).split()), caught)
        except RecursionError:
            _fail("input is nested too deeply to process", caught)
        except MemoryError:
            _fail("out of memory (try smaller input shapes or batch sizes)", caught)
        except OSError as error:
            message = describe_os_error(error)
            if message is None:
                _internal(error, caught)
            if error.errno == errno.EPIPE:
                stdout_gone_quietly()
            _fail(message, caught)
        except Exception as error:  # a bug or environment failure: still one line, exit 1
            _internal(error, caught)
    if not settings.quiet:  # success: the held-back warnings, one line each, once
        for message in dict.fromkeys(str(item.message) for item in caught):
            typer.echo(f"warning: {printable(' '.join(message.split()), 500)}", err=True)


def _internal(error: BaseException, caught: list[warnings.WarningMessage]) -> None:
    if settings.verbose:
        traceback.print_exc()
    _fail(f"internal error: {summarize(error)}", caught)


# Each user-supplied value in a message is cut where it is put in (reparam.errors.printable);
# the whole line is only escaped, with a generous bound as a last guard.
_MESSAGE_LIMIT = 2000


def _fail(message: str, caught: list[warnings.WarningMessage]) -> None:
    if settings.verbose:
        for item in caught:
            typer.echo(f"warning: {printable(item.message, 500)}", err=True)
    line = printable(message, _MESSAGE_LIMIT)
    if settings.as_json:
        with contextlib.suppress(OSError):  # stdout may be what failed
            typer.echo(json.dumps({"error": line}))
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code=1)


def initial_weights_note(command: str) -> str:
    """The note a command prints when it runs a model without ``-w``: its output then says
    nothing about the user's trained model (a differing check is expected noise)."""
    return (
        f"no --weights: {command} used the model's initial weights (BN statistics "
        "randomised), not trained ones; pass -w CHECKPOINT for your trained model"
    )


def check_seed(seed: int) -> int:
    """``seed`` if torch and numpy accept it (0..2**63-1); one clear error otherwise."""
    if not 0 <= seed <= MAX_SEED:
        raise UserInputError(f"--seed {seed} is outside 0..{MAX_SEED}")
    return seed


def parse_kwargs(pairs: Sequence[str] | None) -> dict:
    """``["depth=3", "name=x"]`` → ``{"depth": 3, "name": "x"}``; values are JSON or strings."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserInputError(f"--kwarg '{printable(pair, 80)}' must look like KEY=VALUE")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
        except RecursionError:
            raise UserInputError(f"--kwarg {key}: the JSON value is nested too deeply") from None
    return kwargs


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` → ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UserInputError(
            f"input shape '{printable(text)}' must be integers like 1,3,224,224"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise UserInputError(f"input shape '{printable(text)}' must have positive sizes")
    return shape


def model_arg_kind(name: str) -> str:
    """``"bundled"``, ``"file"`` or ``"factory"``: how MODEL is read (see :data:`MODEL_RULE`).

    Decided from the text alone, never from what exists on disk, so a file in the current
    directory cannot stand in for a bundled model.
    """
    from reparam.models import list_models  # the registry imports torch

    if name in list_models():
        return "bundled"
    separators = {os.sep, os.altsep or os.sep, "/"}
    if any(sep in name for sep in separators) or name.lower().endswith(MODEL_FILE_SUFFIXES):
        return "file"
    return "factory" if ":" in name else "bundled"


@dataclass
class LoadedModel:
    """A model as named on the command line, with what the commands need to report on it."""

    model: nn.Module
    spec: ModelSpec
    input_shapes: list[tuple[int, ...]]
    description: str
    fused: bool = False
    path: Path | None = None
    """The fused checkpoint read, if the model came from one (an input of the command)."""
    notes: list[str] = field(default_factory=list)
    """Sentences worth printing: which checkpoint entry was used, a replaced factory."""
    initial_weights: bool = False
    """Built without ``--weights`` (not from a fused file): say so, see
    :func:`initial_weights_note`."""

    def probe_inputs(self, seed: int) -> list[torch.Tensor]:
        """Random normal inputs of the model's dtype and device, one per input shape."""
        import torch

        from reparam.checkpoint import probe_inputs

        reference = next(self.model.parameters(), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = reference.device if reference is not None else "cpu"
        return probe_inputs(self.input_shapes, check_seed(seed), dtype, device)


def _load_expanded_or_none(
    path: Path, model_override: str | None, trust_code: bool, shapes: list[tuple[int, ...]]
) -> LoadedModel | None:
    """The training-time model of a ``reparam expand`` checkpoint, or None for other files.

    ``reparam fuse train.pt`` after ``reparam expand … -o train.pt`` (and a fine-tune that
    saved it back with :func:`reparam.expansion_checkpoint.save_expanded`) fuses it like any
    model: the file records the model and how it was expanded, never code to run.
    """
    from reparam.checkpoint import ModelSpec
    from reparam.errors import NotAnExpandedCheckpointError
    from reparam.expansion_checkpoint import load_expanded

    try:
        model = load_expanded(path, model=model_override, trust_code=trust_code).eval()
    except NotAnExpandedCheckpointError:
        return None
    meta = model.reparam_expand
    spec = ModelSpec(model_override or meta["model"], dict(meta["kwargs"]))
    recorded = [tuple(shape) for shape in meta.get("input_shapes") or []]
    return LoadedModel(
        model,
        spec,
        shapes or recorded or _default_shapes(spec, model),  # -s, else the ones expand probed
        f"{printable(spec.name)} expanded into {printable(meta['family'])} "
        f"(checkpoint {printable(path)})",
        path=path,
    )


def load_model(
    name: str,
    *,
    weights: Path | None = None,
    kwargs: Sequence[str] | None = None,
    input_shapes: Sequence[str] | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    weights_key: str | None = None,
    model_override: str | None = None,
    trust_code: bool = False,
) -> LoadedModel:
    """Build the model a command names, load its weights, and settle its input shapes.

    ``model_override`` and ``trust_code`` apply to a fused checkpoint (see
    :func:`reparam.checkpoint.load`); ``weights_key`` to ``weights``
    (see :func:`reparam.checkpoint.read_weights`).
    """
    import torch

    from reparam.checkpoint import ModelSpec, load, read_weights
    from reparam.models.weights import DEPLOY, load_weights
    from reparam.testing import randomize_batchnorm

    check_seed(seed)
    shapes = [parse_shape(text) for text in input_shapes or []]
    if shapes:
        check_allocation(shapes, 4, "probe input", copies=2)
    kind = model_arg_kind(name)
    if kind == "file":
        path = Path(name)
        if weights is not None:
            raise UserInputError("a fused checkpoint carries its weights: drop --weights")
        if kwargs:
            raise UserInputError("a fused checkpoint records its factory arguments: drop --kwarg")
        if weights_key is not None:
            raise UserInputError("--weights-key applies to --weights: drop it")
        try:
            model = load(path, model=model_override, trust_code=trust_code)
        except NotAFusedCheckpointError:
            expanded = _load_expanded_or_none(path, model_override, trust_code, shapes)
            if expanded is None:
                raise UserInputError(
                    f"'{printable(path)}' is not a fused checkpoint; name the model and pass "
                    "this file with --weights"
                ) from None
            return expanded
        notes = [model.reparam_note] if model.reparam_note else []
        return LoadedModel(
            model,
            model.reparam_spec,
            shapes
            or list(model.reparam_input_shapes)
            or _default_shapes(model.reparam_spec, model),
            f"{printable(model.reparam_spec.name)} (fused checkpoint {printable(path)})",
            fused=True,
            path=path,
            notes=notes,
        )
    if model_override is not None:
        raise UserInputError("--model applies to a fused checkpoint; give the model as MODEL")
    if weights_key is not None and weights is None:
        raise UserInputError("--weights-key needs --weights")

    spec = ModelSpec(name, parse_kwargs(kwargs))
    # Seeded so that a model without --weights gets the same initial weights in every
    # command: `reparam export` now and `reparam verify` later agree.
    torch.manual_seed(seed)
    model = _build(spec)
    notes = []
    deploy_form = False
    if weights is not None:
        read = read_weights(weights, trust_pickle=trust_pickle, key=weights_key)
        # The checkpoint may be the training form or a deploy (fused) form: its keys tell.
        used = read.describe()
        try:
            model, form = load_weights(model, read.state_dict, f"'{printable(weights)}' ({used})")
        except UserInputError as error:
            if not read.others:
                raise
            others = ", ".join(printable(key) for key in read.others)
            raise UserInputError(
                f"{error}; the file also holds weights under {others}: choose with --weights-key"
            ) from None
        deploy_form = form == DEPLOY
        description = f"{printable(name)} with weights {printable(weights)} ({read.entry})"
        notes.append(f"weights: {used} of {printable(weights)}, {form} form")
    else:
        randomize_batchnorm(model, seed)
        description = f"{printable(name)} (initial weights, randomised BN statistics)"
    if not shapes:
        shapes = _default_shapes(spec, model)
    return LoadedModel(
        model.eval(),
        spec,
        shapes,
        description,
        fused=deploy_form,
        notes=notes,
        initial_weights=weights is None,
    )


def _build(spec: ModelSpec) -> nn.Module:
    from reparam.checkpoint import build_model

    try:
        return build_model(spec)
    except UserInputError as error:
        if ":" not in spec.name and spec.name.endswith(".py"):
            raise UserInputError(_python_file_hint(Path(spec.name))) from None
        # A bare name that is not bundled but is a file: say how to read it as one.
        if ":" not in spec.name and Path(spec.name).is_file():
            raise UserInputError(
                f"{error} (to read the file '{printable(spec.name)}', write "
                f"./{printable(spec.name)})"
            ) from None
        raise


def _python_file_hint(path: Path) -> str:
    """What to write instead of ``mynet.py``: ``mynet:FACTORY``, naming the candidates.

    The file is parsed, never run: its top-level functions and classes are the candidates.
    """
    import ast

    module = path.with_suffix("").as_posix().replace("/", ".").lstrip(".")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return (
            f"'{printable(path)}' is a Python file: name a factory in it as "
            f"{printable(module)}:FACTORY"
        )
    names = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")
    ]
    found = f" (callables defined there: {printable(', '.join(names))})" if names else ""
    example = printable(f"{module}:{names[0] if names else 'FACTORY'}")
    return f"'{printable(path)}' is a Python file: name a factory in it, e.g. {example}{found}"


def _default_shapes(spec: ModelSpec, model: nn.Module) -> list[tuple[int, ...]]:
    from reparam.models import get_model_info

    if not spec.is_factory:
        return list(get_model_info(spec.name).input_shapes)
    shapes = getattr(model, "example_input_shapes", None)
    if shapes:
        return [tuple(shape) for shape in shapes]
    raise UserInputError(
        f"give --input-shape for factory '{printable(spec.name)}' (e.g. -s 1,3,224,224)"
    )
