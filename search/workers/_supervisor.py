"""Local worker processes: one per GPU slot, or K CPU workers splitting the cores.

Workers are processes, never threads: each is `hpsearch worker NAME` started with
`CUDA_VISIBLE_DEVICES` (and the thread count) in its environment, so the pinning is in place
before torch is imported. The supervisor shows the whole study's progress by reading the
storage, forwards Ctrl-C/SIGTERM, and leaves no orphan: workers die with it (PDEATHSIG), and any
worker still alive 8 s after an interrupt is killed and its trial marked interrupted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

import trainers
from search._process import die_with_parent
from search.spec import StudySpec
from search.storage import (
    Counts,
    budget_of,
    count_trials,
    requeue_interrupted,
    stop_requested,
    with_retry,
)
from search.trial import YIELD_ENV, GpuProbe, SimulatedGpus, TrialOutcome
from search.workers._gpu_fill import EXIT_GPU_FULL, GpuFill
from search.workers._slots import FAKE_GPUS_ENV, Slot, usable_cores

STOP_GRACE_S = 8.0  # Ctrl-C to SIGKILL: within the 10 s a user waits
POLL_S = 1.0
FILL_EVERY_S = 5.0  # --trials-per-gpu auto: how often the GPUs are read

class Display(Protocol):
    """What `run` shows: see `search.views.RunDisplay`."""

    console: Any

    def __enter__(self) -> Display: ...

    def __exit__(self, *exc: object) -> None: ...

    def start(self, counts: Counts, resumed: bool, study: optuna.Study | None = None) -> None: ...

    def epoch(self, number: int, m: trainers.EpochMetrics) -> None: ...

    def trial(self, study: optuna.Study, outcome: TrialOutcome, counts: Counts) -> None: ...

    def poll(self, study: optuna.Study, counts: Counts) -> None: ...

    def finish(self, study: optuna.Study, counts: Counts, storage_hint: str,
               dashboard: str) -> None: ...

def worker_command(slot: Slot, name: str, url: str, *, timeout_s: float | None,
                   base_env: Mapping[str, str] | None = None,
                   yield_gpu: bool = False, pack: int | str | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the worker process for `slot`; `yield_gpu`: a trial that runs
    out of memory on its shared GPU is queued again and the worker exits (`EXIT_GPU_FULL`);
    `pack`: the `--pack` asked for on the command line (else the study file's)."""
    env = dict(os.environ if base_env is None else base_env)
    env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    env["OMP_NUM_THREADS"] = str(slot.threads)
    env["MKL_NUM_THREADS"] = str(slot.threads)
    env.pop(FAKE_GPUS_ENV, None)
    env.pop(YIELD_ENV, None)
    if yield_gpu:
        env[YIELD_ENV] = "1"
    device = slot.device
    if device == "cuda" and SimulatedGpus.from_env(env) is not None:
        device = "cpu"  # a simulated GPU's workers train on the CPU
    argv = [sys.executable, "-m", "search.cli", "worker", name, "--storage", url,
            "--device", device, "--threads", str(slot.threads), "--quiet",
            "--worker-index", str(slot.index)]
    if timeout_s:
        argv += ["--timeout", str(timeout_s)]
    if pack is not None:
        argv += ["--pack", str(pack)]
    return argv, env

def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the supervisor dies (Linux)."""
    die_with_parent(signal.SIGTERM)

def supervise(study: optuna.Study, spec: StudySpec, url: str, slots: list[Slot], *,
              display: Display, timeout_s: float | None,
              fill: GpuFill | None = None, probe: GpuProbe | None = None,
              pack: int | str | None = None) -> int:
    """Start the workers, show progress until they stop, return the exit code.

    With `fill` (`--trials-per-gpu auto`), workers are added to a GPU while they fit, read
    through `probe`, and a GPU that ran out of memory is held one worker lower.
    """
    procs: list[subprocess.Popen[bytes]] = []
    slots = list(slots)
    started = len(slots)  # the initial workers; `fill` appends to `slots` and `procs`
    interrupted = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            argv, env = worker_command(slot, spec.name, url, timeout_s=timeout_s,
                                       yield_gpu=fill is not None, pack=pack)
            procs.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
            if fill is not None:
                fill.started(slot.cuda_visible_devices, time.monotonic())
        display.console.print(
            f"started {len(procs)} worker processes ("
            + ", ".join(f"#{s.index} {s.device}"
                        + (f" GPU {s.cuda_visible_devices}" if s.device == "cuda" else "")
                        + (f" {s.ranks} ranks" if s.ranks > 1 else "")
                        + f" {s.threads} thread{'s' * (s.threads > 1)}" for s in slots)
            + ")"
        )
        def show() -> None:
            # The storage may restart under a running study: the progress waits for it, as
            # the workers do, rather than end the run and take every worker with it.
            with_retry(lambda: display.poll(study, count_trials(study)),
                       what="showing progress")

        filled = _Filler(study, spec, url, slots, procs, fill, probe, display,
                         timeout_s=timeout_s, pack=pack) if fill is not None else None
        while not interrupted and any(p.poll() is None for p in procs):
            show()
            if filled is not None:
                with_retry(filled.step, what="adding workers to the GPUs")
            time.sleep(POLL_S)
        if interrupted:
            display.console.print("interrupted: stopping the workers")
            _stop(procs)
            with_retry(lambda: _mark_interrupted(study, {p.pid for p in procs}),
                       what="marking the interrupted trials")
        show()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for p in procs:  # never leave one behind, whatever happened above
            if p.poll() is None:
                p.kill()
                p.wait()
    if interrupted:
        return 130
    # The exit code says whether the budget was met; a worker that failed is reported, and
    # decides the code only when the study fell short.
    failed = [(slot.index, p.returncode) for slot, p in zip(slots, procs, strict=True)
              if p.returncode not in (0, EXIT_GPU_FULL)]
    if fill is not None and len(slots) > started:
        display.console.print(f"workers per GPU at the end: {fill.describe()}")
    for index, code in failed:
        display.console.print(f"worker #{index} exited with code {code} (its messages are above)")
    return exit_code(study, spec, display)


def exit_code(study: optuna.Study, spec: StudySpec, display: Display) -> int:
    """Once the workers have stopped (local or on a cluster): 0 when the budget was met or
    `hpsearch stop` asked for it, else 1 (their failures were shown)."""
    finished = with_retry(
        lambda: count_trials(study).finished >= budget_of(study, spec.budget.trials),
        what="counting the trials")
    stopped = with_retry(lambda: stop_requested(study), what="reading the study")
    if stopped and not finished:
        display.console.print("stopped by `hpsearch stop`: the interrupted trials resume from "
                              "their checkpoints when the study runs again")
    return 0 if finished or stopped else 1


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()

def _mark_interrupted(study: optuna.Study, pids: set[int]) -> None:
    """Trials our stopped workers left RUNNING (or ended "interrupted" without queueing them
    again) end as FAIL "interrupted" and are queued again: the next `run` resumes them.

    Only ours: other machines' workers may be running trials of the same study.
    """
    host = socket.gethostname()
    ours = {t.number for t in study.get_trials(deepcopy=False,
                                               states=(TrialState.RUNNING, TrialState.FAIL))
            if t.user_attrs.get("host") == host and t.user_attrs.get("pid") in pids}
    requeue_interrupted(study, ours)


class _Filler:
    """`--trials-per-gpu auto` inside the supervisor's loop: workers that left after an
    out-of-memory lower their GPU; a GPU with room and work waiting gets one more."""

    def __init__(self, study: optuna.Study, spec: StudySpec, url: str, slots: list[Slot],
                 procs: list[subprocess.Popen[bytes]], fill: GpuFill, probe: GpuProbe | None,
                 display: Display, *, timeout_s: float | None,
                 pack: int | str | None = None) -> None:
        self.study, self.spec, self.url, self.pack = study, spec, url, pack
        self.slots, self.procs, self.fill, self.probe = slots, procs, fill, probe
        self.display = display
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.seen_exit: set[int] = set()
        self.last = 0.0
        self.cores = usable_cores()

    def step(self) -> None:
        now = time.monotonic()
        for i, (slot, p) in enumerate(zip(self.slots, self.procs, strict=True)):
            if i in self.seen_exit or p.poll() is None:
                continue
            self.seen_exit.add(i)
            gpu, oom = slot.cuda_visible_devices, p.returncode == EXIT_GPU_FULL
            self.fill.left(gpu, now, out_of_memory=oom)
            if oom:
                self.display.console.print(
                    f"worker #{slot.index} ran out of memory on GPU {gpu}, shared with others: "
                    f"its trial is queued again unchanged, and GPU {gpu} keeps at most "
                    f"{self.fill.state[gpu].cap} worker(s) from now")
                if self.fill.state[gpu].workers == 0 and not self._budget_met():
                    # The last one on its GPU: it comes back, and an out-of-memory alone is
                    # the trial's own (recorded as a failure, as without auto).
                    self._start(gpu, yield_gpu=False)
        if now - self.last < min(FILL_EVERY_S, self.fill.settle_s) or self.probe is None:
            return
        self.last = now
        counts = count_trials(self.study)
        live = sum(p.poll() is None for p in self.procs)
        # Another worker only helps when every live one is busy and trials remain to start.
        if counts.finished + counts.running >= budget_of(self.study, self.spec.budget.trials) or \
                counts.running < live:
            return
        readings = self.probe.read(self.fill.workers())
        for gpu in self.fill.grow(readings, now):
            r = readings[gpu]
            index = self._start(gpu, yield_gpu=True)
            busy = f", {r.utilization:.0f}% busy" if r.utilization is not None else ""
            self.display.console.print(
                f"GPU {gpu}: {r.memory_used_mb:.0f}/{r.memory_total_mb:.0f} MB used{busy}: "
                f"started worker #{index} there ({self.fill.state[gpu].workers} on it now)")

    def _budget_met(self) -> bool:
        return count_trials(self.study).finished >= budget_of(self.study, self.spec.budget.trials)

    def _start(self, gpu: str, *, yield_gpu: bool) -> int:
        live = sum(p.poll() is None for p in self.procs)
        slot = Slot(len(self.slots), "cuda", gpu, max(1, self.cores // (live + 1)))
        left = max(1.0, self.deadline - time.monotonic()) if self.deadline else None
        argv, env = worker_command(slot, self.spec.name, self.url, timeout_s=left,
                                   yield_gpu=yield_gpu, pack=self.pack)
        self.procs.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
        self.slots.append(slot)
        self.fill.started(gpu, time.monotonic())
        return slot.index
