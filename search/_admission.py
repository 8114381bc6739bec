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

The trial's own attributes ride on Optuna's transactions too: host, pid and device on its
creation, a pow2 parameter's real value on the parameter's, and the result (history, seconds,
how it ended, artifact links) on the tell that finishes it. A trial this worker creates costs no
transaction beyond a hand-written loop's; a taken WAITING trial writes its start attrs once.

Reads are cheaper too: the view reads trials in two queries where Optuna's take seven
(`search._reader`), and reading is most of what a worker does to its storage.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Container, Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError

from search._rdb import write_attrs
from search._reader import reader_for
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
    # User attrs written with the trial's creation (host, pid, device), and those written with
    # a parameter (`optuna name → (attr key, to_real)`: a pow2 parameter's real value).
    created_attrs: dict[str, Any] = {}
    param_attrs: dict[str, tuple[str, Callable[[Any], Any]]] = {}
    _written: tuple[int | None, dict[str, Any]] = (None, {})
    # The result's attrs of the trial being told: (trial id, user attrs, system attrs).
    _with_result: tuple[int, dict[str, Any], dict[str, Any]] | None = None

    def written(self, trial_id: int) -> dict[str, Any]:
        """The user attrs this view has written on trial `trial_id` (its current trial)."""
        written_id, attrs = self._written
        return attrs if written_id == trial_id else {}

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
                    if self.created_attrs:
                        write_attrs(session.connection(), trial.trial_id, self.created_attrs)
                    frozen = FrozenTrial(
                        number=trial.number, state=trial.state, value=None, values=None,
                        datetime_start=trial.datetime_start, datetime_complete=None, params={},
                        distributions={}, user_attrs={}, system_attrs={},
                        intermediate_values={}, trial_id=trial.trial_id)
                self.beaten = frozen._trial_id if self.beat else None
                self._written = (frozen._trial_id, dict(self.created_attrs))
                return frozen
            except optuna.exceptions.StorageInternalError:
                if attempt == MAX_RETRIES:
                    raise
                time.sleep(random.random() * 2.0)
        raise AssertionError("unreachable")

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        pending, self._with_result = self._with_result, None
        if pending is None or pending[0] != trial_id or not state.is_finished():
            return super().set_trial_state_values(trial_id, state, values)
        _, attrs, system_attrs = pending
        # Optuna's own, with the result's attrs (history, seconds, artifact links…) written in
        # the transaction that finishes the trial: no transaction of their own.
        try:
            with _create_scoped_session(self.scoped_session) as session:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                # Before any write: on a finished trial this reads it back on this session.
                self.check_trial_is_updatable(trial_id, trial.state)
                for objective, value in enumerate(values or ()):
                    self._set_trial_value_without_commit(session, trial, objective, value)
                write_attrs(session.connection(), trial_id, attrs, system_attrs)
                trial.state = state
                trial.datetime_complete = datetime.now()
        except IntegrityError:
            return False
        return True

    def _get_trials(self, study_id: int, states: Container[TrialState] | None,
                    included_trial_ids: set[int], trial_id_greater_than: int
                    ) -> list[FrozenTrial]:
        # Two queries where Optuna's take seven (search._reader): this runs ~5 times a trial.
        reader = reader_for()
        if reader is None:
            return super()._get_trials(study_id, states, included_trial_ids,
                                       trial_id_greater_than)
        with _create_scoped_session(self.scoped_session) as session:
            return reader.read(session, study_id, states, included_trial_ids,
                               trial_id_greater_than)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        # The pruner's read of the running trial, every epoch: two queries, not six.
        reader = reader_for()
        if reader is None:
            return super().get_trial(trial_id)
        with _create_scoped_session(self.scoped_session) as session:
            return reader.read_one(session, trial_id)

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                         distribution: BaseDistribution,
                         previous_distribution: BaseDistribution | None) -> None:
        # A pow2 parameter's real value (`batch_size: 128` beside `log2_batch_size: 7`) is
        # written in the transaction that sets the parameter: no transaction of its own.
        attr = self.param_attrs.get(param_name)
        if attr is None:
            super()._set_trial_param(trial_id, param_name, param_value_internal, distribution,
                                     previous_distribution)
            return
        key, to_real = attr
        real = to_real(distribution.to_external_repr(param_value_internal))
        with _create_scoped_session(self.scoped_session, True) as session:
            self._set_trial_param_without_commit(session, trial_id, param_name,
                                                 param_value_internal, distribution,
                                                 previous_distribution)
            write_attrs(session.connection(), trial_id, {key: real})
        written_id, attrs = self._written
        self._written = (trial_id, {**(attrs if written_id == trial_id else {}), key: real})


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


def written_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """The user attrs the storage wrote on `trial` as it created it or set its parameters."""
    backend = getattr(trial.storage, "_backend", None)
    return backend.written(trial._trial_id) if isinstance(backend, WorkerStorage) else {}


def with_result(trial: optuna.Trial, attrs: dict[str, Any],
                system_attrs: dict[str, Any] | None = None) -> bool:
    """Have `attrs` (and new `system_attrs`) written as `trial` is told, in the transaction that
    finishes it. False where the storage cannot (not a worker's view): the caller writes them."""
    backend = getattr(trial.storage, "_backend", None)
    if not isinstance(backend, WorkerStorage):
        return False
    backend._with_result = (trial._trial_id, dict(attrs), dict(system_attrs or {}))
    return True


def worker_study(study: optuna.Study, budget: int | None, *,
                 created_attrs: dict[str, Any] | None = None,
                 param_attrs: dict[str, tuple[str, Callable[[Any], Any]]] | None = None
                 ) -> optuna.Study:
    """`study` as a worker starts trials in it: budget-checked, first beat at creation, and
    Optuna's per-trial heartbeat thread and stale scan off (the worker's heartbeat does both).
    `created_attrs` are written on each new trial as it is created, `param_attrs` with their
    parameter (see WorkerStorage): the objective then writes only what is left.

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
    view.created_attrs = dict(created_attrs or {})
    view.param_attrs = dict(param_attrs or {})
    return WorkerStudy(study_name=study.study_name, storage=view, sampler=study.sampler,
                       pruner=study.pruner)
