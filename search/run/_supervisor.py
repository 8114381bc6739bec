"""Local worker processes: one per GPU slot, or K CPU workers splitting the cores.

Workers are processes, never threads: each is `hpsearch worker NAME` started with
`CUDA_VISIBLE_DEVICES` (and the thread count) in its environment, so the pinning is in place
before torch is imported. The supervisor shows the whole study's progress by reading the
storage, forwards Ctrl-C/SIGTERM, and leaves no orphan: workers die with it (PDEATHSIG), and any
worker still alive 8 s after an interrupt is killed and its trial marked interrupted.
"""

from __future__ import annotations

import ctypes
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
from search.run._objective import TrialOutcome
from search.run._slots import FAKE_GPUS_ENV, Slot
from search.spec import StudySpec
from search.storage import (
    Counts,
    budget_of,
    count_trials,
    requeue_interrupted,
    stop_requested,
    with_retry,
)

STOP_GRACE_S = 8.0  # Ctrl-C to SIGKILL: within the 10 s a user waits
POLL_S = 1.0

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
                   base_env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the worker process for `slot`."""
    env = dict(os.environ if base_env is None else base_env)
    env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    env["OMP_NUM_THREADS"] = str(slot.threads)
    env["MKL_NUM_THREADS"] = str(slot.threads)
    env.pop(FAKE_GPUS_ENV, None)
    argv = [sys.executable, "-m", "search.cli", "worker", name, "--storage", url,
            "--device", slot.device, "--threads", str(slot.threads), "--quiet",
            "--worker-index", str(slot.index)]
    if timeout_s:
        argv += ["--timeout", str(timeout_s)]
    return argv, env

def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the supervisor dies (Linux)."""
    try:

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass

def supervise(study: optuna.Study, spec: StudySpec, url: str, slots: list[Slot], *,
              display: Display, timeout_s: float | None) -> int:
    """Start the workers, show progress until they stop, return the exit code."""
    procs: list[subprocess.Popen[bytes]] = []
    interrupted = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            argv, env = worker_command(slot, spec.name, url, timeout_s=timeout_s)
            procs.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
        display.console.print(
            f"started {len(procs)} worker processes ("
            + ", ".join(f"#{s.index} {s.device}"
                        + (f" GPU {s.cuda_visible_devices}" if s.device == "cuda" else "")
                        + f" {s.threads} thread{'s' * (s.threads > 1)}" for s in slots)
            + ")"
        )
        def show() -> None:
            # The storage may restart under a running study: the progress waits for it, as
            # the workers do, rather than end the run and take every worker with it.
            with_retry(lambda: display.poll(study, count_trials(study)),
                       what="showing progress")

        while not interrupted and any(p.poll() is None for p in procs):
            show()
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
              if p.returncode != 0]
    for index, code in failed:
        display.console.print(f"worker #{index} exited with code {code} (its messages are above)")
    finished = with_retry(lambda: count_trials(study).finished >= budget_of(study, spec),
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
