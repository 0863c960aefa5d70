"""Terminal tables fit the terminal: a too-wide table becomes one key/value block per row."""

from __future__ import annotations

from reparam._table import format_table


def test_a_table_that_fits_keeps_its_columns() -> None:
    text = format_table(["stage", "accuracy"], [["fused", "98.9%"]], width=80)
    assert text.splitlines() == ["stage  accuracy", "-----  --------", "fused     98.9%"]


def test_a_table_wider_than_the_terminal_becomes_key_value_blocks() -> None:
    check = "verify ok (max rel 2.9e-07, batches [1, 4, 32]); 33 nodes, custom com.reparam::Corr"
    rows = [["fused (torch)", "98.9%", check], ["INT8", "98.6%", "cosine 0.99"]]
    text = format_table(["stage", "accuracy", "check"], rows, width=60)
    assert "stage: fused (torch)" in text and "stage: INT8" in text
    assert f"  check     {check}" in text
    assert all(len(line) <= 60 for line in text.splitlines() if check not in line)
