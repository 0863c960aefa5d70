"""Memory: the peak a forward pass adds (measured), and the size of a run (estimated first).

The estimate runs the model on the ``meta`` device, where tensors have shapes but no
storage, so an absurd ``--size`` or ``--batch`` is refused in milliseconds instead of
swapping the machine to a halt.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from reparam.resources import available_memory  # re-exported: one place reads it

__all__ = ["available_memory", "estimate_forward_bytes", "peak_memory"]


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Approximate peak memory ``fn()`` adds to the process, in bytes; None if unmeasurable.

    Linux only: returns free heap memory to the system (``malloc_trim``), resets the
    resident-set high-water mark (``/proc/self/clear_refs``), calls ``fn`` and returns
    VmHWM − VmRSS-before. It counts every page the call touches (activations, library
    workspaces, allocator overhead), so treat it as an order of magnitude.
    """
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except (OSError, AttributeError, KeyError):
        return None
    with torch.inference_mode():
        fn()
    try:
        return max(0, _proc_status("VmHWM") - before)
    except (OSError, KeyError):
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def estimate_forward_bytes(
    build: Callable[[], nn.Module], shapes: Sequence[tuple[int, ...]]
) -> int:
    """About the memory one forward pass of ``build()`` takes on inputs ``shapes``, in bytes.

    The model is built and run on the ``meta`` device (shapes, no storage). The estimate
    is the inputs plus twice the largest input + output pair of any single module, in
    float32: one pair is a hard lower bound, and eager forwards keep about as much again
    alive (branch outputs before their sum, the residual; measured: the training-form ACNet
    ResNet-18 peaked at 2.7 times the pair at 224²). A model that stops on the ``meta``
    device (an operator that needs real data) is estimated from the modules it ran.
    """
    inputs_bytes = sum(4 * _numel(shape) for shape in shapes)
    largest = 0

    def hook(_module: nn.Module, args: tuple, output: object) -> None:
        nonlocal largest
        pair = sum(4 * t.numel() for t in _tensors(args) + _tensors(output))
        largest = max(largest, pair)

    handles = []
    try:
        with torch.device("meta"):
            model = build().eval()
            inputs = [torch.empty(shape) for shape in shapes]
        handles = [m.register_forward_hook(hook) for m in model.modules()]
        with torch.no_grad():
            model(*inputs)
    except Exception:  # an operator without a meta kernel: keep what the modules so far showed
        pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs_bytes + 2 * largest


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []
