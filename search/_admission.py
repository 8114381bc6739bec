"""Starting a trial in one transaction: the budget check, the new trial and its first heartbeat.

Optuna creates a trial in a transaction that first locks the study's row (`SELECT … FOR UPDATE`,
so that trial numbers never collide): every worker on every machine creating a trial of this
study queues on that lock. Counting the trials inside that same transaction makes "is there room
in the budget? then start one" atomic on PostgreSQL with no lock of hpsearch's own. On SQLite
(which has no row locks) and MySQL the worker's budget lock is held around it as well, and the
count in here is exact under it. Writing the trial's first heartbeat in the same transaction means
a trial never exists without one: a worker killed at any moment after it leaves a trial that goes
stale and is retried.

Before this, starting a trial on PostgreSQL took five round trips of hpsearch's own (take the
lock, count, release, check the trial, beat) and two commits on top of Optuna's creation.

A WAITING trial (a retry, an enqueued configuration) is not created but taken: `WorkerStudy`
checks the finished count before taking one, as the worker did before every trial.
"""

from __future__ import annotations

import random
import time
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from search._study import Counts, counts_of

MAX_RETRIES = 5  # as Optuna's own trial creation: deadlocks between machines are retried


class BudgetReached(Exception):
    """No room for a new trial: the budget is met, or the trials running elsewhere meet it."""

    def __init__(self, counts: Counts) -> None:
        super().__init__(f"budget reached: {counts}")
        self.counts = counts


class WorkerStorage(RDBStorage):
    """An RDB storage view that admits new trials against `budget` and writes their first beat.

    Built by `worker_study` over a storage's engine (no new connections); `budget` None admits
    every trial, `beat` False writes no heartbeat (none configured).
    """

    budget: int | None = None
    beat: bool = False
    beaten: int | None = None  # the trial id whose first heartbeat creation wrote

    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if template_trial is not None:  # enqueue_trial / add_trial: not a trial being started
            return super()._create_new_trial(study_id, template_trial)
        for attempt in range(1, MAX_RETRIES + 1):
            try:
                with _create_scoped_session(self.scoped_session) as session:
                    models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                    if self.budget is not None:
                        admit(self.budget, _states(session, study_id))
                    trial = self._get_prepared_new_trial(study_id, None, session)
                    if self.beat:  # the column defaults to the server's clock
                        session.add(models.TrialHeartbeatModel(trial_id=trial.trial_id))
                    frozen = FrozenTrial(
                        number=trial.number, state=trial.state, value=None, values=None,
                        datetime_start=trial.datetime_start, datetime_complete=None, params={},
                        distributions={}, user_attrs={}, system_attrs={},
                        intermediate_values={}, trial_id=trial.trial_id)
                self.beaten = frozen._trial_id if self.beat else None
                return frozen
            except optuna.exceptions.StorageInternalError:
                if attempt == MAX_RETRIES:
                    raise
                time.sleep(random.random() * 2.0)
        raise AssertionError("unreachable")


def _states(session: Any, study_id: int) -> dict[TrialState, int]:
    from sqlalchemy import func, select

    query = (select(models.TrialModel.state, func.count())
             .where(models.TrialModel.study_id == study_id)
             .group_by(models.TrialModel.state))
    return dict(session.connection().execute(query).all())


def admit(budget: int, states: dict[TrialState, int]) -> None:
    """Raise BudgetReached unless a new trial fits: finished + running below the budget."""
    counts = counts_of(states)
    if counts.finished + counts.running >= budget:
        raise BudgetReached(counts)


class WorkerStudy(optuna.Study):
    """A study that takes a WAITING trial only while the finished ones leave room for it."""

    def _pop_waiting_trial_id(self) -> int | None:
        # Optuna's own, with the budget check before the first take. The WAITING trials are
        # read once: it is a query every trial.
        from search._rdb import state_counts

        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                               states=(TrialState.WAITING,))
        budget = getattr(self._storage._backend, "budget", None)
        if waiting and budget is not None:
            counts = counts_of(state_counts(self))
            if counts.finished >= budget:
                raise BudgetReached(counts)
        for trial in waiting:
            try:
                # False: another worker took it; finished: another worker ran it.
                if self._storage.set_trial_state_values(trial._trial_id,
                                                        state=TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None


def set_budget(study: optuna.Study, budget: int) -> None:
    """A new budget for the trials `study` (a `worker_study`) starts from now on."""
    backend = getattr(study._storage, "_backend", None)
    if isinstance(backend, WorkerStorage):
        backend.budget = budget


def worker_study(study: optuna.Study, budget: int | None) -> optuna.Study:
    """`study` as a worker starts trials in it: budget-checked, first beat at creation, and
    Optuna's per-trial heartbeat thread and stale scan off (the worker's heartbeat does both).

    The view shares the storage's engine and sessions (one connection pool). A storage that is
    not an RDBStorage (the gRPC proxy) is returned as it is: there the worker counts first.
    """
    backend = getattr(study._storage, "_backend", None)
    if not isinstance(backend, RDBStorage):
        return study
    # A shallow copy by hand: copy.copy would go through __getstate__, which builds a new engine.
    view = object.__new__(WorkerStorage)
    view.__dict__.update(backend.__dict__)
    view.beat = backend.heartbeat_interval is not None
    view.heartbeat_interval = None
    view.budget = budget
    return WorkerStudy(study_name=study.study_name, storage=view, sampler=study.sampler,
                       pruner=study.pruner)
