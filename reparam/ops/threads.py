"""How the dynamic operators use CPU threads: chunks pulled by workers, ops single-threaded.

Involution's shift-and-accumulate and DRConv's per-region path are loops of hundreds of
memory-bound or medium-sized ops. Run with torch's intra-op parallelism, every one of those
ops ends at an OpenMP barrier; when another process holds one of the cores, the barrier
waits for a scheduler time slice, so the loop slows down several times on a busy machine,
and on a quiet one a second thread gains such small ops little anyway.

:func:`parallel_for` splits the work the other way round: the caller cuts it into
independent chunks (samples, or groups of rows), and up to ``torch.get_num_threads()``
threads, the caller's included, each *pull* the next chunk and run its ops with one
intra-op thread. Threads meet once per call instead of once per op, and a thread that the
scheduler pauses simply takes fewer chunks: beside a busy process the work flows to the
core that is free, on a quiet machine every core is used.

Every chunk runs the same ops whichever thread takes it (one intra-op thread each), so the
result does not depend on the number of workers, bit for bit.

torch's intra-op thread count belongs to each OS thread once it has run a parallel op (a
new thread starts from the count last given to ``torch.set_num_threads``); the helpers here
change and restore the calling thread's count only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["one_intra_op_thread", "parallel_for", "sample_ranges", "worker_count"]

Chunk = TypeVar("Chunk")

# Per OS thread: the number of threads a parallel_for started here may use, while this
# thread is itself running chunks (1 inside a pooled chunk, so nested loops run inline).
_local = threading.local()
_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_key: tuple[int, int] = (0, 0)  # (pid, max_workers) it was made for


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the enclosed torch ops with one intra-op thread, restoring the count afterwards.

    Only the calling OS thread's count changes (torch keeps one per thread); a thread
    created inside the block starts with one intra-op thread.
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


def worker_count(device: torch.device | str = "cpu") -> int:
    """Threads a :func:`parallel_for` called here would use for work on ``device``.

    ``torch.get_num_threads()`` for CPU work outside any chunk; 1 for other devices (their
    ops are asynchronous), inside a chunk (nested loops run inline) and while tracing.
    """
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():
        return 1
    budget = getattr(_local, "budget", None)
    return budget if budget is not None else max(1, torch.get_num_threads())


def sample_ranges(batch: int, sample_cost: int, workers: int, min_cost: int = 1 << 16):
    """(start, stop) ranges over ``batch`` samples for :func:`parallel_for`.

    One sample per chunk, unless a sample costs less than ``min_cost`` (elements touched):
    then enough samples to reach it, so per-op overhead stays small, but never fewer chunks
    than ``workers`` while the batch allows.
    """
    if batch <= 0:
        return []
    step = max(1, -(-min_cost // max(1, sample_cost)))
    step = min(step, max(1, batch // max(1, workers)))
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


def parallel_for(
    work: Callable[[Chunk], object], chunks: Sequence[Chunk], device: torch.device | str = "cpu"
) -> None:
    """Call ``work(chunk)`` for every chunk, on up to :func:`worker_count` threads.

    Chunks must be independent (each writes its own slice of a preallocated result) and
    must not need autograd: chunks run under ``torch.no_grad()``, with the caller's
    inference mode and CPU autocast state, and one intra-op thread. Threads pull chunks in
    order from a shared counter. The first exception stops the others taking new chunks
    and is raised here once they have finished the chunk in hand.
    """
    available = worker_count(device)
    workers = min(len(chunks), available)
    if workers <= 1:
        # Inline; a loop nested in the chunk may still share out its own chunks.
        with _budget(available), one_intra_op_thread():
            for chunk in chunks:
                work(chunk)
        return
    next_index = itertools.count()
    stop = threading.Event()
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def drain() -> None:
        # (inference_mode(False) would turn grad mode on: entered only when the caller is
        # in inference mode, and before no_grad.)
        with (
            _budget(1),
            one_intra_op_thread(),
            torch.inference_mode() if inference else contextlib.nullcontext(),
            torch.no_grad(),
            torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]),
        ):
            while not stop.is_set():
                index = next(next_index)  # itertools.count is atomic under the GIL
                if index >= len(chunks):
                    return
                try:
                    work(chunks[index])
                except BaseException:
                    stop.set()
                    raise

    futures = [_pool(workers - 1).submit(drain) for _ in range(workers - 1)]
    error: BaseException | None = None
    # Any exception here (a chunk's, or Ctrl-C between chunks or while waiting) stops the
    # workers taking new chunks; it is raised once they have finished the one in hand.
    try:
        drain()
    except BaseException as exc:
        stop.set()
        error = exc
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            stop.set()
            error = error or exc
    if error is not None:
        raise error


@contextmanager
def _budget(threads: int) -> Iterator[None]:
    saved = getattr(_local, "budget", None)
    _local.budget = threads
    try:
        yield
    finally:
        _local.budget = saved


def _pool(threads: int) -> ThreadPoolExecutor:
    """The shared executor with at least ``threads`` threads (made anew after a fork, whose
    child has none of the parent's threads)."""
    global _executor, _executor_key
    with _executor_lock:
        pid = os.getpid()
        if _executor is None or _executor_key[0] != pid or _executor_key[1] < threads:
            if _executor is not None and _executor_key[0] == pid:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(threads, thread_name_prefix="reparam-worker")
            _executor_key = (pid, threads)
        return _executor
