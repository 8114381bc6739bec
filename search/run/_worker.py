"""A worker: runs trials of one study until the global budget is met.

The budget counts COMPLETE + PRUNED trials of every worker; the storage admits each new trial
against it (`search.storage.worker_study`). When the running trials would meet the budget the
worker waits rather than start another, and a dead worker's trial comes back as a WAITING retry
that a waiting worker picks up.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from search._errors import SearchError
from search.run._artifacts import ArtifactRecorder, write_study_note
from search.run._objective import (
    GpuFull,
    Objective,
    PackTooBig,
    StopRequested,
    say_dropped,
)
from search.run._packing import PackedTrials
from search.run._user_trainer import UserObjective
from search.spec import real_value_attrs
from search.storage import (
    BudgetReached,
    Counts,
    DatabaseLock,
    FileLock,
    NullLock,
    WorkerHeartbeat,
    beat_written,
    budget_of,
    checkpoint_location,
    close_waiting,
    count_trials,
    is_connection_error,
    remove_finished_checkpoints,
    requeue_interrupted,
    set_budget,
    storage_error,
    storage_of,
    storage_url_of,
    taken_over,
    trial_id_of,
    with_retry,
    worker_study,
)

if TYPE_CHECKING:
    import optuna

    import trainers
    from search.run._artifacts import ArtifactRecorder
    from search.run._objective import TrialOutcome
    from search.spec import StudySpec

POLL_S = 1.0
BUDGET_REFRESH_S = 30.0
GPU_FULL = "gpu full"  # WorkerSummary.stopped: a shared-GPU out-of-memory, the trial queued again

class WorkerError(SearchError):
    """The worker gave up (for instance after too many failed trials in a row)."""

@dataclass
class WorkerSummary:
    trials: int = 0
    failed_in_row: int = 0
    stopped: str = ""  # why the worker stopped: budget, timeout, failures

def _not_a_stop(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "StopRequested(" not in message and "TakenOver(" not in message


def run_worker(
    study: optuna.Study,
    spec: StudySpec,
    *,
    device: str | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    on_trial: Callable[[optuna.Study, TrialOutcome], None] | None = None,
    on_epoch: Callable[[int, trainers.EpochMetrics], None] | None = None,
    on_wait: Callable[[Counts], None] | None = None,
    lock: NullLock | FileLock | DatabaseLock | None = None,
    artifacts: ArtifactRecorder | None | bool = True,
    pack: int | str | None = None,
) -> WorkerSummary:
    """Run trials until the study's budget is met or `timeout_s` passes; return a summary.

    `artifacts`: True records each trial's charts and metrics in the store next to the storage
    (or $HPSEARCH_ARTIFACTS), a recorder records them there, False/None records none. `pack`:
    up to that many trials trained at once (`search.run._packing`; "auto" picks it from the
    model's size), for a study trained by the built-in trainer; None or 1 trains one at a time.
    """

    write_study_note(study, spec)  # once per study: kept if present (or edited by hand)
    if artifacts is True:
        artifacts = ArtifactRecorder.for_study(study)  # a bad $HPSEARCH_ARTIFACTS stops here
    recorder = artifacts if isinstance(artifacts, ArtifactRecorder) else None
    checkpoint_root = checkpoint_location(spec.run.checkpoint_dir,
                                          storage_url_of(storage_of(study)))
    # A user's trainer is imported (or its program found) here, before any trial is taken.
    heartbeat = WorkerHeartbeat(study)
    kind = Objective if spec.trainer is None else UserObjective
    objective = kind(spec, device=device, threads=threads, checkpoint_root=checkpoint_root,
                     on_epoch=on_epoch, artifacts=recorder, stop=heartbeat.stop.is_set)
    summary = WorkerSummary()
    deadline = time.monotonic() + timeout_s if timeout_s else math.inf
    # Optuna logs every trial at INFO; the progress display says it better. A trial stopped by
    # `hpsearch stop`, or taken over while this worker was paused, is no failure to show a
    # traceback for.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_not_a_stop)

    def read_budget() -> int:
        return with_retry(lambda: budget_of(study, spec), what="reading the budget")

    budget, budget_read = read_budget(), time.monotonic()
    lock = lock or NullLock()
    # Trials start through a view that checks the budget in the transaction creating the trial
    # and writes its first beat there (Optuna's per-trial heartbeat off: ours beats).
    optimizing = worker_study(study, budget, created_attrs=objective.creation_attrs(),
                              param_attrs=real_value_attrs(spec))
    storage_admits = optimizing is not study

    def run_trial(trial: optuna.Trial) -> float | list[float]:
        lock.release()  # the new trial exists: others may count it now
        trial_id, written = trial_id_of(trial), beat_written(optimizing, trial)
        with_retry(lambda: heartbeat.begin(trial_id, written=written),
                   what="starting a trial")
        try:
            return objective(trial)
        finally:
            heartbeat.end()

    def room() -> None:
        if not storage_admits:  # the gRPC proxy: count first (no lock there either)
            counts = with_retry(lambda: count_trials(study), what="counting trials")
            if counts.finished >= budget or (counts.finished + counts.running >= budget
                                             and counts.waiting == 0):
                raise BudgetReached(counts)

    packed = (PackedTrials(objective, optimizing, heartbeat, lock, pack, room)
              if pack not in (None, 1) and spec.trainer is None else None)

    def start_trial() -> list[TrialOutcome | None]:
        if packed is not None:  # near the timeout the pack drains: its trials run to their end
            return packed.step(deadline=deadline)
        room()
        # No Optuna callback: it would read the finished trial back from the storage, and the
        # objective already knows how the trial ended.
        optimizing.optimize(run_trial, n_trials=1, catch=(Exception,), gc_after_trial=False)
        objective.clear_checkpoints()
        return [objective.last]

    try:
        while True:
            # Dead workers' trials fail (and queue their retries) before they are counted.
            with_retry(lambda: heartbeat.fail_stale(lock=lock), what="checking for dead workers")
            if time.monotonic() - budget_read > BUDGET_REFRESH_S:
                # `run --trials` elsewhere may have moved the budget: read it now and then
                # (and before stopping), not before every trial: it is one more query.
                budget, budget_read = read_budget(), time.monotonic()
                set_budget(optimizing, budget)
            training = packed is not None and len(packed) > 0  # it ends them first
            if time.monotonic() >= deadline and not training:
                summary.stopped = "timeout"
                break
            if heartbeat.stop.is_set() and not training:  # `hpsearch stop`, by the heartbeat
                summary.stopped = "stop requested"
                break
            # SQLite and MySQL: held from the budget check until this worker's trial exists,
            # so two workers never both take the last slot (PostgreSQL: the study's row lock).
            with_retry(lock.acquire, what="taking the budget lock")
            try:
                objective.current = None
                outcomes = start_trial()
            except KeyboardInterrupt as interrupt:
                # Ctrl-C, SIGTERM or `hpsearch stop` in the middle of a trial: it ended FAIL
                # "interrupted"; queued again, it resumes from its checkpoints at the next
                # `run` or `worker`, on any machine.
                lock.release()
                ended = (packed.interrupted if packed is not None
                         else {objective.current} - {None})
                if ended:
                    lock.acquire()  # not while another worker fails stale trials or queues
                    try:
                        with_retry(lambda e=ended: requeue_interrupted(study, e),
                                   what="queueing the interrupted trials again")
                    finally:
                        lock.release()
                if packed is not None:
                    packed.interrupted.clear()
                if isinstance(interrupt, PackTooBig):
                    continue  # queued again above: the smaller pack takes them
                if isinstance(interrupt, GpuFull):
                    print(f"trial #{objective.current}: {interrupt}", file=sys.stderr,
                          flush=True)
                    summary.stopped = GPU_FULL
                    break
                if not isinstance(interrupt, StopRequested):
                    raise
                summary.stopped = "stop requested"
                break
            except BudgetReached as full:
                lock.release()
                counts = full.counts
                if counts.finished >= budget:
                    budget, budget_read = read_budget(), time.monotonic()
                    set_budget(optimizing, budget)
                    if counts.finished >= budget:
                        summary.stopped = "budget"
                        if counts.waiting:  # nothing may wait forever once the budget is met
                            with_retry(lambda: close_waiting(
                                study, "not run: the budget was met before this waiting trial "
                                       "was taken"), what="closing waiting trials")
                        with_retry(lambda: remove_finished_checkpoints(
                            study, Path(checkpoint_root), spec.run.keep_checkpoints),
                            what="removing the study's checkpoints")
                        break
                    continue
                if counts.waiting:  # a retry was queued meanwhile: take it
                    continue
                # The last trials are running elsewhere. Fail the stale ones (dead workers)
                # so their retries get queued, then look again.
                with_retry(lambda: heartbeat.fail_stale(now=True, lock=lock),
                           what="checking for dead workers")
                if on_wait is not None:
                    on_wait(counts)
                time.sleep(POLL_S)
                continue
            except Exception as e:
                number = objective.current
                if number is not None and not is_connection_error(e) and with_retry(
                        lambda n=number: taken_over(study, n), what="reading the trial"):
                    # This worker was paused (SIGSTOP, a frozen VM) past the grace period: its
                    # trial was failed as stale and retried elsewhere. Its result is refused.
                    lock.release()
                    say_dropped(number)
                    continue
                # The storage went away outside the objective (asking for or telling a trial):
                # wait for it and go on. A trial left RUNNING goes stale and is retried.
                if not is_connection_error(e):
                    failure = storage_error(e, "starting or ending a trial")
                    if failure is not None:  # a full disk, a timeout: one line, now
                        raise failure from e
                    raise
                lock.release()
                with_retry(lambda: count_trials(study), what="waiting for the storage")
                continue
            finally:
                lock.release()
            for outcome in outcomes:
                summary.trials += 1
                failed = outcome is None or outcome.state == "FAIL"
                summary.failed_in_row = summary.failed_in_row + 1 if failed else 0
                if outcome is not None and on_trial is not None:
                    on_trial(optimizing, outcome)  # its cache already holds the trial
            if summary.failed_in_row >= spec.run.max_failures_in_row:
                summary.stopped = "failures"
                raise WorkerError(
                    f"{summary.failed_in_row} trials failed in a row; stopping this worker "
                    "rather than burning the budget on a broken setup (see `hpsearch status "
                    f"{spec.name}` for the reasons)"
                )
    finally:
        heartbeat.close()
    return summary
