"""`--trials-per-gpu auto`: how many worker processes share each GPU, decided by measurement.

The supervisor starts one worker per GPU, then reads each GPU's memory and utilization
(`nvidia-smi`, no CUDA in the supervisor) and adds a worker to a GPU while one more of the same
size still fits under the memory margin and the GPU is not already busy. A worker whose trial
runs out of memory on a GPU that others share queues its trial again unchanged and exits with
`EXIT_GPU_FULL`; the supervisor then holds that GPU one worker lower. No trial fails for it.

Light to import (no torch): the supervisor plans with it. `SimulatedGpus` stands in for the
devices in tests on machines without a GPU (`HPSEARCH_FAKE_GPU_MEMORY`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from search._errors import SpecError

EXIT_GPU_FULL = 75  # EX_TEMPFAIL: the worker left its GPU to the others, its trial queued again
YIELD_ENV = "HPSEARCH_GPU_YIELD"  # set on auto workers: a shared-GPU OOM queues the trial again
FAKE_MEMORY_ENV = "HPSEARCH_FAKE_GPU_MEMORY"  # JSON: a simulated device, for tests

MEMORY_MARGIN = 0.85  # of a GPU's memory, the most the workers on it may hold together
BUSY_UTILIZATION = 90.0  # % at or above which another worker only waits for the same GPU
MAX_PER_GPU = 16  # a ceiling: beyond this, trials are better packed (--pack) than added
SETTLE_S = 20.0  # a new worker loads its data and reaches its first epochs before it is measured


@dataclass(frozen=True)
class GpuReading:
    memory_used_mb: float
    memory_total_mb: float
    utilization: float | None  # percent; None where the driver does not say


class GpuProbe(Protocol):
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
    settle_s: float | None = None  # how long a new worker settles (default SETTLE_S)

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


@dataclass
class _Gpu:
    workers: int = 0
    cap: int = MAX_PER_GPU
    changed: float = 0.0  # when a worker was last added or left
    peak_per_worker: float = 0.0  # MB, the most one worker was seen to hold


@dataclass
class GpuFill:
    """The policy: when to add a worker to a GPU, and how an out-of-memory lowers it."""

    gpus: list[str]
    margin: float = MEMORY_MARGIN
    busy: float = BUSY_UTILIZATION
    settle_s: float = SETTLE_S
    state: dict[str, _Gpu] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = {gpu: _Gpu() for gpu in self.gpus}

    @classmethod
    def for_probe(cls, gpus: list[str], probe: GpuProbe | None) -> GpuFill:
        settle = getattr(probe, "settle_s", None)
        return cls(gpus, settle_s=SETTLE_S if settle is None else settle)

    def started(self, gpu: str, now: float) -> None:
        s = self.state[gpu]
        s.workers += 1
        s.changed = now

    def left(self, gpu: str, now: float, *, out_of_memory: bool) -> None:
        """A worker on `gpu` exited; after an out-of-memory the GPU holds one fewer from now."""
        s = self.state[gpu]
        if out_of_memory:
            s.cap = max(1, s.workers - 1)
        s.workers = max(0, s.workers - 1)
        s.changed = now

    def workers(self) -> dict[str, int]:
        return {gpu: s.workers for gpu, s in self.state.items()}

    def grow(self, readings: Mapping[str, GpuReading], now: float) -> list[str]:
        """The GPUs that get one more worker now (at most one each per call)."""
        out = []
        for gpu, s in self.state.items():
            r = readings.get(gpu)
            if r is None or s.workers == 0 or r.memory_total_mb <= 0:
                continue
            s.peak_per_worker = max(s.peak_per_worker, r.memory_used_mb / s.workers)
            if s.workers >= s.cap or now - s.changed < self.settle_s:
                continue
            if r.utilization is not None and r.utilization >= self.busy:
                continue  # the GPU is busy: another worker would only queue for it
            if r.memory_used_mb + s.peak_per_worker > self.margin * r.memory_total_mb:
                continue
            out.append(gpu)
        return out

    def describe(self) -> str:
        return ", ".join(f"GPU {gpu}: {s.workers}"
                         + (f" (held at {s.cap} after an out-of-memory)"
                            if s.cap < MAX_PER_GPU else "")
                         for gpu, s in self.state.items())


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
