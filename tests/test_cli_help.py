"""Help text as a user reads it: every command documents itself, defaults visible, no typer
type placeholders (``<str>``, ``<bool>``, ``<list[str]>``), shell completion offered."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from reparam.cli.app import COMMANDS, app

runner = CliRunner()


@pytest.mark.parametrize("command", sorted(COMMANDS))
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
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", result.output, re.MULTILINE), command
    assert "--install-completion" in result.output
