"""What the numbers were measured on: CPU, usable cores, load, library versions."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

__all__ = ["MachineInfo", "machine_info"]


@dataclass(frozen=True)
class MachineInfo:
    """What the numbers were measured on."""

    cpu: str
    cores: int
    torch_threads: int
    torch_version: str
    ort_version: str
    python: str
    system: str
    load_average: tuple[float, float, float] | None = None


def machine_info() -> MachineInfo:
    """CPU model (from /proc/cpuinfo where there is one), usable cores, load, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load: tuple[float, float, float] | None = os.getloadavg()
    except (AttributeError, OSError):  # Windows
        load = None
    try:
        import onnxruntime  # optional and heavy: imported only here

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return MachineInfo(
        cpu=cpu,
        cores=cores,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        ort_version=ort_version,
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
        load_average=load,
    )
