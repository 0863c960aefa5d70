"""Thread control for loops of many small torch ops.

Each parallel torch op ends at a thread barrier; when another process holds one of the
cores, that barrier waits for a scheduler time slice. A loop of hundreds of memory-bound
ops (Involution's shift-and-accumulate, DRConv's per-region path) therefore slows down
several times on a busy machine, while a second thread gains it little on a quiet one.

``torch.set_num_threads`` is process-wide: code running torch in other Python threads at
the same moment also runs single-threaded inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_intra_op_thread"]


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the enclosed torch ops with one intra-op thread, restoring the count afterwards.

    For loops of many memory-bound ops: each parallel op ends at a thread barrier, and when
    another process holds one of the cores that barrier waits for a scheduler time slice,
    so a loop of hundreds of such ops slows down several times on a busy machine while its
    second thread gains little on a quiet one.
    """
    threads = torch.get_num_threads()
    if threads == 1 or torch.compiler.is_compiling():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
