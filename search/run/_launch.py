"""`run` and `worker`: a study created or joined, then trials run until the budget is met.

One worker runs in this process; several run as supervised child processes, each pinned to its
slot. A child started by a supervisor runs with no display and ends on SIGTERM as on Ctrl-C.
What is shown comes from the `Display` the caller passes in (`search.views.RunDisplay`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import optuna

from search._errors import SpecError
from search._urls import redact, resolve_url
from search.run._lr_find import for_new_study, needs_test
from search.run._studies import load
from search.run._study import create_or_load, reseed
from search.run._warm_start import load_source, parse_source, warm_start
from search.spec import StudySpec, auto_lr_key
from search.storage import (
    backend_of,
    budget_lock,
    budget_of,
    checkpoint_location,
    clear_stop,
    count_trials,
    open_storage,
    requeue_left,
    stop_requested,
    storage_of,
)
from search.trial import default_probe
from search.workers import (
    EXIT_GPU_FULL,
    GPU_FULL,
    Display,
    GpuFill,
    RayRequest,
    Slot,
    WorkerError,
    WorkerSummary,
    check_width,
    connect_ray,
    run_worker,
    supervise,
    supervise_ray,
    widen,
)


@dataclass(frozen=True)
class Launch:
    """What `run` or `worker` was asked for (None: the study file's or the default)."""

    storage: str | None = None
    trials: int | None = None
    timeout_s: float | None = None
    create_only: bool = False
    lr_find: bool = False
    warm_start: str | None = None
    warm_start_storage: str | None = None
    device: str | None = None
    threads: int | None = None
    worker_index: int | None = None  # set on the processes a supervisor starts
    fill_gpus: bool = False  # --trials-per-gpu auto on GPUs: add workers while they fit
    unless_stopped: bool = False  # a study paused by `hpsearch stop` is left paused (Slurm)
    ray: RayRequest | None = None  # --ray: the workers are Ray actors on a Ray cluster
    pack: int | str | None = None  # --pack K|auto: trials trained at once per worker
    trials_per_gpu: int | str = "auto"  # --trials-per-gpu: refused above 1 for wide trials

def run_study(launch: Launch, slots: list[Slot], *, spec: StudySpec | None = None,
              name: str | None = None,
              display: Callable[[StudySpec, int], Display] | None = None) -> int:
    """Create (`spec`) or join (`name`) the study and run its trials; the exit code."""
    if launch.ray is not None:  # before the storage: an unreachable cluster writes nothing
        connect_ray(launch.ray)
    url = resolve_url(launch.storage)
    if spec is not None:  # `run`: a width this machine cannot hold is refused before storage
        launch, slots = _widened(launch, slots, spec)
    study, spec = _open(launch, url, spec=spec, name=name)
    if name is not None:
        launch, slots = _widened(launch, slots, spec)
    done = _before_workers(launch, study, spec, url)
    if done is not None:
        return done
    timeout = launch.timeout_s or spec.budget.timeout_s
    # Each process its own seed: the supervisor's children by index, a joining worker by pid.
    reseed(study, spec, launch.worker_index if launch.worker_index is not None
           else (0 if name is None else None))
    if launch.worker_index is not None or display is None:
        return _child_worker(study, spec, launch, timeout, url)
    return _shown(launch, slots, study, spec, url, display, timeout)


def _widened(launch: Launch, slots: list[Slot], spec: StudySpec) -> tuple[Launch, list[Slot]]:
    """The slots for the study's trial width (`resources`); a wide trial takes its GPUs whole,
    so no more workers are added to a GPU as they fit."""
    if spec.resources.width == 1 or launch.worker_index is not None:
        return launch, slots  # (a supervised worker's slot is planned already)
    if launch.ray is not None:  # Ray places the trials: refused here, before storage
        check_width(launch.ray, spec.resources, pack=_pack(launch, spec))
        return launch, slots
    slots = widen(slots, spec.resources, trials_per_gpu=launch.trials_per_gpu,
                  pack=_pack(launch, spec))
    if len(slots) == 1 and slots[0].device == "cuda":  # one worker, in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = slots[0].cuda_visible_devices
    return replace(launch, fill_gpus=False), slots


def _open(launch: Launch, url: str, *, spec: StudySpec | None, name: str | None
          ) -> tuple[optuna.Study, StudySpec]:
    """The study created from `spec`, or joined by `name`, in a storage opened with the
    spec's heartbeat settings."""
    if spec is None:
        # A worker learns the heartbeat settings from the stored spec: open once to read it.
        _, spec = load(name, open_storage(url, must_exist=True))
    checkpoint_location(spec.run.checkpoint_dir, url)  # refused before a study is created
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    if name is None:
        return _create(launch, spec, storage)
    return load(name, storage)


def _before_workers(launch: Launch, study: optuna.Study, spec: StudySpec, url: str
                    ) -> int | None:
    """What is done before any worker starts: the exit code when none will (`--create-only`,
    a stopped study under `--unless-stopped`), else None after resuming a stopped study and
    queueing its interrupted trials again."""
    if launch.create_only:
        counts = count_trials(study)
        print(f"study {spec.name!r} ready in {redact(url)}: {counts.finished}/"
              f"{budget_of(study, spec.budget.trials)} trials finished; workers join with "
              f"`hpsearch worker {spec.name} --storage URL`")
        return 0
    if launch.unless_stopped and stop_requested(study):
        print(f"study {spec.name!r} is stopped (`hpsearch stop`): this worker ends; "
              f"`hpsearch slurm` or `hpsearch worker` resumes it", flush=True)
        return 0
    if launch.worker_index is not None:
        return None
    if clear_stop(study):
        # A `run` or a joining `worker` after `hpsearch stop`: the study resumes, and its
        # interrupted trials (queued again) are the first taken.
        print(f"resuming study {spec.name!r} after `hpsearch stop`", flush=True)
    # An interrupted worker queues its trial again itself; one killed while it did (its
    # supervisor killed, a second signal) leaves it to the next `run` or `worker`.
    requeued = requeue_left(study, budget_lock(url, spec.name))
    if requeued:
        print(f"queued {len(requeued)} interrupted trial(s) again to resume: "
              + ", ".join(f"#{n}" for n in requeued), flush=True)
    return None


def _shown(launch: Launch, slots: list[Slot], study: optuna.Study, spec: StudySpec, url: str,
           display: Callable[[StudySpec, int], Display], timeout: float | None) -> int:
    """The study's workers, with the progress shown: on Ray, supervised child processes, or
    one worker in this process."""
    budget = budget_of(study, spec.budget.trials)
    counts = count_trials(study)
    hint = f" --storage {redact(launch.storage)}" if launch.storage else ""
    with display(spec, budget) as shown:
        shown.start(counts, resumed=counts.finished + counts.failed > 0, study=study)
        if launch.ray is not None:
            code = supervise_ray(study, spec, url, launch.ray, display=shown, timeout_s=timeout,
                                 pack=launch.pack)
            shown.finish(study, count_trials(study), hint, redact(url))
            return code
        if len(slots) > 1 or launch.fill_gpus:
            probe = default_probe() if launch.fill_gpus else None
            fill = (GpuFill.for_probe([s.cuda_visible_devices for s in slots], probe)
                    if launch.fill_gpus else None)
            code = supervise(study, spec, url, slots, display=shown, timeout_s=timeout,
                             fill=fill, probe=probe, pack=launch.pack)
            shown.finish(study, count_trials(study), hint, redact(url))
            return code
        try:
            summary = _one_worker(launch, slots[0], study, spec, url, shown, timeout)
        except WorkerError as e:
            shown.console.print(f"[red]error:[/] {e}")
            shown.finish(study, count_trials(study), hint, redact(url))
            return 1
    counts = count_trials(study)
    shown.finish(study, counts, hint, redact(url))
    if summary.stopped == "stop requested":
        shown.console.print("stopped by `hpsearch stop`: the interrupted trial resumes from its "
                            "checkpoint when the study runs again")
    if summary.stopped == "timeout" and counts.finished < budget:
        shown.console.print(f"stopped by the timeout ({timeout:g} s) with {counts.finished}/"
                            f"{budget} trials finished; run the same command again to continue")
    return 0


def _one_worker(launch: Launch, slot: Slot, study: optuna.Study, spec: StudySpec, url: str,
                shown: Display, timeout: float | None) -> WorkerSummary:
    """One worker in this process, its trials and epochs shown."""
    device = launch.device or ("cuda" if slot.device == "cuda" else None)
    # SIGTERM (a container stopped, a pod evicted, a Slurm task preempted) ends the trial
    # as Ctrl-C does: checkpointed and queued again. As a container's PID 1 this process
    # would otherwise ignore it until killed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_worker(
            study, spec, device=device, timeout_s=timeout, lock=budget_lock(url, spec.name),
            on_trial=lambda s, t: shown.trial(s, t, count_trials(s)),
            on_epoch=shown.epoch, pack=_pack(launch, spec),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _create(launch: Launch, spec: StudySpec, storage: Any) -> tuple[optuna.Study, StudySpec]:
    """`run`: the LR range test when asked for, the study, then any warm start."""
    source = None
    if launch.warm_start:  # a bad source is refused before anything is created
        source_name, k = parse_source(launch.warm_start)
        label = None
        source_storage = storage
        if launch.warm_start_storage:
            label = redact(resolve_url(launch.warm_start_storage))
            source_storage = open_storage(launch.warm_start_storage, must_exist=True)
        source = load_source(source_name, source_storage, target=spec.name, storage_label=label)
    elif launch.warm_start_storage:
        raise SpecError("--warm-start-storage: goes with --warm-start STUDY[:k]")
    lr_find = None
    if needs_test(spec, force=launch.lr_find):
        spec, lr_find = for_new_study(spec, storage, device=launch.device)
    study = create_or_load(spec, storage, trials=launch.trials, lr_find=lr_find)
    if auto_lr_key(spec) is not None:  # an existing study: its stored lr range is the one
        study, spec = load(spec.name, storage)
    if source is not None:
        print(warm_start(study, spec, source, k=k, storage_label=label).describe(), flush=True)
    return study, spec

def _pack(launch: Launch, spec: StudySpec) -> int | str | None:
    """Trials per worker at once: `--pack` over the study file's `run.pack`."""
    return launch.pack if launch.pack is not None else spec.run.pack


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _child_worker(study: optuna.Study, spec: StudySpec, launch: Launch,
                  timeout: float | None, url: str) -> int:
    """A worker process started by a supervisor: no display, SIGTERM ends it like Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_worker(study, spec, device=launch.device, threads=launch.threads,
                             timeout_s=timeout, lock=budget_lock(url, spec.name),
                             pack=_pack(launch, spec))
        if summary.stopped == GPU_FULL:
            return EXIT_GPU_FULL  # its supervisor holds this GPU one worker lower
    except WorkerError as e:
        print(f"worker {launch.worker_index}: {e}", file=sys.stderr)
        return 1
    finally:
        # A gRPC proxy client left open races the interpreter's exit (epoll errors, a
        # non-zero code): close it while the process is still whole.
        close = getattr(backend_of(storage_of(study)), "close", None)
        if callable(close):
            close()
    return 0
