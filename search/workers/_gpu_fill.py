"""`--trials-per-gpu auto`: how many worker processes share each GPU, decided by measurement.

The supervisor starts one worker per GPU, then reads each GPU's memory and utilization
(`search.trial`'s GPU readings: `nvidia-smi`, no CUDA in the supervisor) and adds a worker to a
GPU while one more of the same size still fits under the memory margin and the GPU is not
already busy. A worker whose trial runs out of memory on a GPU that others share queues its
trial again unchanged and exits with `EXIT_GPU_FULL`; the supervisor then holds that GPU one
worker lower. No trial fails for it.

Light to import (no torch): the supervisor plans with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from search.trial import BUSY_UTILIZATION, MEMORY_MARGIN, GpuProbe, GpuReading

EXIT_GPU_FULL = 75  # EX_TEMPFAIL: the worker left its GPU to the others, its trial queued again
MAX_PER_GPU = 16  # a ceiling: beyond this, trials are better packed (--pack) than added
SETTLE_S = 20.0  # a new worker loads its data and reaches its first epochs before it is measured


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
