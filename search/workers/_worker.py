"""A worker: runs trials of one study until the global budget is met.

The budget counts COMPLETE + PRUNED trials of every worker; the storage admits each new trial
against it (`search.storage.worker_study`). Each trial goes through the worker's runner
(`search.trial.TrialRunner`, or a `PackRunner` under `--pack`), which says what each step came
to as a value (`Step`). When the running trials would meet the budget the worker waits rather
than start another, and a dead worker's trial comes back as a WAITING retry that a waiting
worker picks up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from search._errors import SearchError
from search.spec import real_value_attrs
from search.storage import (
    Counts,
    DatabaseLock,
    FileLock,
    NullLock,
    WorkerHeartbeat,
    budget_of,
    checkpoint_location,
    close_waiting,
    count_trials,
    is_connection_error,
    remove_finished_checkpoints,
    storage_error,
    storage_of,
    storage_url_of,
    with_retry,
    worker_study,
)
from search.tracking import Tracker
from search.trial import (
    GPU_FULL,
    ArtifactRecorder,
    Objective,
    PackRunner,
    TrialRunner,
    UserObjective,
    write_study_note,
)

if TYPE_CHECKING:
    import trainers
    from search.spec import StudySpec
    from search.trial import Step, TrialOutcome

__all__ = ["GPU_FULL", "WorkerError", "WorkerSummary", "run_worker"]

POLL_S = 1.0
BUDGET_REFRESH_S = 30.0


class WorkerError(SearchError):
    """The worker gave up (for instance after too many failed trials in a row)."""


@dataclass
class WorkerSummary:
    """What a worker did: the trials it ran, its failures in a row, why it stopped."""

    trials: int = 0
    failed_in_row: int = 0
    stopped: str = ""  # why the worker stopped: budget, timeout, failures, stop requested


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
    up to that many trials trained at once (`search.trial.PackRunner`; "auto" picks it from the
    model's size), for a study trained by the built-in trainer; None or 1 trains one at a time.
    """
    write_study_note(study, spec)  # once per study: kept if present (or edited by hand)
    if artifacts is True:
        artifacts = ArtifactRecorder.for_study(study)  # a bad $HPSEARCH_ARTIFACTS stops here
    recorder = artifacts if isinstance(artifacts, ArtifactRecorder) else None
    worker = Worker(study, spec, device=device, threads=threads, on_epoch=on_epoch,
                    lock=lock or NullLock(), artifacts=recorder, pack=pack)
    deadline = time.monotonic() + timeout_s if timeout_s else math.inf
    try:
        return worker.loop(deadline, on_trial=on_trial, on_wait=on_wait)
    finally:
        worker.heartbeat.close()
        if worker.runner.tracker is not None:  # the trials still being logged, then a line
            worker.runner.tracker.close()


class Worker:
    """One worker's loop over its study: checks between trials, its runner's steps, and what
    it does with each step's value."""

    def __init__(self, study: optuna.Study, spec: StudySpec, *, device: str | None,
                 threads: int | None, on_epoch: Callable[[int, trainers.EpochMetrics], None]
                 | None, lock: NullLock | FileLock | DatabaseLock,
                 artifacts: ArtifactRecorder | None, pack: int | str | None) -> None:
        self.study, self.spec, self.lock = study, spec, lock
        lock.bind(study)  # PostgreSQL: the lock's transaction is one of the storage's own
        self.checkpoint_root = checkpoint_location(spec.run.checkpoint_dir,
                                                   storage_url_of(storage_of(study)))
        # A user's trainer is imported (or its program found) here, before any trial is taken.
        self.heartbeat = WorkerHeartbeat(study)
        kind = Objective if spec.trainer is None else UserObjective
        objective = kind(spec, device=device, threads=threads,
                         checkpoint_root=self.checkpoint_root, on_epoch=on_epoch,
                         artifacts=artifacts, stop=self.heartbeat.stop.is_set)
        self.budget, self.budget_read = self.read_budget(), time.monotonic()
        # Trials start through a view that checks the budget in the transaction creating the
        # trial and writes its first beat there (Optuna's per-trial heartbeat off: ours beats).
        view = worker_study(study, self.budget, created_attrs=objective.creation_attrs(),
                            param_attrs=real_value_attrs(spec))
        packing = pack not in (None, 1) and spec.trainer is None
        self.runner = (PackRunner(objective, study, view, self.heartbeat, lock, self.budget,
                                  pack)  # type: ignore[arg-type]
                       if packing else
                       TrialRunner(objective, study, view, self.heartbeat, lock, self.budget))
        self.runner.tracker = Tracker.for_study(study, spec)
        if self.runner.tracker is not None:
            self.runner.tracker.start()  # the study's MLflow run, found or created meanwhile
        self.summary = WorkerSummary()

    def read_budget(self) -> int:
        return with_retry(lambda: budget_of(self.study, self.spec.budget.trials),
                          what="reading the budget")

    def loop(self, deadline: float, *,
             on_trial: Callable[[optuna.Study, TrialOutcome], None] | None,
             on_wait: Callable[[Counts], None] | None) -> WorkerSummary:
        summary = self.summary
        while not summary.stopped:
            summary.stopped = self.before_step(deadline)
            if summary.stopped:
                break
            try:
                # Near the timeout a pack drains: its trials run to their end.
                step = self.runner.step(deadline=deadline)
            except Exception as e:  # noqa: BLE001 - the storage failing as a trial was asked or told
                self.storage_failed(e)
                continue
            if step.full is not None:
                summary.stopped = self.budget_full(step.full, on_wait)
                continue
            self.count(step, on_trial)
            summary.stopped = step.stop
        return summary

    def before_step(self, deadline: float) -> str:
        """Between steps: dead workers' trials failed, the budget re-read now and then; why
        the worker stops now ("" to go on)."""
        # Dead workers' trials fail (and queue their retries) before they are counted.
        with_retry(lambda: self.heartbeat.fail_stale(lock=self.lock),
                   what="checking for dead workers")
        if time.monotonic() - self.budget_read > BUDGET_REFRESH_S:
            # `run --trials` elsewhere may have moved the budget: read it now and then (and
            # before stopping), not before every trial: it is one more query.
            self.refresh_budget()
        if self.runner.busy:  # a pack's trials mid-training end first
            return ""
        if time.monotonic() >= deadline:
            return "timeout"
        if self.heartbeat.stop.is_set():  # `hpsearch stop`, by the heartbeat
            return "stop requested"
        return ""

    def refresh_budget(self) -> None:
        self.budget, self.budget_read = self.read_budget(), time.monotonic()
        self.runner.set_budget(self.budget)

    def budget_full(self, counts: Counts, on_wait: Callable[[Counts], None] | None) -> str:
        """No trial could start: "budget" when the budget is met, else "" after waiting for
        the last trials, running elsewhere."""
        if counts.finished >= self.budget:
            self.refresh_budget()
            if counts.finished >= self.budget:
                self.close_study(counts)
                return "budget"
            return ""
        if counts.waiting:  # a retry was queued meanwhile: take it
            return ""
        # The last trials are running elsewhere. Fail the stale ones (dead workers) so their
        # retries get queued, then look again.
        with_retry(lambda: self.heartbeat.fail_stale(now=True, lock=self.lock),
                   what="checking for dead workers")
        if on_wait is not None:
            on_wait(counts)
        time.sleep(POLL_S)
        return ""

    def close_study(self, counts: Counts) -> None:
        """The budget is met: nothing may wait forever, and the checkpoints go."""
        if counts.waiting:
            with_retry(lambda: close_waiting(
                self.study, "not run: the budget was met before this waiting trial was taken"),
                what="closing waiting trials")
        with_retry(lambda: remove_finished_checkpoints(
            self.study, Path(self.checkpoint_root), self.spec.run.keep_checkpoints),
            what="removing the study's checkpoints")
        if self.runner.tracker is not None:  # MLflow's parent run ends, with the best trial
            self.runner.tracker.study_done(self.study)

    def count(self, step: Step,
              on_trial: Callable[[optuna.Study, TrialOutcome], None] | None) -> None:
        """The step's trials counted and shown; too many failures in a row stop the worker."""
        summary = self.summary
        for outcome in step.outcomes:
            summary.trials += 1
            summary.failed_in_row = summary.failed_in_row + 1 if outcome.state == "FAIL" else 0
            if on_trial is not None:
                on_trial(self.runner.view, outcome)  # its cache already holds the trial
        if summary.failed_in_row >= self.spec.run.max_failures_in_row:
            summary.stopped = "failures"
            raise WorkerError(
                f"{summary.failed_in_row} trials failed in a row; stopping this worker "
                "rather than burning the budget on a broken setup (see `hpsearch status "
                f"{self.spec.name}` for the reasons)")

    def storage_failed(self, error: Exception) -> None:
        """The storage went away as a trial was asked for or told: wait for it and go on (a
        trial left RUNNING goes stale and is retried); a full disk or a timeout is one line,
        now; anything else is raised on."""
        if not is_connection_error(error):
            failure = storage_error(error, "starting or ending a trial")
            if failure is not None:
                raise failure from error
            raise error
        with_retry(lambda: count_trials(self.study), what="waiting for the storage")
