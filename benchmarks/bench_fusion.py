"""The full fusion benchmark behind BENCHMARKS.md (batch 8, 224², CPU).

    python benchmarks/bench_fusion.py [OUTPUT.md] [--threads N] [--repeats N] [--quick]

Blocks at 8×64×56², the ImageNet-size bundled models at batch 8 and 224², onnxruntime on
every fused model. Prints the markdown report and writes it to OUTPUT.md when given. Takes
several minutes on 2 cores; ``reparam bench`` runs the same code with more options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reparam._io import atomic_write
from reparam.bench import run_benchmark
from reparam.errors import ReparamError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, help="markdown file to write")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    args = parser.parse_args(argv)
    try:
        report = run_benchmark(
            quick=args.quick,
            batch=None if args.quick else 8,
            threads=args.threads,
            repeats=args.repeats,
            progress=lambda line: print(f"... {line}", file=sys.stderr, flush=True),
        )
        print(report)
        if args.output is not None:
            atomic_write(args.output, lambda tmp: tmp.write_text(report, encoding="utf-8"))
            print(f"wrote {args.output}")
    except ReparamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
