"""GPUs as a worker reads them: memory and utilization (`nvidia-smi`, no CUDA needed), a
simulated device for tests on machines without one (`HPSEARCH_FAKE_GPU_MEMORY`), the margins a
shared GPU is filled to, and whether an out-of-memory came from sharing it.

Light to import (no torch): the supervisor plans with it (`search.workers._gpu_fill`), and a
trial asks it when it runs out of memory or measures its pack (`search.trial._packing`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from search._errors import SpecError

YIELD_ENV = "HPSEARCH_GPU_YIELD"  # set on auto workers: a shared-GPU OOM queues the trial again
FAKE_MEMORY_ENV = "HPSEARCH_FAKE_GPU_MEMORY"  # JSON: a simulated device, for tests

MEMORY_MARGIN = 0.85  # of a GPU's memory, the most the workers on it may hold together
BUSY_UTILIZATION = 90.0  # % at or above which another worker only waits for the same GPU


@dataclass(frozen=True)
class GpuReading:
    """One GPU's memory in use and total (MiB), and how busy it is."""

    memory_used_mb: float
    memory_total_mb: float
    utilization: float | None  # percent; None where the driver does not say


class GpuProbe(Protocol):
    """Where GPU readings come from: nvidia-smi, or a simulated device in tests."""

    def read(self, workers: Mapping[str, int]) -> dict[str, GpuReading]:
        """Readings of the GPUs `workers` names (GPU id → live workers on it)."""
        ...


class NvidiaSmi:
    """Readings from `nvidia-smi` (the driver's NVML), by GPU index or UUID."""

    def __init__(self, executable: str) -> None:
        self.executable = executable

    def read(self, workers: Mapping[str, int]) -> dict[str, GpuReading]:
        query = "index,uuid,memory.used,memory.total,utilization.gpu"
        try:
            out = subprocess.run([self.executable, f"--query-gpu={query}",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        readings: dict[str, GpuReading] = {}
        for line in out.splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) != 5:
                continue
            try:
                reading = GpuReading(float(cells[2]), float(cells[3]), _percent(cells[4]))
            except ValueError:
                continue
            for key in cells[:2]:
                if key in workers:
                    readings[key] = reading
        return readings


def _percent(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]" on some boards
        return None


@dataclass
class SimulatedGpus:
    """A device for tests: each live worker holds `per_worker_mb` and adds `util_per_worker`
    percent, on top of `base_mb` held by others."""

    total_mb: float
    per_worker_mb: float
    util_per_worker: float = 10.0
    base_mb: float = 0.0
    settle_s: float | None = None  # how long a new worker settles (default: the fill's SETTLE_S)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SimulatedGpus | None:
        text = (os.environ if env is None else env).get(FAKE_MEMORY_ENV)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise SpecError(f"${FAKE_MEMORY_ENV}: expected JSON like "
                            f'{{"total_mb": 1000, "per_worker_mb": 300}}, got {text!r} ({e})'
                            ) from None

    def read(self, workers: Mapping[str, int]) -> dict[str, GpuReading]:
        return {gpu: GpuReading(self.base_mb + n * self.per_worker_mb, self.total_mb,
                                min(100.0, n * self.util_per_worker))
                for gpu, n in workers.items()}


def default_probe() -> GpuProbe | None:
    """The simulated device where the tests set one, else nvidia-smi, else None (no growth)."""
    simulated = SimulatedGpus.from_env()
    if simulated is not None:
        return simulated
    smi = shutil.which("nvidia-smi")
    return NvidiaSmi(smi) if smi else None


def shared_gpu_oom(free_bytes: int, total_bytes: int, own_bytes: int) -> bool:
    """Whether an out-of-memory came from sharing the GPU: other processes hold more than
    this trial's own memory and more than a CUDA context's worth (so the trial alone fits)."""
    others = total_bytes - free_bytes - own_bytes
    return others > max(own_bytes, 1 << 30)


def oom_from_sharing(device: str) -> bool:
    """For the worker whose trial just ran out of memory on `device`: was it the sharing?

    Only auto workers (`YIELD_ENV`) ask; a simulated device always shares.
    """
    if os.environ.get(YIELD_ENV) != "1":
        return False
    if SimulatedGpus.from_env() is not None:
        return True
    if not device.startswith("cuda"):
        return False
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return shared_gpu_oom(free, total, torch.cuda.max_memory_reserved(device))
