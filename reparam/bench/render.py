"""A benchmark report as markdown (for files), as rich tables (for the terminal), as JSON.

Ratios against a target read ``met (1.02×)``, ``missed (1.12×)`` or ``noisy (1.09×)``;
see :func:`reparam.bench.targets.verdict` for when a miss is only noise.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.markup import escape

from reparam._table import fits, print_table
from reparam.bench.suite import BenchReport
from reparam.bench.targets import (
    BLOCK_TARGET,
    MODEL_LIMIT_TARGET,
    MODEL_SPEEDUP_TARGET,
    ORT_TARGET,
    SPEEDUP_TARGETS,
    verdict,
)
from reparam.bench.timing import Timing

__all__ = ["print_tables", "render_json", "render_markdown"]

MEMORY_NOTE = (
    "Peak memory is the rise of the process's resident set during one forward pass "
    "(activations plus library workspaces; approximate): for torch a steady-state pass, "
    "for onnxruntime its first run (its arena keeps what it grows). Spread is the largest "
    "interquartile range / median over a row's candidates; a ratio that misses its target "
    "by less than the spread of its two timings is marked noisy. Times on a machine shared "
    "with other work are noisy: trust ratios more than absolute times."
)


def _ms(timing: Timing | None) -> str:
    return "—" if timing is None else f"{timing.median * 1e3:.2f}"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f}"


def _target(
    ratio: float | None,
    limit: float,
    timings: Iterable[Timing | None],
    *,
    at_least: bool = False,
    markdown: bool = True,
) -> str:
    """``met (1.02×)``, ``**missed** (1.12×)`` or ``noisy (1.09×)`` for a ratio and its limit."""
    if ratio is None:
        return "—"
    result = verdict(ratio, limit, [t for t in timings if t is not None], at_least=at_least)
    label = f"**{result}**" if result == "missed" and markdown else result
    return f"{label} ({ratio:.2f}×)"


def _block_rows(report: BenchReport, markdown: bool) -> list[tuple[str, ...]]:
    return [
        (
            r.name,
            r.description,
            _ms(r.train),
            _ms(r.fused),
            _ms(r.plain),
            f"{r.speedup:.2f}×",
            _target(r.fused_vs_plain, BLOCK_TARGET, (r.fused, r.plain), markdown=markdown),
            f"{r.params_train:,} → {r.params_fused:,}",
            f"{r.max_rel:.1e}",
            f"{r.spread:.0%}",
        )
        for r in report.blocks
    ]


BLOCK_HEADERS = (
    "block",
    "branches",
    "train ms",
    "fused ms",
    "plain conv ms",
    "speedup",
    f"fused / plain ≤ {BLOCK_TARGET}",
    "params",
    "max rel err",
    "spread",
)
MODEL_HEADERS = (
    "model",
    "input",
    "train ms",
    "fused ms",
    "baseline ms",
    "ORT ms",
    "ORT unfused ms",
    "speedup (train / fused)",
    f"fused / baseline ≤ {MODEL_LIMIT_TARGET}",
    "ORT / torch ≤ 1",
    "fused ORT vs ORT-optimised unfused",
    "params M",
    "MMACs / image",
    "peak MiB train / fused / ORT",
    "max rel err fused / ORT",
    "spread",
)


def _model_rows(report: BenchReport, markdown: bool) -> list[tuple[str, ...]]:
    rows = []
    for r in report.models:
        speed_target = SPEEDUP_TARGETS.get(r.name)
        limit = MODEL_LIMIT_TARGET
        speedup = (
            _target(r.speedup, speed_target, (r.train, r.fused), at_least=True, markdown=markdown)
            if speed_target
            else f"{r.speedup:.2f}×"
        )
        rows.append(
            (
                r.name,
                "×".join(map(str, r.shapes[0])),
                _ms(r.train),
                _ms(r.fused),
                f"{_ms(r.baseline)} ({r.baseline_name})" if r.baseline else "—",
                _ms(r.ort),
                _ms(r.ort_unfused),
                speedup,
                _target(r.fused_vs_baseline, limit, (r.fused, r.baseline), markdown=markdown),
                _target(r.ort_vs_torch, ORT_TARGET, (r.ort, r.fused), markdown=markdown),
                "—" if r.ort_speedup is None else f"{r.ort_speedup:.2f}×",
                f"{_millions(r.params_train)} → {_millions(r.params_fused)}",
                f"{_millions(r.macs_train)} → {_millions(r.macs_fused)}",
                f"{_mib(r.memory_train)} / {_mib(r.memory_fused)} / {_mib(r.memory_ort)}",
                f"{r.max_rel:.1e}"
                + (f" / {r.ort_max_rel:.1e}" if r.ort_max_rel is not None else ""),
                f"{r.spread:.0%}",
            )
        )
    return rows


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _header_lines(report: BenchReport) -> list[str]:
    machine, settings = report.machine, report.settings
    load = (
        f"; load average {', '.join(f'{v:.2f}' for v in machine.load_average)}"
        if machine.load_average
        else ""
    )
    rounds = f"{settings.repeats} timed rounds" + (
        f" ({settings.block_repeats} for blocks)"
        if report.blocks and settings.block_repeats != settings.repeats
        else ""
    )
    return [
        f"- CPU: {machine.cpu}; {machine.cores} usable cores; {machine.system}{load}",
        f"- torch {machine.torch_version} ({machine.torch_threads} intra-op threads), "
        f"onnxruntime {machine.ort_version} (same thread count, spinning off), "
        f"Python {machine.python}",
        f"- {rounds} after {settings.warmup} warm-up rounds; candidates interleaved in "
        "rotating order; times are medians in ms per batch; ratios are of medians from the "
        "same run.",
    ]


def render_markdown(report: BenchReport) -> str:
    """The benchmark report: machine, method, a block table and a model table, in markdown."""
    settings = report.settings
    lines = [
        "# reparam benchmarks"
        + (" (quick run: tiny shapes, few repeats)" if settings.quick else ""),
        "",
        *_header_lines(report),
        "",
    ]
    if report.blocks:
        shape = "×".join(map(str, report.blocks[0].shape))
        lines += [
            f"## Blocks (input {shape}, eval mode, stride 1)",
            "",
            f"Target: the fused block within {BLOCK_TARGET}× of a plain conv of the same shape "
            "(followed by the same activation), the physical limit of fusion.",
            "",
            _markdown_table(BLOCK_HEADERS, _block_rows(report, markdown=True)),
            "",
        ]
    if report.models:
        lines += [
            f"## Models (batch {settings.batch})",
            "",
            f"Targets: fused within {MODEL_LIMIT_TARGET}× of the plain network it fuses down to "
            f"(BN folded); fused ACNet ResNet-18 ≥ {MODEL_SPEEDUP_TARGET}× faster than its "
            "training-time form; onnxruntime no slower than torch eager on the fused model. "
            "'ORT unfused' is the training-time model exported as it is and run by "
            "onnxruntime with every graph optimisation (it folds Conv+BN, not branches): "
            "what a user without reparam would deploy. MMACs per image count convolutions "
            "and matrix products (torch's FLOP counter, FLOPs / 2).",
            "",
            _markdown_table(MODEL_HEADERS, _model_rows(report, markdown=True)),
            "",
        ]
        notes = [f"- {r.name}: {note}" for r in report.models for note in r.notes]
        if notes:
            lines += ["Notes:", "", *notes, ""]
    lines += [MEMORY_NOTE, ""]
    return "\n".join(lines)


# The terminal shows the columns that carry the comparison, under short headers; the
# markdown file has them all. Index into BLOCK_HEADERS / MODEL_HEADERS → terminal header.
_BLOCK_TERMINAL = {
    0: "block",
    2: "train ms",
    3: "fused ms",
    4: "plain ms",
    5: "speedup",
    6: f"fused/plain ≤{BLOCK_TARGET}",
    8: "rel err",
    9: "spread",
}
_MODEL_TERMINAL = {
    0: "model",
    2: "train ms",
    3: "fused ms",
    5: "ORT ms",
    6: "ORT unfused ms",
    7: "train/fused",
    8: f"fused/baseline ≤{MODEL_LIMIT_TARGET}",
    9: "ORT/torch ≤1",
    10: "ORT unfused/fused",
    12: "MMACs/image",
    15: "spread",
}


def _style(cell: str) -> str:
    """Colour a verdict; escape anything else that rich would read as markup."""
    for word, colour in (("missed", "red"), ("noisy", "yellow"), ("met", "green")):
        if cell.startswith(word):
            return f"[{colour}]{word}[/{colour}]{escape(cell[len(word) :])}"
    return escape(cell)


def _print_section(
    console: Console,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    columns: dict[int, str],
) -> None:
    """Through the one table renderer: the terminal's columns of a section as a table where
    they fit the console, else one key/value table per row with every field (full names)."""
    shown = [[row[index] for index in columns] for row in rows]
    if fits(console, list(columns.values()), shown):
        print_table(console, list(columns.values()), shown, title=title, cell=_style)
    else:
        print_table(console, headers, rows, title=title, cell=_style)


def print_tables(report: BenchReport, console: Console) -> None:
    """Print the report as rich tables that fit ``console``'s width."""
    for line in _header_lines(report):
        console.print(line, highlight=False, markup=False)
    if report.blocks:
        shape = "×".join(map(str, report.blocks[0].shape))
        rows = _block_rows(report, markdown=False)
        _print_section(console, f"Blocks ({shape})", BLOCK_HEADERS, rows, _BLOCK_TERMINAL)
    if report.models:
        rows = _model_rows(report, markdown=False)
        title = f"Models (batch {report.settings.batch})"
        _print_section(console, title, MODEL_HEADERS, rows, _MODEL_TERMINAL)
        for r in report.models:
            for note in r.notes:
                console.print(f"{r.name}: {note}", highlight=False, markup=False)


def _jsonable(value: object) -> object:
    if isinstance(value, Timing):
        return {"median": value.median, "spread": value.spread, "samples": list(value.samples)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in ("speedup", "fused_vs_plain", "fused_vs_baseline", "ort_vs_torch"):
            if hasattr(type(value), name):
                data[name] = getattr(value, name)
        if hasattr(type(value), "ort_speedup"):
            data["ort_speedup_vs_unfused"] = value.ort_speedup
        return data
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def render_json(report: BenchReport) -> str:
    """The report's dataclasses as JSON: seconds, samples, spreads and the derived ratios."""
    return json.dumps(_jsonable(report), indent=2, ensure_ascii=False)
