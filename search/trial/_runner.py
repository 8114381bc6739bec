"""One home for a trial's life: asked, started, run, told.

Every trial a worker runs goes through `TrialRunner`, whatever its kind: the built-in trainer's
(`Objective`), a user's function or command (`UserObjective`), or several at once in a pack
(`PackRunner`, `search.trial._packing`, a runner that holds several trials). The runner asks
for a trial under the budget lock (the storage admits it against the budget in the transaction
that creates it), starts beating for it, hands it to its kind, and tells Optuna how it ended.
The kind says so as a value (`Ended`): complete, pruned, failed with a reason, interrupted,
taken over by another worker, or out of memory on a shared GPU; the runner acts on it. An
interrupted trial is told FAIL "interrupted" and queued again: its retry resumes from its last
epoch checkpoint, at the next `run` or `worker`, on any machine.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Protocol

import optuna

from search._log import logger
from search.storage import (
    BudgetReached,
    Counts,
    beat_written,
    count_trials,
    is_connection_error,
    on_started,
    requeue_interrupted,
    set_budget,
    taken_over,
    tell_trial,
    trial_id_of,
    with_retry,
)
from search.trial._outcome import (
    GPU_FULL,
    STOP_REQUESTED,
    End,
    Ended,
    Step,
    TrialOutcome,
    log_failure,
)

if TYPE_CHECKING:
    from pathlib import Path

    from search.storage import DatabaseLock, FileLock, NullLock, WorkerHeartbeat
    from search.tracking import Tracker


LOG = logger("trial")


class TrialKind(Protocol):
    """What runs a trial the runner asked for (`Objective`, `UserObjective`)."""

    def run(self, trial: optuna.Trial) -> Ended: ...

    def clear_checkpoints(self, directories: tuple[Path | None, ...]) -> None: ...


def say_dropped(number: int) -> None:
    """The line a worker prints as it drops a trial that was taken over."""
    LOG.info(f"trial #{number}: failed as stale while this worker was paused, and retried by "
             "another; its late result is dropped")


class TrialRunner:
    """Asks, starts, runs and tells a worker's trials, one at a time (`step`)."""

    def __init__(self, kind: TrialKind, study: optuna.Study, view: optuna.Study,
                 heartbeat: WorkerHeartbeat, lock: NullLock | FileLock | DatabaseLock,
                 budget: int) -> None:
        """`study`: the study as loaded; `view`: the worker's view of it that admits trials
        against the budget (`search.storage.worker_study`; the study itself where the storage
        cannot, as the gRPC proxy: there the runner counts first)."""
        self.kind = kind
        self.study = study
        self.view = view
        self.heartbeat = heartbeat
        self.lock = lock
        self.budget = budget
        self.live: dict[int, optuna.Trial] = {}  # asked and not yet told, by number
        self.tracker: Tracker | None = None  # where each trial told is logged (MLflow, ...)
        self._to_queue: set[int] = set()
        self._hooked = False  # the lock bound and hooked to the view (at the first `ask`)

    @property
    def busy(self) -> bool:
        """Whether trials are mid-training between steps (a pack's): the worker lets them end
        before it stops for a timeout or `hpsearch stop`."""
        return False

    def set_budget(self, budget: int) -> None:
        """The budget trials are admitted against from now on (`run --trials` moved it)."""
        self.budget = budget
        set_budget(self.view, budget)

    def step(self, *, deadline: float = math.inf) -> Step:
        """Ask for a trial, run it and tell it; the budget's counts when none could start."""
        asked = self.ask()
        if isinstance(asked, Counts):
            return Step(full=asked)
        try:
            ended = self.run(asked)
            shown = self.tell(asked, ended)
            return self.stepped([ended], [shown])
        except KeyboardInterrupt:
            self.abandon()
            raise

    def ask(self) -> optuna.Trial | Counts:
        """A new trial (or a queued one), asked under the budget lock from the check until it
        exists (the worker's view lets go there, before `ask` reads it back), with its first beat;
        the counts when the budget leaves no room."""
        if not self._hooked:
            self._hooked = True
            # The lock lets go as the trial exists, inside `ask`: what follows there (the
            # trial read back, the sampler's `before_trial`) is not held under it.
            on_started(self.view, self.lock.release)
            self.lock.bind(self.study)  # PostgreSQL: held in the storage's own transaction
        with_retry(self.lock.acquire, what="taking the budget lock")
        asked = time.monotonic()  # (the trial's first beat is written after this)
        try:
            if self.view is self.study:  # the storage does not admit trials itself: count
                counts = with_retry(lambda: count_trials(self.study), what="counting trials")
                if counts.finished >= self.budget or (
                        counts.finished + counts.running >= self.budget and not counts.waiting):
                    return counts
            with warnings.catch_warnings():
                # Optuna's advice for its own heartbeat thread: this worker beats itself.
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                trial = self.view.ask()
        except BudgetReached as full:
            return full.counts
        finally:
            self.lock.release()  # if still held: the budget was full, or no worker's view
        self.live[trial.number] = trial
        trial_id, written = trial_id_of(trial), beat_written(self.view, trial)
        with_retry(lambda: self.heartbeat.begin(trial_id, written=written, since=asked),
                   what="starting a trial")
        return trial

    def run(self, trial: optuna.Trial) -> Ended:
        """`trial` run by its kind. An error that escaped it (the storage failing as the
        trial was recorded, say) fails the trial, as `study.optimize` does, unless the trial
        was taken over meanwhile."""
        try:
            return self.kind.run(trial)
        except Exception as e:  # noqa: BLE001 - the trial's, told FAIL
            if not is_connection_error(e) and with_retry(
                    lambda: taken_over(self.study, trial.number), what="reading the trial"):
                return Ended(End.TAKEN_OVER)
            log_failure(trial.number, e)
            return Ended(End.FAILED)

    def tell(self, trial: optuna.Trial, ended: Ended) -> TrialOutcome | None:
        """Tell how `trial` ended and stop beating for it; what the display shows (None for a
        trial taken over: dropped). A trial to be queued again is queued at the step's end; a
        tell that fails leaves the trial RUNNING without beats: it goes stale and is retried."""
        self.live.pop(trial.number, None)
        if ended.how is End.TAKEN_OVER:
            self.heartbeat.end(trial_id_of(trial))
            say_dropped(trial.number)
            return None
        try:
            with_retry(lambda: tell_trial(self.view, trial, ended.values, ended.how.state),
                       what="telling a trial")
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as stale by another worker between this one's last look and its tell
            # (beats held up past the grace period): its retry runs; this result is dropped.
            say_dropped(trial.number)
            return None
        finally:
            self.heartbeat.end(trial_id_of(trial))
        if ended.how in (End.GPU_FULL, End.RANK_LOST):
            LOG.info(f"trial #{trial.number}: {ended.reason}")
        if ended.how.queued_again:
            self._to_queue.add(trial.number)
            return None  # not an end: it runs again
        if self.tracker is not None:  # logged from the tracker's thread: this returns now
            self.tracker.trial_ended(trial)
        if ended.clear:  # told: its checkpoints (and the dead trial's it resumed) may go
            self.kind.clear_checkpoints(ended.clear)
        return ended.shown

    def stepped(self, ended: list[Ended], shown: list[TrialOutcome | None]) -> Step:
        """The step of trials told as `ended` (shown as `shown`): the interrupted ones queued
        again, and why the worker stops, if it does."""
        self.queue_again()
        step = Step(outcomes=[s for s in shown if s is not None])
        for end in ended:
            if end.how is End.GPU_FULL:
                step.stop = GPU_FULL
            elif end.how is End.INTERRUPTED and not step.stop:
                step.stop = STOP_REQUESTED
        return step

    def queue_again(self) -> None:
        """Queue the interrupted trials told so far again (FAIL "interrupted": each resumes
        from its checkpoints), under the budget lock: not while another worker fails stale
        trials or queues."""
        numbers, self._to_queue = self._to_queue, set()
        if not numbers:
            return
        with_retry(self.lock.acquire, what="taking the budget lock")
        try:
            with_retry(lambda: requeue_interrupted(self.study, numbers),
                       what="queueing the interrupted trials again")
        finally:
            self.lock.release()

    def abandon(self) -> None:
        """Ctrl-C or SIGTERM: every trial asked and not told ends FAIL "interrupted" and is
        queued again, with those told so."""
        numbers = set(self.live)
        for trial in self.live.values():
            self.heartbeat.end(trial_id_of(trial))
        self.live = {}
        self._to_queue |= numbers
        self.queue_again()
