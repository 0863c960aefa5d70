"""Terminal tables fit the terminal: a too-wide table becomes one key/value block per row."""

from __future__ import annotations

import io

from rich.console import Console

from reparam._table import format_table, print_table


def test_a_table_that_fits_keeps_its_columns() -> None:
    text = format_table(["stage", "accuracy"], [["fused", "98.9%"]], width=80)
    assert text.splitlines() == ["stage  accuracy", "------ --------", "fused     98.9%"]


def test_cells_are_text_never_rich_markup() -> None:
    text = format_table(["name", "n"], [["[red]x[/red]", 3]], width=80)
    assert "[red]x[/red]" in text


def test_a_table_wider_than_the_terminal_becomes_key_value_blocks() -> None:
    check = "verify ok (max rel 2.9e-07, batches [1, 4, 32]); 33 nodes, custom com.reparam::Corr"
    rows = [["fused (torch)", "98.9%", check], ["INT8", "98.6%", "cosine 0.99"]]
    text = format_table(["stage", "accuracy", "check"], rows, width=60)
    assert "stage: fused (torch)" in text and "stage: INT8" in text
    assert f"  check     {check}" in text
    assert all(len(line) <= 60 for line in text.splitlines() if check not in line)


def test_print_table_falls_back_to_one_table_per_row_on_a_narrow_console() -> None:
    rows = [["repvgg_a0", "1.23", "met (0.8)"], ["resnet18", "2.50", "missed (1.4)"]]
    headers = ["model", "fused ms", "fused/baseline ≤1"]
    wide = Console(file=io.StringIO(), width=100, color_system=None)
    print_table(wide, headers, rows, title="Models")
    assert "model" in wide.file.getvalue().splitlines()[1]  # one table: the header row
    narrow = Console(file=io.StringIO(), width=24, color_system=None)
    print_table(narrow, headers, rows, title="Models")
    text = narrow.file.getvalue()
    assert "Models: model: repvgg_a0" in text and "Models: model: resnet18" in text
    assert all(len(line) <= 24 for line in text.splitlines())
