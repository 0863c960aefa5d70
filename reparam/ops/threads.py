"""How the dynamic operators use CPU threads: chunks pulled by workers, ops single-threaded.

Involution's shift-and-accumulate and DRConv's per-region path are loops of hundreds of
memory-bound or medium-sized ops. Run with torch's intra-op parallelism, every one of those
ops ends at an OpenMP barrier; when another process holds one of the cores, the barrier
waits for a scheduler time slice, so the loop slows down several times on a busy machine,
and on a quiet one a second thread gains such small ops little anyway.

:func:`parallel_for` splits the work the other way round: the caller cuts it into
chunks (samples, or groups of rows; independent, or each waiting only for the earlier
chunks whose results it reads), and up to ``torch.get_num_threads()`` worker threads each
*pull* the next chunk and run its ops with one intra-op thread. Threads meet once per call
instead of once per op, and a thread that the scheduler pauses simply takes fewer chunks:
beside a busy process the work flows to the core that is free, on a quiet machine every
core is used.

Given the chunks, every chunk runs the same single-threaded ops whichever thread takes
it. (Where the callers cut chunks by the thread count, for a batch smaller than it, the
results can differ by rounding between thread counts.)

No process-wide state: ``torch.set_num_threads`` is never called. It would also set the
count that every thread's first torch op starts from, so a thread starting then would keep
one intra-op thread for life. Instead each of the pool's own threads sets its own OpenMP
and MKL thread counts to one, once, through the runtimes' per-thread calls
(``omp_set_num_threads``, ``mkl_set_num_threads_local``: what torch's own per-thread
setup calls). The caller takes chunks too (it is awake, where an idle pool thread first
takes a wake-up), with the same per-thread calls setting its own counts to one for the call
and back after: no other thread's count changes, during or after a call, and the caller's
own is as before once the call returns. Where those calls cannot be found (another OpenMP
runtime, another platform), the chunks run inline in the caller's thread with its own
thread count.

The chunks also run inline in the calling thread while anything per thread would miss the
workers' ops: a torch dispatch or function mode (``FlopCounterMode``), the profiler, or a
``torch.func`` transform.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = [
    "call_single_threaded",
    "modes_active",
    "parallel_for",
    "pool_available",
    "sample_ranges",
    "worker_count",
]

Chunk = TypeVar("Chunk")
Result = TypeVar("Result")

# Per OS thread: the number of threads a parallel_for started here may use, while this
# thread is itself running chunks (1 inside a pooled chunk, so nested loops run inline).
_local = threading.local()
_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_size = 0


@functools.lru_cache(maxsize=1)
def _per_thread_setters() -> _ThreadCounts | None:
    """The calls that set the calling OS thread's own OpenMP and MKL counts, or None.

    torch's OpenMP runtime is the one loaded into the process (read from
    ``/proc/self/maps``); MKL's per-thread call is exported by ``libtorch_cpu`` in its
    by-reference (Fortran) form, whose convention is fixed by that name.
    """
    if not os.path.exists("/proc/self/maps"):  # Linux only: elsewhere chunks run inline
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if line.count(" ") >= 5}
        names = ("libgomp", "libiomp5", "libomp")
        torch_dir = os.path.dirname(torch.__file__)
        # torch's own copy first: another package may have loaded its own runtime too.
        candidates = sorted(
            (p for p in paths if os.path.basename(p).startswith(names)),
            key=lambda p: (not p.startswith(torch_dir), p),
        )
        runtime = candidates[0] if candidates else None
        if runtime is None:
            return None
        omp = ctypes.CDLL(runtime)
        omp_set, omp_get = omp.omp_set_num_threads, omp.omp_get_max_threads
        mkl_set = None
        if torch.backends.mkl.is_available():
            library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
            mkl_set = ctypes.CDLL(library).mkl_set_num_threads_local_
            mkl_set.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return _ThreadCounts(omp_set, omp_get, mkl_set)


class _ThreadCounts:
    """The calling OS thread's own OpenMP and MKL thread counts (per-thread calls only)."""

    def __init__(self, omp_set, omp_get, mkl_set) -> None:
        self._omp_set, self._omp_get, self._mkl_set = omp_set, omp_get, mkl_set

    def pin(self) -> tuple[int, int]:
        """One thread each, for this thread; returns what :meth:`restore` gives back (MKL's
        previous local count, 0 meaning "the global one")."""
        saved_omp = int(self._omp_get())
        self._omp_set(1)
        saved_mkl = 0
        if self._mkl_set is not None:
            saved_mkl = int(self._mkl_set(ctypes.byref(ctypes.c_int(1))))
        return saved_omp, saved_mkl

    def restore(self, saved: tuple[int, int]) -> None:
        self._omp_set(saved[0])
        if self._mkl_set is not None:
            self._mkl_set(ctypes.byref(ctypes.c_int(saved[1])))


def pool_available() -> bool:
    """Whether chunks can be shared out without touching any thread's count but the pool's."""
    return _per_thread_setters() is not None


def _pin_to_one_thread() -> None:
    """Pool thread initialiser: one intra-op thread for this thread only, for good."""
    torch.get_num_threads()  # torch's own per-thread setup first, so it cannot undo ours
    counts = _per_thread_setters()
    if counts is not None:
        counts.pin()


@contextmanager
def _caller_pinned() -> Iterator[None]:
    """One intra-op thread for the calling thread while it runs chunks beside the pool's,
    its own counts given back after (no other thread's count is read or written)."""
    counts = _per_thread_setters()
    assert counts is not None  # chunks are shared out only where the calls exist
    torch.get_num_threads()  # torch's per-thread setup done, so it cannot undo ours
    saved = counts.pin()
    try:
        yield
    finally:
        counts.restore(saved)


def worker_count(device: torch.device | str = "cpu") -> int:
    """Threads a :func:`parallel_for` called here would use for work on ``device``.

    ``torch.get_num_threads()`` for CPU work outside any chunk; 1 for other devices (their
    ops are asynchronous), inside a chunk (nested loops run inline), while tracing, while a
    torch dispatch or function mode, the profiler or a ``torch.func`` transform is active
    (all per thread), and where the pool's threads cannot be given one intra-op thread
    each.
    """
    if (
        torch.device(device).type != "cpu"
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # the TorchScript tracer records the calling thread only
        or _observed_per_thread()
        or not pool_available()
    ):
        return 1
    budget = getattr(_local, "budget", None)
    return budget if budget is not None else max(1, torch.get_num_threads())


def modes_active() -> bool:
    """Whether a torch dispatch or function mode (e.g. ``FlopCounterMode``) is active in
    this thread: such modes see only this thread's ops."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._len_torch_function_stack() > 0


def _observed_per_thread() -> bool:
    """Whether something that sees only this thread's ops is active: a mode, the autograd
    profiler, or a ``torch.func`` transform (``vmap``, ``grad``)."""
    return (
        modes_active()
        or torch.autograd.profiler._is_profiler_enabled
        or torch._C._autograd._profiler_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


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


def call_single_threaded(fn: Callable[[], Result], device: torch.device | str = "cpu") -> Result:
    """``fn()`` with one intra-op thread: in the calling thread, its own OpenMP and MKL
    counts set to one for the call and given back after, when it has several; else as is.
    For a few medium ops that must run as one call (a
    module whose BN needs the whole batch) but whose barriers would stall beside a busy
    process. Runs under ``torch.no_grad()`` with the caller's inference mode and autocast,
    as chunks do."""
    results: list = []
    if worker_count(device) <= 1:
        return fn()
    _share(lambda _: results.append(fn()), [None], 1, None)
    return results[0]


def parallel_for(
    work: Callable[[Chunk], object],
    chunks: Sequence[Chunk],
    device: torch.device | str = "cpu",
    needs: Sequence[Sequence[int]] | None = None,
) -> None:
    """Call ``work(chunk)`` for every chunk, on up to :func:`worker_count` threads.

    Chunks must not need autograd: chunks run under ``torch.no_grad()``, with the caller's
    inference mode and CPU autocast state. Shared out, they run on the calling thread and
    on the pool's threads, one intra-op thread each (the caller's own counts are set to
    one for the call and given back after); else inline in the caller's thread, with its
    own thread count. Threads pull chunks in order from a shared counter. The
    first exception (Ctrl-C included) stops the others taking new chunks and is raised
    here once they have finished the chunk in hand.

    Chunks are independent (each writes its own slice of a preallocated result), except
    as ``needs`` says: ``needs[i]`` lists earlier chunks (smaller indices) whose results
    chunk i reads; a thread that takes chunk i first waits for those to finish. Steps that
    depend on each other thus share one call, and one meeting of the threads, instead of
    one call per step with every thread waiting for the slowest at the end of each. Since
    chunks are taken in order, a chunk waited for is already in some thread's hands.
    """
    if needs is not None:
        needs = [tuple(earlier) for earlier in needs]  # iterators too, read once
        _check_needs(needs, len(chunks))
    available = worker_count(device)
    workers = min(len(chunks), available)
    if workers <= 1:
        # Inline; a loop nested in the chunk may still share out its own chunks.
        with _budget(available), torch.no_grad():
            for chunk in chunks:
                work(chunk)
        return
    _share(work, chunks, workers, needs)


def _share(
    work: Callable[[Chunk], object],
    chunks: Sequence[Chunk],
    workers: int,
    needs: Sequence[tuple[int, ...]] | None,
) -> None:
    """Run the chunks on the caller and ``workers`` − 1 pool threads; returns when all are
    done."""
    next_index = itertools.count()
    stop = threading.Event()
    finished = [threading.Event() for _ in chunks] if needs is not None else []
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def drain() -> None:
        # (inference_mode(False) would turn grad mode on: entered only when the caller is
        # in inference mode, and before no_grad.)
        with (
            _budget(1),
            torch.inference_mode() if inference else contextlib.nullcontext(),
            torch.no_grad(),
            torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]),
        ):
            while not stop.is_set():
                index = next(next_index)  # itertools.count is atomic under the GIL
                if index >= len(chunks):
                    return
                if needs is not None and not _wait_for(finished, needs[index], stop):
                    return  # a chunk it needs failed: its error is raised
                try:
                    work(chunks[index])
                except BaseException:
                    stop.set()
                    raise
                finally:
                    if needs is not None:
                        finished[index].set()

    error: BaseException | None = None
    # Any exception, a chunk's or Ctrl-C while waiting, stops the workers taking new
    # chunks; it is raised once they have all finished the chunk in hand (which may still
    # write results).
    futures = _submit(drain, workers - 1)
    try:
        # The caller takes chunks too: it is awake, where a pool thread idle for a while
        # takes a wake-up (B8 32² DRConv after 20 ms idle: ~1.5 ms) before its first chunk.
        with _caller_pinned():
            drain()
    except BaseException as exc:
        stop.set()
        error = exc
    for future in futures:
        while True:  # until the worker is done, even if Ctrl-C interrupts the wait
            try:
                future.result()
                break
            except BaseException as exc:
                stop.set()
                error = error or exc
                if future.done():
                    break
    if error is not None:
        raise error


def _check_needs(needs: Sequence[Sequence[int]], count: int) -> None:
    if len(needs) != count:
        raise ValueError(f"parallel_for: {count} chunks but {len(needs)} entries in needs")
    for index, earlier in enumerate(needs):
        if any(not 0 <= other < index for other in earlier):
            raise ValueError(
                f"parallel_for: chunk {index} needs {list(earlier)}; a chunk can only need "
                f"earlier chunks"
            )


def _wait_for(
    finished: list[threading.Event], earlier: Sequence[int], stop: threading.Event
) -> bool:
    """Wait until every chunk in ``earlier`` has finished; False if the loop was stopped
    first (a chunk failed, or Ctrl-C reached the caller, perhaps before the chunk it had
    just taken started: then nothing would ever mark that chunk finished)."""
    for other in earlier:
        while not finished[other].wait(0.05):
            if stop.is_set():
                return False
    return not stop.is_set()


@contextmanager
def _budget(threads: int) -> Iterator[None]:
    saved = getattr(_local, "budget", None)
    _local.budget = threads
    try:
        yield
    finally:
        _local.budget = saved


def _submit(fn: Callable[[], None], count: int) -> list:
    """Submit ``fn`` ``count`` times to the shared executor, made (or grown) to at least
    ``count`` threads. Under the lock, so a concurrent caller growing the executor cannot
    shut it down between our lookup and our submissions."""
    global _executor, _executor_size
    if count < 1:
        return []
    with _executor_lock:
        if _executor is None or _executor_size < count:
            if _executor is not None:
                _executor.shutdown(wait=False)  # its queued work still runs
            _executor = ThreadPoolExecutor(
                count, thread_name_prefix="reparam-worker", initializer=_pin_to_one_thread
            )
            _executor_size = count
        return [_executor.submit(fn) for _ in range(count)]


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads, and the lock may have been held by
    one of them at the fork: start afresh."""
    global _executor, _executor_size, _executor_lock
    _executor, _executor_size, _executor_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
