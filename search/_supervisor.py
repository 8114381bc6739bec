"""Local worker processes: one per GPU slot, or K CPU workers splitting the cores.

Workers are processes, never threads: each is `hpsearch worker NAME` started with
`CUDA_VISIBLE_DEVICES` (and the thread count) in its environment, so the pinning is in place
before torch is imported. The supervisor shows the whole study's progress by reading the
storage, forwards Ctrl-C/SIGTERM, and leaves no orphan: workers die with it (PDEATHSIG), and any
worker still alive 8 s after an interrupt is killed and its trial marked interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search._errors import SpecError

if TYPE_CHECKING:
    import optuna

    from search._progress import RunDisplay
    from search._spec import StudySpec

STOP_GRACE_S = 8.0  # Ctrl-C to SIGKILL: within the 10 s a user waits
POLL_S = 1.0
FAKE_GPUS_ENV = "HPSEARCH_FAKE_GPU_COUNT"  # tests of the dispatch logic on GPU-less machines


@dataclass(frozen=True)
class Slot:
    """One worker process: what it runs on."""

    index: int
    device: str  # "cpu" or "cuda" (cuda:0 inside its CUDA_VISIBLE_DEVICES)
    cuda_visible_devices: str  # the GPU id; "" for CPU workers (they see no GPU)
    threads: int


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


def plan_slots(gpus: str, *, trials_per_gpu: int = 1, workers: int | None = None,
               cores: int | None = None, gpu_ids: list[str] | None = None) -> list[Slot]:
    """The worker processes to start for `--gpus`, `--trials-per-gpu` and `--workers`."""
    cores = cores or os.cpu_count() or 1
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
        n = len(ids) * trials_per_gpu
        # CPU threads still matter on a GPU box (data indexing, the optimizer's Python).
        threads = max(1, cores // n)
        return [Slot(i, "cuda", gpu, threads)
                for i, gpu in enumerate(g for g in ids for _ in range(trials_per_gpu))]
    k = workers or 1
    # K workers split the cores: two processes each using every core ran a 20-epoch MLP 33x
    # slower than one (266 s vs 8 s here), from oversubscription.
    threads = max(1, cores // k)
    return [Slot(i, "cpu", "", threads) for i in range(k)]


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
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise(study: optuna.Study, spec: StudySpec, url: str, slots: list[Slot], *,
              display: RunDisplay, timeout_s: float | None) -> int:
    """Start the workers, show progress until they stop, return the exit code."""
    from search._study import budget_of, count_trials

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
        while not interrupted and any(p.poll() is None for p in procs):
            display.poll(study, count_trials(study))
            time.sleep(POLL_S)
        if interrupted:
            display.console.print("interrupted: stopping the workers")
            _stop(procs)
            _mark_interrupted(study, {p.pid for p in procs})
        display.poll(study, count_trials(study))
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
    return 0 if count_trials(study).finished >= budget_of(study, spec) else 1


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
    """Trials our killed workers left RUNNING end as FAIL, marked interrupted (not retried).

    Only ours: other machines' workers may be running trials of the same study.
    """
    import socket

    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or t.user_attrs.get("pid") not in pids:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "ended", "interrupted")
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except Exception:  # already finished by its worker in the meantime: nothing to do
            pass
