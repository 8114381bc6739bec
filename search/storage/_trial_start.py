"""The worker's storage view: a trial started in one transaction with its budget check.

`WorkerStorage` is an RDBStorage over the same engine that creates a trial in the transaction
that locks the study's row (`SELECT … FOR UPDATE`, as Optuna numbers trials), counts the trials
there (so "is there room? then start one" is atomic on PostgreSQL; SQLite and MySQL also hold the
worker's budget lock around it), writes the trial's first heartbeat and its host, pid and device
with it, writes a pow2 parameter's real value with the parameter and the result's attributes
with the tell, and reads trials through the two-query reader. `WorkerStudy` takes a WAITING
trial (a retry, an enqueued config) only while the finished trials leave room for it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError

from search.storage import _compat
from search.storage._budget import Counts, admit, counts_of
from search.storage._compat import backend_of, session, trial_id_of
from search.storage._proxy_client import ProxyWorkerStudy, WorkerMethods
from search.storage._proxy_client import worker_view as proxy_worker_view
from search.storage._reader import ReadingStorage
from search.storage._tables import count_states, server_clock, state_counts, write_attrs

MAX_RETRIES = 5  # as Optuna's own trial creation: deadlocks between machines are retried


class WorkerStorage(ReadingStorage):
    """An RDB storage view that admits new trials against `budget` and writes their first beat
    (its trials read in two queries: `ReadingStorage`).

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
    # Called once a trial this view starts exists (created, or a WAITING one taken): the
    # worker's budget lock lets go there, before `Study.ask` reads it back (`on_started`).
    started: Callable[[], None] | None = None
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
                with session(self) as s:
                    _compat.models.StudyModel.find_or_raise_by_id(study_id, s, for_update=True)
                    if self.budget is not None:
                        admit(self.budget, counts_of(count_states(s.connection(), study_id)))
                    trial = self._get_prepared_new_trial(study_id, None, s)
                    if self.beat:  # the server's clock now, not its transaction's start
                        s.add(_compat.models.TrialHeartbeatModel(
                            trial_id=trial.trial_id,
                            heartbeat=server_clock(self.engine.dialect.name)))
                    if self.created_attrs:
                        write_attrs(s.connection(), trial.trial_id, self.created_attrs)
                    frozen = FrozenTrial(
                        number=trial.number, state=trial.state, value=None, values=None,
                        datetime_start=trial.datetime_start, datetime_complete=None, params={},
                        distributions={}, user_attrs={}, system_attrs={},
                        intermediate_values={}, trial_id=trial.trial_id)
                self.beaten = frozen._trial_id if self.beat else None
                self._written = (frozen._trial_id, dict(self.created_attrs))
                if self.started is not None:
                    self.started()
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
            with session(self) as s:
                trial = _compat.models.TrialModel.find_or_raise_by_id(trial_id, s, for_update=True)
                # Before any write: on a finished trial this reads it back on this session.
                self.check_trial_is_updatable(trial_id, trial.state)
                for objective, value in enumerate(values or ()):
                    self._set_trial_value_without_commit(s, trial, objective, value)
                write_attrs(s.connection(), trial_id, attrs, system_attrs)
                trial.state = state
                trial.datetime_complete = datetime.now()
        except IntegrityError:
            return False
        return True

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
        with session(self, ignore_integrity_error=True) as s:
            self._set_trial_param_without_commit(s, trial_id, param_name,
                                                 param_value_internal, distribution,
                                                 previous_distribution)
            write_attrs(s.connection(), trial_id, {key: real})
        written_id, attrs = self._written
        self._written = (trial_id, {**(attrs if written_id == trial_id else {}), key: real})


class WorkerStudy(optuna.Study):
    """A study that takes a WAITING trial only while the finished ones leave room for it."""

    def _pop_waiting_trial_id(self) -> int | None:
        budget = getattr(backend_of(self._storage), "budget", None)
        return take_waiting(self._storage, self._study_id, budget,
                            lambda: counts_of(state_counts(self)))


def take_waiting(storage: Any, study_id: int, budget: int | None,
                 counts: Callable[[], Counts]) -> int | None:
    """A WAITING trial of the study set RUNNING, if the finished trials (`counts`) leave room
    for it under `budget` (else BudgetReached); None when none waits. Optuna's own take, with
    the budget check before the first take. The WAITING trials are read once: it is a query
    every trial."""
    waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
    if waiting and budget is not None:
        admit(budget, counts(), taking_waiting=True)
    for trial in waiting:
        try:
            # False: another worker took it; finished: another worker ran it.
            if storage.set_trial_state_values(trial_id_of(trial), state=TrialState.RUNNING):
                started = getattr(backend_of(storage), "started", None)
                if started is not None:
                    started()
                return trial_id_of(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def set_budget(study: optuna.Study, budget: int) -> None:
    """A new budget for the trials `study` (a `worker_study`) starts from now on."""
    backend = backend_of(_compat.storage_of(study))
    if isinstance(backend, (WorkerStorage, WorkerMethods)):
        backend.budget = budget


def on_started(study: optuna.Study, started: Callable[[], None]) -> None:
    """Have `started` called as soon as each trial `study` (a `worker_study`) starts exists,
    inside `ask`: a new trial created, or a WAITING one taken (a storage that is not a worker's
    view never calls it)."""
    backend = backend_of(_compat.storage_of(study))
    if isinstance(backend, WorkerStorage):
        backend.started = started


def beat_written(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether `trial`'s first heartbeat was written with its creation (by `study`'s view)."""
    return getattr(backend_of(_compat.storage_of(study)), "beaten", None) == trial_id_of(trial)


def written_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """The user attrs the storage wrote on `trial` as it created it or set its parameters."""
    backend = backend_of(trial.storage)
    return backend.written(trial_id_of(trial)) if isinstance(backend, WorkerStorage) else {}


def with_result(trial: optuna.Trial, attrs: dict[str, Any],
                system_attrs: dict[str, Any] | None = None) -> bool:
    """Have `attrs` (and new `system_attrs`) written as `trial` is told, in the transaction that
    finishes it. False where the storage cannot (not a worker's view): the caller writes them."""
    backend = backend_of(trial.storage)
    if not isinstance(backend, WorkerStorage):
        return False
    backend._with_result = (trial_id_of(trial), dict(attrs), dict(system_attrs or {}))
    return True


def worker_study(study: optuna.Study, budget: int | None, *,
                 created_attrs: dict[str, Any] | None = None,
                 param_attrs: dict[str, tuple[str, Callable[[Any], Any]]] | None = None
                 ) -> optuna.Study:
    """`study` as a worker starts trials in it: budget-checked, first beat at creation, and
    Optuna's per-trial heartbeat thread and stale scan off (the worker's heartbeat does both).
    `created_attrs` are written on each new trial as it is created, `param_attrs` with their
    parameter (see WorkerStorage): the objective then writes only what is left.

    The view shares the storage's engine and sessions (one connection pool). Through the gRPC
    proxy a trial's start is one call the proxy runs under its budget lock
    (`search.storage._proxy_client`): the view shares the client's channel. A storage that is
    neither, or an Optuna the fast paths are not tested on, is returned as it is: there the
    worker counts first.
    """
    backend = backend_of(_compat.storage_of(study))
    if isinstance(backend, WorkerMethods) and backend.heartbeat_interval is not None:
        return ProxyWorkerStudy(study_name=study.study_name,
                                storage=proxy_worker_view(backend, budget),
                                sampler=study.sampler, pruner=study.pruner)
    if not isinstance(backend, RDBStorage) or not _compat.fast_paths():
        return study
    view = worker_view(backend, budget, beat=backend.heartbeat_interval is not None,
                       created_attrs=created_attrs, param_attrs=param_attrs)
    return WorkerStudy(study_name=study.study_name, storage=view, sampler=study.sampler,
                       pruner=study.pruner)


def worker_view(backend: RDBStorage, budget: int | None, *, beat: bool,
                created_attrs: dict[str, Any] | None = None,
                param_attrs: dict[str, tuple[str, Callable[[Any], Any]]] | None = None
                ) -> WorkerStorage:
    """A WorkerStorage over `backend`'s engine and sessions, Optuna's heartbeat off."""
    # A shallow copy by hand: copy.copy would go through __getstate__, which builds a new engine.
    view = object.__new__(WorkerStorage)
    view.__dict__.update(backend.__dict__)
    view.beat = beat
    view.heartbeat_interval = None
    view.budget = budget
    view.created_attrs = dict(created_attrs or {})
    view.param_attrs = dict(param_attrs or {})
    return view
