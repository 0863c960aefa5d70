"""The ``reparam`` typer application: global options, lazily loaded commands, signal handling.

Each command lives in its own module, imported only when that command runs (or its help is
shown), so ``reparam --version`` and ``reparam --help`` do not import torch. The table below
is the one list of commands; its short help is what ``reparam --help`` shows.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.models import CommandInfo

from reparam._io import describe_os_error

try:  # typer >= 0.2x carries its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_errors
from reparam._version import __version__
from reparam.errors import printable


@dataclass
class Settings:
    """Global options of the root command (``-v/--verbose``, ``-q/--quiet``), for every command.

    Commands read them as ``reparam.cli._common.settings``.
    """

    verbose: bool = False
    quiet: bool = False
    as_json: bool = False
    """The running command was given ``--json``: failures also print ``{"error": ...}``."""

    def ort_log_severity(self) -> int:
        """onnxruntime's log level: everything with --verbose, otherwise errors only (3)."""
        return 0 if self.verbose else 3


settings = Settings()

# name: (module, function to register or None if importing the module registers it,
#        short help). A module that is not installed (yet) hides its command.
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "fuse": (
        "reparam.cli.fuse_cmd",
        "fuse",
        "Fuse every block and Conv→BN pair of MODEL into plain convs and write the weights.",
    ),
    "export": (
        "reparam.cli.export_cmd",
        "export",
        "Fuse MODEL, export it to ONNX and verify the file under onnxruntime.",
    ),
    "verify": (
        "reparam.cli.verify_cmd",
        "verify",
        "Compare ONNX_FILE with the PyTorch model under onnxruntime; exit 1 on a mismatch.",
    ),
    "run": (
        "reparam.cli.run_cmd",
        "run",
        "Run ONNX_FILE under onnxruntime and print output shapes, statistics and timing.",
    ),
    "quantize": (
        "reparam.cli.quantize_cmd",
        "quantize",
        "Quantize an ONNX model to INT8 with onnxruntime and report its accuracy.",
    ),
    "expand": (
        "reparam.cli.expand_cmd",
        "expand",
        "Expand MODEL's plain convs into a family's training-time blocks, exact at step 0.",
    ),
    "bench": (
        "reparam.cli.bench_cmd",
        "bench",
        "Time blocks and bundled models: training form vs fused vs plain conv, torch vs ORT.",
    ),
    "demo": (
        "reparam.cli.demo_cmd",
        "demo",
        "Train a digit classifier built from training-time blocks, fuse, export, verify.",
    ),
}


def _available(name: str) -> bool:
    """Whether the module of command ``name`` exists (found without importing it)."""
    try:
        return importlib.util.find_spec(COMMANDS[name][0]) is not None
    except (ImportError, ValueError):
        return False


def _registered(name: str) -> CommandInfo | None:
    for info in app.registered_commands:
        if (info.name or getattr(info.callback, "__name__", None)) == name:
            return info
    return None


def _real_command(name: str) -> Any:
    """Import the module of command ``name`` and build its click command."""
    module_name, attribute, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    info = _registered(name)
    if info is None and attribute is not None:
        app.command(name)(getattr(module, attribute))
        info = _registered(name)
    if info is None:
        raise RuntimeError(f"{module_name} does not define the command '{name}'")
    command = typer.main.get_command_from_info(
        info,
        pretty_exceptions_short=app.pretty_exceptions_short,
        rich_markup_mode=app.rich_markup_mode,
    )
    _plain_metavars(command)
    _watch_json(command)
    return command


def _watch_json(command: Any) -> None:
    """Make ``command`` set :attr:`Settings.as_json` from its own ``--json`` when it runs.

    Every command that has ``--json`` then fails with an ``{"error": ...}`` object on stdout
    (printed by ``reparam.cli._common.user_errors``), without each command doing it.
    """
    if getattr(command, "_reparam_watches_json", False):
        return
    flags = [param.name for param in command.params if "--json" in getattr(param, "opts", ())]
    invoke = command.invoke

    def invoke_noting_json(ctx: Any) -> Any:
        settings.as_json = any(bool(ctx.params.get(name)) for name in flags)
        return invoke(ctx)

    command.invoke = invoke_noting_json
    command._reparam_watches_json = True


# Help placeholders: click's plain words (FILE, SHAPE, INTEGER) instead of typer's `<str>`,
# `<list[str]>` and `<bool>` type labels; flags get none.
_METAVAR_BY_NAME = {
    "kwarg": "KEY=VALUE",
    "input_shape": "SHAPE",
    "size": "SIZE",
    "weights": "FILE",
    "output": "FILE",
    "report": "FILE",
    "input": "FILE",
}


def _plain_metavars(command: Any) -> None:
    for param in command.params:
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name says it: MODEL, ONNX_FILE
        else:
            words = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH"}
            bare = param.bare_type()
            param.metavar = _METAVAR_BY_NAME.get(param.name, words.get(bare, bare.upper()))


class _LazyCommand(typer.core.TyperCommand):
    """A stand-in listing command ``name`` with its short help; the real one loads on use."""

    def __init__(self, name: str) -> None:
        super().__init__(name, short_help=COMMANDS[name][2], help=COMMANDS[name][2])
        self._real: Any = None

    def real(self) -> Any:
        if self._real is None:
            self._real = _real_command(self.name)
        return self._real

    # Everything that parses, runs or describes the command goes to the real one.
    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        return self.real().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        return self.real().invoke(ctx)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        return self.real().main(*args, **kwargs)

    def get_params(self, ctx: Any) -> Any:
        return self.real().get_params(ctx)

    def get_help(self, ctx: Any) -> str:
        return self.real().get_help(ctx)

    def shell_complete(self, ctx: Any, incomplete: str) -> Any:
        return self.real().shell_complete(ctx, incomplete)

    def to_info_dict(self, ctx: Any) -> Any:
        return self.real().to_info_dict(ctx)


class LazyGroup(TyperGroup):
    """The root group: commands already registered, plus stand-ins for :data:`COMMANDS`."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = list(super().list_commands(ctx))
        return names + [name for name in COMMANDS if name not in names and _available(name)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None and not isinstance(command, _LazyCommand):
            _plain_metavars(command)  # registered earlier in this process: built anew here
            _watch_json(command)
        if command is None and cmd_name in COMMANDS and _available(cmd_name):
            command = _LazyCommand(cmd_name)
            self.add_command(command, cmd_name)
        return command

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """As click's, with the closest command names suggested for a typo."""
        try:
            return super().resolve_command(ctx, args)
        except click_errors.UsageError as error:
            if args and not args[0].startswith("-"):
                names = self.list_commands(ctx)
                close = difflib.get_close_matches(args[0][:100], names, n=2, cutoff=0.6)
                if close:
                    error.message += f" Did you mean {' or '.join(close)}?"
            raise

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run as click does, but show usage errors with reparam's hints (see
        :func:`_usage_error`) and report a closed output pipe in one line."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.ClickException as error:
            _usage_error(error, argv)
            sys.exit(error.exit_code)
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        except OSError as error:
            message = describe_os_error(error)
            if message is None:
                raise
            stdout_gone_quietly()
            sys.stderr.write(f"error: {message}\n")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# The root command's options: given after a command, they are "no such option" there.
GLOBAL_OPTIONS = ("-q", "--quiet", "-v", "--verbose", "--version")


def _usage_error(error: click_errors.ClickException, argv: list[str]) -> None:
    """Show ``error`` as one ``error:`` line, like every other failure, naming the help to
    read; with the hint that global options go before the command, and an
    ``{"error": ...}`` object on stdout when ``--json`` was given."""
    # Escaped and cut: the message echoes what the user typed (an option, a value).
    message = printable(" ".join(error.format_message().split()), 500)
    if isinstance(error, click_errors.NoSuchOption) and error.option_name in GLOBAL_OPTIONS:
        command = next((arg for arg in argv if arg in COMMANDS), "COMMAND")
        message += (
            f" ({error.option_name} is a global option: global options go before the "
            f"command, as in: reparam {error.option_name} {command} ...)"
        )
    context = getattr(error, "ctx", None)
    if isinstance(error, click_errors.UsageError) and context is not None:
        message += f" (see: {context.command_path} --help)"
    options = argv[: argv.index("--")] if "--" in argv else argv
    if "--json" in options:
        with contextlib.suppress(OSError):
            typer.echo(json.dumps({"error": message}))
    typer.echo(f"error: {message}", err=True)


def stdout_gone_quietly() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush of a closed pipe does
    not print a second, raw error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


app = typer.Typer(
    name="reparam",
    help="Fuse, export and verify CNNs trained with multi-branch and dynamic blocks.",
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"reparam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show version."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show warnings, runtime logs and, for internal errors, the traceback.",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only errors and what was written.")
    ] = False,
) -> None:
    """Fuse, export and verify CNNs trained with multi-branch and dynamic blocks."""
    settings.verbose = verbose
    settings.quiet = quiet and not verbose


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP, so cleanup (``finally``) runs.

    A ``BaseException`` like ``KeyboardInterrupt``: no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main() -> None:
    """Console-script entry point: run the app; a termination signal exits 128 + signum.

    Python's default for SIGTERM kills the process at once, skipping the cleanup that removes
    a half-written temporary output; raising instead unwinds through it.
    """
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, _raise_terminated)
    try:
        app()
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        sys.stderr.write(f"error: interrupted by {name}; nothing was written\n")
        sys.exit(128 + stop.signum)
