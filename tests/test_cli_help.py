"""Help text as a user reads it: every command documents itself, defaults visible, no typer
type placeholders (``<str>``, ``<bool>``, ``<list[str]>``), shell completion offered."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reparam.cli.app import COMMANDS, _available, app

runner = CliRunner()
AVAILABLE = sorted(name for name in COMMANDS if _available(name))


@pytest.mark.parametrize("command", AVAILABLE)
def test_command_help_is_plain_and_shows_defaults(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert f"Usage: reparam {command}" in result.output
    assert not re.search(r"<(str|bool|int|float|path|list\[[a-z]+\])>", result.output), (
        result.output
    )
    assert "[default: " in result.output or command == "quantize"
    assert max(len(line) for line in result.output.splitlines()) <= 100


def test_root_help_lists_every_command_and_completion() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    for command in AVAILABLE:
        assert re.search(rf"^\s+{command}\s", result.output, re.MULTILINE), command
    assert "--install-completion" in result.output


@pytest.mark.parametrize("command", AVAILABLE)
def test_command_help_imports_no_torch(command: str) -> None:
    """What makes ``reparam CMD --help`` fast (<= 0.5 s): neither torch nor the model
    registry is imported for it (the bundled names in the help come from a static list)."""
    code = (
        "import sys\n"
        "from reparam.cli.app import main\n"
        f"sys.argv = ['reparam', {command!r}, '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Usage: reparam {command}" in done.stdout


def test_the_static_list_of_bundled_names_is_the_registry() -> None:
    from reparam.cli._model_names import BUNDLED_MODELS
    from reparam.models import list_models

    assert list(BUNDLED_MODELS) == list_models()
