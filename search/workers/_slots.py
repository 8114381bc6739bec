"""Worker slots: which processes `run` starts, on which GPU, with how many CPU threads.

Light to import (no torch, no CUDA): a single GPU worker is pinned here, with
`CUDA_VISIBLE_DEVICES`, before anything loads torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from search._errors import SpecError

if TYPE_CHECKING:
    from search.spec import Resources

FAKE_GPUS_ENV = "HPSEARCH_FAKE_GPU_COUNT"  # tests of the dispatch logic on GPU-less machines


@dataclass(frozen=True)
class Slot:
    """One worker process: what it runs on."""

    index: int
    device: str  # "cpu" or "cuda" (cuda:0 inside its CUDA_VISIBLE_DEVICES)
    cuda_visible_devices: str  # the GPU ids ("2,3" for a trial of two); "" for CPU workers
    threads: int  # CPU threads of each of its processes
    ranks: int = 1  # processes a trial (`resources`): they share its GPUs, a GPU each


def visible_gpu_ids(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use, found without importing torch (or initializing CUDA)."""
    env = os.environ if env is None else env
    if env.get(FAKE_GPUS_ENV) is not None:
        return [str(i) for i in range(int(env[FAKE_GPUS_ENV]))]
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        ids = [x.strip() for x in env["CUDA_VISIBLE_DEVICES"].split(",") if x.strip()]
        # "-1" (or any invalid id) hides every GPU from CUDA, and the ids after it too.
        out = []
        for x in ids:
            if x.startswith("-"):
                break
            out.append(x)
        return out
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.stdout.splitlines())
            if line.startswith("GPU ")]


def usable_cores() -> int:
    """The cores this process may run on: a Slurm or container allocation, not the node's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_slots(gpus: str, *, trials_per_gpu: int | str = 1, workers: int | None = None,
               cores: int | None = None, gpu_ids: list[str] | None = None) -> list[Slot]:
    """The worker processes to start for `--gpus`, `--trials-per-gpu` and `--workers`.

    `trials_per_gpu="auto"` starts one per GPU; the supervisor adds more as they fit
    (`search.workers._gpu_fill`).
    """
    cores = cores or usable_cores()
    available = visible_gpu_ids() if gpu_ids is None else gpu_ids
    if gpus == "none":
        ids: list[str] = []
    elif gpus == "auto":
        ids = available
    else:
        ids = [x.strip() for x in gpus.split(",")]
        bad = [x for x in ids if not x.isdigit()]
        if bad or not ids:
            raise SpecError(f"--gpus: expected auto, none or GPU ids like 0,1, got {gpus!r}")
        missing = [x for x in ids if x not in available]
        if missing:
            raise SpecError(f"--gpus: GPU {', '.join(missing)} not visible here "
                            f"(visible: {', '.join(available) or 'none'})")
    if ids:
        if workers is not None:
            raise SpecError("--workers: with GPUs the workers are one per GPU slot; "
                            "use --trials-per-gpu M for more per GPU, or --gpus none for CPU")
        per_gpu = 1 if trials_per_gpu == "auto" else int(trials_per_gpu)
        n = len(ids) * per_gpu
        # CPU threads still matter on a GPU box (data indexing, the optimizer's Python).
        threads = max(1, cores // n)
        return [Slot(i, "cuda", gpu, threads)
                for i, gpu in enumerate(g for g in ids for _ in range(per_gpu))]
    k = workers or 1
    # K workers split the cores: two processes each using every core ran a 20-epoch MLP 33x
    # slower than one (266 s vs 8 s here), from oversubscription.
    threads = max(1, cores // k)
    return [Slot(i, "cpu", "", threads) for i in range(k)]


def widen(slots: list[Slot], resources: Resources, *, trials_per_gpu: int | str = "auto",
          pack: int | str | None = None, cores: int | None = None,
          say: Callable[[str], None] = print) -> list[Slot]:
    """The slots for trials of `resources.width` processes each: with ``gpus: N``, N GPUs a
    slot (those left over stay idle, said in one line); with ``processes: N``, the same slots
    with N ranks each sharing its device, max(1, cores ÷ (slots·N)) threads a rank. A width
    the machine cannot hold, `--trials-per-gpu` above 1 or `--pack` is a SpecError."""
    width = resources.width
    if width == 1:
        return slots
    check_sharing(resources, trials_per_gpu=trials_per_gpu, pack=pack)
    cores = cores or usable_cores()
    if resources.gpus is None:
        if width > cores:
            raise SpecError(f"resources.processes: {width} processes a trial, and this machine "
                            f"has {cores} cores")
        threads = max(1, cores // (len(slots) * width))
        return [replace(s, threads=threads, ranks=width) for s in slots]
    ids = list(dict.fromkeys(s.cuda_visible_devices for s in slots if s.device == "cuda"))
    if len(ids) < width:
        raise SpecError(f"resources.gpus: {width} GPUs a trial, and this machine has "
                        f"{len(ids)} visible ({', '.join(ids) or 'none'})")
    groups = [ids[i:i + width] for i in range(0, len(ids) - width + 1, width)]
    idle = ids[len(groups) * width:]
    if idle:
        say(f"GPU {', '.join(idle)} stay idle: {len(ids)} GPUs make {len(groups)} trial "
            f"slot(s) of {width} (resources.gpus)")
    threads = max(1, cores // (len(groups) * width))
    return [Slot(i, "cuda", ",".join(group), threads, ranks=width)
            for i, group in enumerate(groups)]


def check_sharing(resources: Resources, *, trials_per_gpu: int | str,
                  pack: int | str | None) -> None:
    """SpecError (exit 2) for what a wide trial cannot share: its GPUs with other trials
    (`--trials-per-gpu` above 1) or its process with a pack (`--pack`)."""
    if isinstance(trials_per_gpu, int) and trials_per_gpu > 1:
        raise SpecError(f"--trials-per-gpu {trials_per_gpu}: a trial of {resources.label} "
                        "(resources) takes its devices whole; leave --trials-per-gpu out")
    if pack not in (None, 1):
        raise SpecError(f"--pack {pack}: a trial of {resources.label} (resources) runs "
                        "alone; leave --pack out")


def plan(gpus: str, *, trials_per_gpu: int | str = 1, workers: int | None = None,
         worker_index: int | None = None, device: str | None = None,
         threads: int | None = None) -> list[Slot]:
    """The worker processes `run` starts; with one on a GPU, this process is pinned to it."""
    if worker_index is not None:  # started by a supervisor: already pinned
        return [Slot(worker_index, device or "auto", "", threads or 1)]
    slots = plan_slots(gpus, trials_per_gpu=trials_per_gpu, workers=workers)
    if len(slots) == 1 and slots[0].device == "cuda" and trials_per_gpu != "auto":
        # (auto: a supervisor runs even one GPU's workers, to add more as they fit)
        os.environ["CUDA_VISIBLE_DEVICES"] = slots[0].cuda_visible_devices
    return slots
