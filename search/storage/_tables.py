"""Fast writes and counts on Optuna's RDB tables, each with Optuna's public call as its fallback.

Owns: all of a running trial's attributes (and artifact links) in one transaction, a trial's
first heartbeat, many trials' heartbeats in one statement, and the one `GROUP BY` that counts a
study's trials by state. Optuna's public calls take a transaction per attribute and a full
trial listing to count.

hpsearch's own writes to a running trial commit without waiting for PostgreSQL's WAL flush
(`synchronous_commit = off` for that transaction only): each is followed by a synchronous commit
of the same trial (a parameter, a report, its tell, or another worker failing it as stale), and
WAL is flushed in order, so that commit makes them durable too. Only a crash of the database
server itself within ~0.6 s of such a write, with no synchronous commit in between, could lose
one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from search.storage import _compat
from search.storage._compat import quiet_experimental, rdb_backend, session, trial_id_of


@contextmanager
def _trial_write(backend: Any, trial_id: int) -> Iterator[Any]:
    """A transaction's connection on a running trial (else UpdateFinishedTrialError), committed
    without waiting for the WAL flush on PostgreSQL (see the module's docstring)."""
    trial = _compat.models.TrialModel
    with session(backend) as s:
        # Core, not the ORM: this runs a few times a trial and the ORM's bookkeeping is not free.
        conn = s.connection()
        query = select(trial.state).where(trial.trial_id == trial_id)
        if conn.dialect.name == "postgresql":
            # SET LOCAL, in the same round trip as the state.
            query = query.add_columns(func.set_config("synchronous_commit", "off", True))
        state = conn.execute(query).scalar()
        if state is None:
            raise KeyError(_compat.models.NOT_FOUND_MSG)  # as Optuna's find_or_raise_by_id
        backend.check_trial_is_updatable(trial_id, state)
        yield conn


_UPSERTS: dict[tuple[str, str], Any] = {}  # (dialect, table) → statement, built once


def _upsert_statement(dialect: str, model: Any, key: list[str], update: str) -> Any | None:
    """INSERT that overwrites column `update` where `key` exists, for PostgreSQL, SQLite and
    MySQL (None elsewhere). Executed with a list of rows: one batched statement."""
    cached = _UPSERTS.get((dialect, model.__tablename__))
    if cached is not None:
        return cached
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(model)
        stmt = stmt.on_conflict_do_update(index_elements=key,
                                          set_={update: stmt.excluded[update]})
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert as dialect_insert

        stmt = dialect_insert(model)
        stmt = stmt.on_duplicate_key_update({update: stmt.inserted[update]})
    else:
        return None
    _UPSERTS[dialect, model.__tablename__] = stmt
    return stmt


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any], *,
                   system_attrs: dict[str, Any] | None = None) -> None:
    """Set `attrs` (and `system_attrs`, new keys) on a running trial, in one transaction
    where the storage allows it."""
    backend = rdb_backend(trial.storage)
    if backend is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in (system_attrs or {}).items():
            trial.storage.set_trial_system_attr(trial_id_of(trial), key, value)
        return
    with _trial_write(backend, trial_id_of(trial)) as conn:
        write_attrs(conn, trial_id_of(trial), attrs, system_attrs)


def write_attrs(conn: Any, trial_id: int, attrs: dict[str, Any],
                system_attrs: dict[str, Any] | None = None) -> None:
    """Upsert user attrs (and insert new system attrs) of a trial on `conn`, in its transaction,
    without checking the trial's state: the caller's transaction does."""
    model = _compat.models.TrialUserAttributeModel
    rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in attrs.items()]
    # Replace: a retried trial starts with its dead predecessor's attributes.
    upsert = _upsert_statement(conn.dialect.name, model, ["trial_id", "key"], "value_json")
    if rows and upsert is not None:
        conn.execute(upsert, rows)
    elif rows:
        conn.execute(delete(model).where(model.trial_id == trial_id, model.key.in_(list(attrs))))
        conn.execute(insert(model), rows)
    if system_attrs:
        conn.execute(insert(_compat.models.TrialSystemAttributeModel), [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in system_attrs.items()])


def server_clock(dialect: str) -> Any:
    """The server's clock at the statement, for a heartbeat. PostgreSQL's CURRENT_TIMESTAMP (the
    column's default) is its transaction's start, and a budget lock's transaction may have
    waited long for the lock before the trial it admits beats: `clock_timestamp()` there."""
    return func.clock_timestamp() if dialect == "postgresql" else func.current_timestamp()


def first_heartbeat(storage: Any, trial_id: int) -> None:
    """The first heartbeat of a trial that just started (its later ones: `record_heartbeat`)."""
    backend = rdb_backend(storage)
    dialect = backend.engine.dialect.name if backend else ""
    upsert = backend and _upsert_statement(dialect, _compat.models.TrialHeartbeatModel,
                                           ["trial_id"], "heartbeat")
    if upsert is None:
        storage.record_heartbeat(trial_id)
        return
    with _trial_write(backend, trial_id) as conn:
        conn.execute(upsert.values(trial_id=trial_id, heartbeat=server_clock(dialect)))


def record_heartbeats(storage: Any, trial_ids: list[int]) -> None:
    """Heartbeats of many trials, now, in one statement where the storage allows it (the storage
    proxy's workers' beats, gathered: `_proxy_methods`); else, or when one of the ids spoils
    the statement (not a trial's), Optuna's `record_heartbeat` for each, which passes over such
    an id as it always has."""
    backend = rdb_backend(storage)
    dialect = backend.engine.dialect.name if backend else ""
    upsert = backend and _upsert_statement(dialect, _compat.models.TrialHeartbeatModel,
                                           ["trial_id"], "heartbeat")
    ids = sorted(set(trial_ids))  # in one order: two batches never deadlock on their rows
    if upsert is not None and ids:
        try:
            with session(backend) as s:
                s.connection().execute(upsert.values(
                    [{"trial_id": i, "heartbeat": server_clock(dialect)} for i in ids]))
            return
        except (IntegrityError, optuna.exceptions.StorageInternalError):
            pass  # an id that is not a trial's: each on its own below
    for trial_id in ids:
        storage.record_heartbeat(trial_id)


def count_states(conn: Any, study_id: int) -> dict[TrialState, int]:
    """Trials of a study by TrialState, in one `GROUP BY` on `conn` (its transaction)."""
    trial = _compat.models.TrialModel
    query = (select(trial.state, func.count()).where(trial.study_id == study_id)
             .group_by(trial.state))
    counts = dict.fromkeys(TrialState, 0)
    counts.update(conn.execute(query).all())
    return counts


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    """Trials of `study` by TrialState, in one query where the storage allows it."""
    backend = rdb_backend(_compat.storage_of(study))
    if backend is None:
        counts = dict.fromkeys(TrialState, 0)
        for t in study.get_trials(deepcopy=False):
            counts[t.state] += 1
        return counts
    with session(backend) as s:
        return count_states(s.connection(), _compat.study_id_of(study))


def retried_from(trial: optuna.Trial) -> int | None:
    """The number of the dead trial this one retries (the latest, for a retry of a retry)."""
    with quiet_experimental():
        history = RetryHeartbeatStaleTrialCallback.retry_history(_frozen(trial))
    return history[-1] if history else None


def retries_of(trial: optuna.Trial) -> int:
    """How many times the trial's first run has been retried before this run (0: a new one)."""
    with quiet_experimental():
        return len(RetryHeartbeatStaleTrialCallback.retry_history(_frozen(trial)))


def stored_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """`trial` as stored now (after it was told: its state, values and attrs)."""
    return trial.storage.get_trial(trial_id_of(trial))


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    # The frozen trial fetched when the trial started carries the retry link (a system attr),
    # so no further storage read is needed.
    frozen = _compat.cached_frozen(trial)
    return frozen if frozen is not None else trial.storage.get_trial(trial_id_of(trial))


def close_waiting(study: optuna.Study, reason: str) -> int:
    """End the study's WAITING trials as FAIL with `reason` (the user attr "ended"); how many.

    For a study whose budget is met: a retry queued as the last trials finished, or an enqueued
    config beyond the budget, would otherwise wait in `status` forever. Call it only when no
    worker may take a waiting trial (the budget admits none).
    """
    storage = _compat.storage_of(study)
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = trial_id_of(trial)
        try:
            storage.set_trial_user_attr(trial_id, "ended", reason)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                closed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile: nothing to close
    return closed
