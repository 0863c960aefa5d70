"""reparam.ops.threads: chunks pulled by threads, one intra-op thread each, state mirrored,
and no other thread's state touched."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from reparam.blocks.drconv import DRConv2d
from reparam.blocks.involution import Involution
from reparam.ops.threads import (
    call_single_threaded,
    parallel_for,
    pool_available,
    sample_ranges,
    worker_count,
)


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for one test, restoring it afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_chunk_runs_once_on_up_to_count_threads(threads, count):
    threads(count)
    seen, names, lock = [], set(), threading.Lock()
    barrier_hits = []

    def work(chunk: int) -> None:
        with lock:
            seen.append(chunk)
            names.add(threading.current_thread().name)
            barrier_hits.append(torch.get_num_threads())

    parallel_for(work, list(range(17)))
    assert sorted(seen) == list(range(17))
    assert len(names) <= count
    assert set(barrier_hits) == {1}  # every chunk ran with one intra-op thread
    assert torch.get_num_threads() == count  # the caller's count is restored


def test_chunks_are_shared_between_threads(threads):
    threads(2)
    names, lock = set(), threading.Lock()
    started = threading.Event()

    def work(chunk: int) -> None:
        with lock:
            names.add(threading.current_thread().name)
        if chunk == 0:  # hold the first chunk until a second thread has taken one
            started.wait(timeout=10)
        else:
            started.set()

    parallel_for(work, list(range(4)))
    assert len(names) == 2


def test_the_first_error_is_raised_and_stops_new_chunks(threads):
    threads(2)
    ran, lock = [], threading.Lock()

    def work(chunk: int) -> None:
        with lock:
            ran.append(chunk)
        if chunk == 1:
            raise ValueError("chunk 1 failed")

    with pytest.raises(ValueError, match="chunk 1 failed"):
        parallel_for(work, list(range(200)))
    assert len(ran) < 200
    assert torch.get_num_threads() == 2
    out = []
    parallel_for(out.append, [1, 2, 3])  # the pool still works
    assert sorted(out) == [1, 2, 3]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_chunk_starts_only_after_the_chunks_it_needs_have_finished(threads, count):
    threads(count)
    events, lock = [], threading.Lock()
    # Chunk 0 is slow; 1 and 2 need it, 3 needs 2, 4 needs nothing.
    needs = [(), (0,), (0,), (2,), ()]

    def work(chunk: int) -> None:
        with lock:
            events.append(("start", chunk))
        if chunk == 0:
            threading.Event().wait(0.2)
        with lock:
            events.append(("end", chunk))

    parallel_for(work, list(range(5)), needs=needs)
    assert sorted(c for kind, c in events if kind == "end") == [0, 1, 2, 3, 4]
    for chunk, earlier in enumerate(needs):
        for other in earlier:
            assert events.index(("end", other)) < events.index(("start", chunk))


def test_a_failed_chunk_stops_the_chunks_that_need_it_and_its_error_is_raised(threads):
    threads(2)
    ran, lock = [], threading.Lock()

    def work(chunk: int) -> None:
        with lock:
            ran.append(chunk)
        if chunk == 0:
            threading.Event().wait(0.1)  # the other thread takes chunk 1 and waits
            raise ValueError("chunk 0 failed")

    needs = [()] + [(0,)] * 20
    with pytest.raises(ValueError, match="chunk 0 failed"):
        parallel_for(work, list(range(21)), needs=needs)
    assert ran == [0]  # no chunk that needed it ran
    assert torch.get_num_threads() == 2


def test_needs_may_be_any_iterables(threads):
    threads(2)
    events, lock = [], threading.Lock()

    def work(chunk: int) -> None:
        if chunk == 0:
            threading.Event().wait(0.1)
        with lock:
            events.append(chunk)

    parallel_for(work, [0, 1], needs=[iter(()), iter([0])])
    assert events == [0, 1]


def test_ctrl_c_while_the_caller_waits_is_raised_after_the_workers_chunk(threads):
    """An interrupt that reaches the caller while it waits for a worker is raised only
    once that worker has finished the chunk in hand (which may still write results)."""
    import signal

    threads(2)

    class Interrupt(BaseException):
        pass

    def interrupt(signum, frame):
        raise Interrupt

    worker_started, worker_done = threading.Event(), threading.Event()

    def work(chunk: int) -> None:
        if threading.current_thread() is threading.main_thread():
            worker_started.wait(5)  # leave the other chunk to the worker
        else:
            worker_started.set()
            threading.Event().wait(0.6)
            worker_done.set()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(Interrupt):
            parallel_for(work, [0, 1])
        assert worker_done.is_set()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_needs_must_name_earlier_chunks(threads):
    threads(2)
    with pytest.raises(ValueError, match="chunk 1 needs \\[1\\]"):
        parallel_for(lambda chunk: None, [0, 1], needs=[(), (1,)])
    with pytest.raises(ValueError, match="2 chunks but 1 entries"):
        parallel_for(lambda chunk: None, [0, 1], needs=[()])


def test_nested_loops_run_inline_inside_a_shared_chunk(threads):
    threads(2)
    inner, lock = [], threading.Lock()

    def work(chunk: int) -> None:
        with lock:
            inner.append(worker_count())

    parallel_for(work, [0, 1, 2, 3])
    assert inner == [1, 1, 1, 1]


def test_a_single_chunk_runs_inline_and_keeps_the_budget(threads):
    threads(2)
    seen = []

    def work(chunk: int) -> None:
        seen.append((threading.current_thread() is threading.main_thread(), worker_count()))

    parallel_for(work, [0])
    assert seen == [(True, 2)]


def test_chunks_mirror_inference_mode_and_autocast_and_never_record_autograd(threads):
    threads(2)
    states, lock = [], threading.Lock()

    def work(chunk: int) -> None:
        with lock:
            states.append(
                (
                    torch.is_inference_mode_enabled(),
                    torch.is_grad_enabled(),
                    torch.is_autocast_enabled("cpu"),
                )
            )

    with torch.inference_mode():
        parallel_for(work, list(range(6)))
    assert set(states) == {(True, False, False)}
    states.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parallel_for(work, list(range(6)))
    assert set(states) == {(False, False, True)}
    states.clear()
    parallel_for(work, list(range(6)))
    assert {s[1] for s in states} == {False}


def test_writes_into_inference_tensors_from_worker_threads(threads):
    threads(2)
    with torch.inference_mode():
        out = torch.zeros(8, 4)
        parallel_for(lambda i: out[i].add_(torch.full((4,), float(i))), range(8))
    assert torch.equal(out, torch.arange(8.0).unsqueeze(1).expand(8, 4))


def test_worker_count_is_one_off_cpu_and_single_threaded_calls_leave_the_caller_alone(threads):
    threads(2)
    assert worker_count("meta") == 1
    assert worker_count() == 2
    seen = call_single_threaded(
        lambda: (threading.current_thread() is threading.main_thread(), torch.get_num_threads())
    )
    # in the caller (no thread hop), with one intra-op thread, its own count given back
    assert seen == (True, 1)
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"):
        call_single_threaded(lambda: (_ for _ in ()).throw(RuntimeError("inside")))
    assert torch.get_num_threads() == 2


def _observe_during(block, x, hooked) -> dict[str, int]:
    """Run ``block(x)`` without grad and, while it runs (a hook on ``hooked`` holds it at a
    barrier), read the thread count of another thread that had already used torch and of a
    thread whose first torch op runs then."""
    arrived, release = threading.Barrier(2, timeout=20), threading.Barrier(2, timeout=20)
    seen: dict[str, int] = {}
    ready = threading.Event()

    def observer() -> None:
        torch.get_num_threads()  # this thread has used torch before the call
        ready.set()
        arrived.wait()
        seen["existing"] = torch.get_num_threads()
        fresh: list[int] = []
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        seen["fresh"] = fresh[0]
        release.wait()

    calls = []

    def hook(*_args) -> None:
        if not calls:  # only the first call meets the observer
            calls.append(1)
            arrived.wait()
            release.wait()

    handle = hooked.register_forward_hook(hook)
    watcher = threading.Thread(target=observer)
    watcher.start()
    ready.wait(10)
    try:
        with torch.no_grad():
            block(x)
    finally:
        handle.remove()
        watcher.join(20)
    return seen


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("which", ["inv", "dr"])
def test_other_threads_counts_never_change_during_a_call(threads, count, which):
    """No process-wide state: while a dynamic block runs on several threads, another
    thread, and a thread starting then, see the user's thread count."""
    threads(count)
    torch.manual_seed(0)
    if which == "inv":
        block = Involution(32, 3, group_channels=8).eval()
        hooked, x = block.conv1.conv, torch.randn(4, 32, 10, 10)
    else:
        block = DRConv2d(8, 8, 3, region_num=4, padding=1).eval()
        hooked, x = block.conv_guide, torch.randn(4, 8, 10, 10)
    assert _observe_during(block, x, hooked) == {"existing": count, "fresh": count}
    assert torch.get_num_threads() == count


def test_the_pool_is_available_here():
    """The per-thread calls are found with torch's own OpenMP runtime (else every chunk
    would run inline, and the speed targets would not hold)."""
    assert pool_available()


@pytest.mark.parametrize(
    "make",
    [
        lambda: (Involution(32, 5, group_channels=8), torch.randn(4, 32, 12, 12), "addcmul_"),
        lambda: (DRConv2d(8, 8, 3, region_num=4, padding=1), torch.randn(4, 8, 10, 10), "mm"),
    ],
    ids=["inv", "dr"],
)
def test_the_profiler_sees_every_op_at_any_thread_count(threads, make):
    from torch.profiler import profile

    torch.manual_seed(0)
    block, x, name = make()
    block.eval()
    counts = []
    for count in (1, 2):
        threads(count)
        with torch.no_grad(), profile() as prof:
            block(x)
        names = [event.key for event in prof.key_averages() for _ in range(event.count)]
        counts.append(sum(1 for key in names if name in key))
    assert counts[0] > 0 and counts[1] == counts[0]


def test_sample_ranges():
    assert sample_ranges(0, 100, 2) == []
    assert sample_ranges(8, 1 << 20, 2) == [(i, i + 1) for i in range(8)]
    # Tiny samples are grouped, but never into fewer chunks than workers.
    assert sample_ranges(8, 10, 2) == [(0, 4), (4, 8)]
    assert sample_ranges(3, 10, 4) == [(0, 1), (1, 2), (2, 3)]


def _child_runs_parallel_for(queue) -> None:
    torch.set_num_threads(2)
    out = []
    parallel_for(out.append, list(range(5)))
    queue.put(sorted(out))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_gets_its_own_threads(threads):
    threads(2)
    parallel_for(lambda i: None, range(4))  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_runs_parallel_for, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [0, 1, 2, 3, 4]


def _results(block, x: torch.Tensor) -> list[torch.Tensor]:
    """Inference output, then training output and the gradients of input and parameters."""
    block.eval()
    with torch.no_grad():
        inference = block(x)
    block.train()
    x.requires_grad_()
    out = block(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    return [inference, out.detach(), *grads]


def _involution_results(batch: int):
    torch.manual_seed(0)
    return _results(Involution(32, 5, group_channels=8), torch.randn(batch, 32, 13, 11))


def _drconv_results(batch: int):
    torch.manual_seed(0)
    return _results(DRConv2d(8, 12, 3, region_num=4, padding=1), torch.randn(batch, 8, 10, 9))


@pytest.fixture(params=["default", "small"], ids=["default-chunks", "small-chunks"])
def small_bands(request, monkeypatch):
    """DRConv's 1/r path as it chunks these small inputs (a sample per chunk, several samples
    per preparation range), or in bands of one or two output rows and one sample per range,
    so batch 1 has several pieces."""
    import reparam.ops.drconv_kernels as drconv_module

    if request.param == "small":
        monkeypatch.setattr(drconv_module, "_BAND_BYTES", 2048)
        monkeypatch.setattr(drconv_module, "_RANGE_PIXELS", 1)


@pytest.mark.parametrize("results", [_involution_results, _drconv_results], ids=["inv", "dr"])
@pytest.mark.parametrize("batch", [1, 5])
def test_results_do_not_depend_on_the_thread_count(threads, small_bands, results, batch):
    """Every chunk runs the same single-threaded ops on whichever thread takes it: the
    inference outputs are equal bit for bit at 1, 2 and 3 threads (batch 1 also takes the
    paths that share out a sample's pieces instead of samples). Training also runs the
    blocks' ordinary convolutions (kernel generators, guide) with torch's intra-op threads,
    whose reductions round differently at different thread counts: equal to rounding."""
    threads(1)
    expected = results(batch)
    for count in (2, 3):
        threads(count)
        got = results(batch)
        assert torch.equal(got[0], expected[0])
        for ours, want in zip(got[1:], expected[1:], strict=True):
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize(
    "block", [lambda: Involution(16, 3), lambda: DRConv2d(4, 6, 3, region_num=4, padding=1)]
)
def test_an_empty_batch(block):
    module = block()
    channels = 16 if isinstance(module, Involution) else 4
    with torch.no_grad():
        assert module.eval()(torch.randn(0, channels, 7, 5)).shape[0] == 0
    x = torch.randn(0, channels, 7, 5, requires_grad=True)
    module.train()(x).sum().backward()
    assert x.grad.shape == x.shape


def test_scratch_buffers_are_reused_per_thread_and_work_in_and_out_of_inference_mode():
    from reparam.ops.workspace import scratch

    like = torch.zeros(1)
    first = scratch("test.buffer", (4, 5), like)
    second = scratch("test.buffer", (2, 3), like)
    assert second.data_ptr() == first.data_ptr()  # the same memory, no new allocation
    assert scratch("test.buffer", (3, 3), like.double()).dtype == torch.float64
    with torch.inference_mode():
        made_inside = scratch("test.inference", (8,), like)
        made_inside.fill_(1.0)
    scratch("test.inference", (8,), like).fill_(2.0)  # writable outside inference mode
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch("test.buffer", (4, 5), like)))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != first.data_ptr()  # each thread has its own
    assert scratch("test.meta", (2,), torch.zeros(1, device="meta")).device.type == "meta"


def test_scratch_above_its_bound_is_a_fresh_tensor_and_keeps_no_buffer():
    from reparam.ops import workspace
    from reparam.ops.workspace import scratch

    like = torch.zeros(1)
    kept = scratch("test.bounded", (4, 4), like, max_bytes=64)  # 64 bytes: at the bound
    assert scratch("test.bounded", (4, 4), like, max_bytes=64).data_ptr() == kept.data_ptr()
    fresh = scratch("test.bounded_over", (4, 5), like, max_bytes=64)
    assert fresh.shape == (4, 5)
    assert ("test.bounded_over", torch.float32) not in workspace._local.buffers


def test_a_base_exception_such_as_ctrl_c_propagates_and_stops_the_others(threads):
    threads(2)

    class Interrupt(BaseException):
        pass

    ran, lock = [], threading.Lock()

    def work(chunk: int) -> None:
        with lock:
            ran.append(chunk)
        if chunk == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        parallel_for(work, list(range(500)))
    assert len(ran) < 500
    assert torch.get_num_threads() == 2


def test_inline_chunks_run_without_autograd_too(threads):
    threads(1)
    seen = []
    parallel_for(lambda chunk: seen.append(torch.is_grad_enabled()), [0, 1])
    assert seen == [False, False]


def test_the_users_thread_count_is_what_new_threads_start_from(threads):
    """torch.set_num_threads also sets the count new threads start from; the pool's threads
    must never write their own stale count back over the user's."""
    for count in (4, 2, 3, 2):
        threads(count)
        parallel_for(lambda chunk: None, list(range(8)))
        started = []
        thread = threading.Thread(target=lambda seen=started: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert started == [count]
        assert torch.get_num_threads() == count


@pytest.mark.parametrize(
    "make",
    [
        lambda: (Involution(32, 5, group_channels=8), torch.randn(4, 32, 12, 12)),
        lambda: (DRConv2d(16, 16, 3, region_num=4, padding=1), torch.randn(4, 16, 12, 12)),
    ],
    ids=["inv", "dr"],
)
def test_flop_counting_sees_every_op_at_any_thread_count(threads, make):
    """Dispatch modes are per thread: under FlopCounterMode the chunks run inline, and the
    grouped matmul (which the counter cannot count) gives way to mm."""
    from reparam.macs import count_macs

    torch.manual_seed(0)
    block, x = make()
    block.eval()
    count_macs(block, x)  # first: the first count includes filling the block's caches
    counts = []
    for count in (1, 2, 2):
        threads(count)
        counts.append(count_macs(block, x))
    assert counts[0] > 0 and counts == [counts[0]] * 3


def test_involution_with_training_mode_batchnorm_and_no_autograd(threads):
    """No graph needed, but the BN is in training mode: it must see the whole batch once
    (batch statistics, one running-statistics update), as the unfold formulation does."""
    threads(2)
    torch.manual_seed(0)
    block = Involution(32, 3, group_channels=8).train()
    twin = Involution(32, 3, group_channels=8).train()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(4, 32, 10, 10)
    with torch.no_grad():
        ours, reference = block(x), twin.forward_unfold(x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert block.conv1.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(block.conv1.bn.running_mean, twin.conv1.bn.running_mean)
    with torch.no_grad():  # one sample per chunk must not become a one-value BN batch
        assert block(torch.randn(2, 32, 1, 1)).shape == (2, 32, 1, 1)


def test_caller_takes_chunks_with_one_thread_and_gets_its_count_back(threads):
    """The calling thread runs chunks beside the pool's (one intra-op thread each) and has
    its own count again afterwards, also when its chunk raises."""
    import time

    threads(2)
    seen: list[tuple[bool, int]] = []

    def work(_):
        time.sleep(0.01)  # long enough that the caller surely takes one of the chunks
        seen.append(
            (threading.current_thread() is threading.main_thread(), torch.get_num_threads())
        )

    parallel_for(work, range(6))
    assert len(seen) == 6 and {count for _, count in seen} == {1}
    assert any(on_caller for on_caller, _ in seen) and not all(on_caller for on_caller, _ in seen)
    assert torch.get_num_threads() == 2

    def fail_on_caller(_):
        time.sleep(0.01)
        if threading.current_thread() is threading.main_thread():
            raise KeyError("caller's chunk")

    with pytest.raises(KeyError, match="caller's chunk"):
        parallel_for(fail_on_caller, range(6))
    assert torch.get_num_threads() == 2
    threads(3)  # a later count is the caller's own again, not the pinned one
    assert torch.get_num_threads() == 3


def _dynamic_blocks():
    torch.manual_seed(0)
    return [
        Involution(32, 7, group_channels=8).eval(),
        DRConv2d(32, 16, 3, region_num=8, padding=1).eval(),
    ]


def _reference(block, x):
    if isinstance(block, Involution):
        return block.forward_unfold(x.contiguous())
    return block.forward_reference(x.contiguous())


@pytest.mark.parametrize("count", [1, 2])
def test_any_input_layout_gives_the_reference_result(threads, count):
    """Channels-last, strided, transposed-storage and expanded (stride-0 batch) inputs: the
    chunked paths read through views, so each layout must give the contiguous result."""
    threads(count)
    x = torch.randn(3, 32, 17, 13)
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": torch.randn(3, 32, 34, 13)[:, :, ::2],
        "transposed storage": x.transpose(2, 3).contiguous().transpose(2, 3),
        "expanded batch": x[:1].expand(3, -1, -1, -1),
    }
    with torch.no_grad():
        for block in _dynamic_blocks():
            for name, view in layouts.items():
                got, want = block(view), _reference(block, view)
                rel = ((got - want).abs().max() / want.abs().max()).item()
                assert rel <= 1e-5, (type(block).__name__, name, rel)


def test_concurrent_callers_get_the_sequential_results_bit_for_bit(threads):
    """Three Python threads calling the same blocks at once share the pool (and the caller
    now takes chunks itself): every output equals the one computed alone, bit for bit."""
    threads(2)
    blocks = _dynamic_blocks()
    inputs = [torch.randn(4, 32, 15, 11) for _ in range(3)]
    with torch.no_grad():
        alone = [[block(x) for x in inputs] for block in blocks]
    mismatches: list[tuple[int, int]] = []
    finished: list[bool] = []  # an exception in a caller thread would otherwise go unseen

    def caller() -> None:
        torch.set_num_threads(2)
        with torch.no_grad():
            for _ in range(5):
                for i, block in enumerate(blocks):
                    for j, x in enumerate(inputs):
                        if not torch.equal(block(x), alone[i][j]):
                            mismatches.append((i, j))
        finished.append(True)

    callers = [threading.Thread(target=caller) for _ in range(3)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert mismatches == [] and len(finished) == 3
