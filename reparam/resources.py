"""What the machine can give: memory and CPUs, checked before work starts.

One place for the checks every command and library entry point makes before allocating:
an absurd ``--batch``, ``-s 1,3,100000,100000`` or a crafted input shape is refused with the
memory it would take against what the machine has, never a MemoryError or an OOM kill, and
thread counts are kept to a few per usable CPU. Standard library only (a bottom layer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from reparam.errors import UserInputError

__all__ = [
    "THREADS_PER_CPU",
    "available_memory",
    "check_allocation",
    "check_threads",
    "format_bytes",
    "max_threads",
    "usable_cpus",
]

THREADS_PER_CPU = 4  # an explicit thread count is capped at this many per usable CPU
MAX_SHAPES_SHOWN = 3  # a message lists at most this many shapes, else counts the tensors


def available_memory() -> int | None:
    """Bytes a new allocation can get without swapping (Linux ``MemAvailable``); elsewhere
    the free physical pages, or None when the OS does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(size: float) -> str:
    """``812 B``, ``3.4 KiB``, ``44.6 MiB``, ``1.2 GiB``, ``894.1 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


def _itemsize(dtype: Any) -> int:
    """Bytes per element of a torch or numpy dtype (anything with ``itemsize``) or an int."""
    if isinstance(dtype, int):
        return dtype
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):  # torch.dtype, numpy.dtype
        return itemsize
    import numpy as np  # a numpy scalar type such as np.float32; numpy comes with torch

    return int(np.dtype(dtype).itemsize)


def check_allocation(
    shapes: Sequence[Sequence[int]],
    dtype: Any | Sequence[Any],
    what: str,
    *,
    copies: int = 1,
    share: float = 1.0,
    hint: str = "use a smaller batch or size",
) -> int:
    """Refuse, before allocating, tensors of ``shapes`` that the machine cannot hold.

    Args:
        shapes: One shape per tensor; every size must be an integer ≥ 0.
        dtype: One dtype for all tensors, or one per shape (torch, numpy, or bytes per item).
        what: What the tensors are, for the message ("probe input", "--batch 1000000").
        copies: How many such sets are alive at once (e.g. inputs plus outputs).
        share: The fraction of the available memory they may take.
        hint: What to do instead, ending the message.

    Returns:
        The bytes the tensors take.

    Raises:
        UserInputError: a negative or non-integer size, or more than ``share`` of the memory
            available (naming both).
    """
    shapes = [tuple(shape) for shape in shapes]
    dtypes = list(dtype) if isinstance(dtype, list | tuple) else [dtype] * len(shapes)
    needed = 0
    for shape, item in zip(shapes, dtypes, strict=True):
        if any(isinstance(d, bool) or not hasattr(d, "__index__") or d < 0 for d in shape):
            raise UserInputError(f"{what} has an invalid shape {shape}: sizes must be integers ≥ 0")
        needed += math.prod(int(d) for d in shape) * _itemsize(item)
    needed *= copies
    available = available_memory()
    if available is not None and needed > share * available:
        if len(shapes) <= MAX_SHAPES_SHOWN:
            shown = "of shape " + ", ".join("x".join(map(str, shape)) for shape in shapes)
        else:
            shown = f"({len(shapes)} tensors)"
        raise UserInputError(
            f"{what} {shown} would take {format_bytes(needed)}; this machine has "
            f"{format_bytes(available)} available: {hint}"
        )
    return needed


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def max_threads() -> int:
    """The most threads reparam will use: :data:`THREADS_PER_CPU` per usable CPU (far more
    only thrashes, and onnxruntime crashed after 30 s with ``--threads 100000``)."""
    return THREADS_PER_CPU * usable_cpus()


def check_threads(threads: int | None, option: str = "--threads") -> int | None:
    """``threads`` if it is between 1 and :func:`max_threads` (None: the runtime's default)."""
    if threads is None:
        return None
    limit = max_threads()
    if not 1 <= threads <= limit:
        raise UserInputError(
            f"{option} {threads} is outside 1..{limit} ({THREADS_PER_CPU} per usable CPU)"
        )
    return threads
