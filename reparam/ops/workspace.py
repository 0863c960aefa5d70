"""Per-thread scratch buffers, reused across calls, for temporaries of a bounded size.

A temporary of a few MiB that is freed after every call goes back to the operating system
(glibc serves blocks that large with ``mmap``, or trims them off the top of the heap), and
the next call pays a page fault, and the zeroing of a page, for every 4 KiB it touches:
measured on DRConv's 1/r path, 4,866 faults per call and half its time. Handing each thread
the same buffer for the same temporary every time removes them.

Only for temporaries that the caller's chunking keeps small (DRConv's bands: 4 MiB of
im2col rows, or one output row if a row is larger), never for results: a buffer lives as
long as its thread, at the size of the largest request so far.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["scratch"]

_local = threading.local()


def scratch(
    name: str, shape: tuple[int, ...], like: Tensor, max_bytes: int | None = None
) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, backed by this
    thread's buffer ``name``: valid until the next ``scratch(name, ...)`` in this thread.

    Off the CPU, or above ``max_bytes`` when given, it is a new tensor instead (other
    devices cache their own allocations; a large temporary is not kept for the thread's
    life).
    """
    too_large = max_bytes is not None and math.prod(shape) * like.element_size() > max_bytes
    if like.device.type != "cpu" or too_large:
        return like.new_empty(shape)
    buffers: dict = _local.__dict__.setdefault("buffers", {})
    key = (name, like.dtype)
    numel = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        # A normal tensor even in inference mode, so that later calls outside it can write.
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=like.dtype)
        buffers[key] = buffer
    return buffer[:numel].view(shape)
