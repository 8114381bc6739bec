"""Fast paths into Optuna's RDB storage, each with a public-API fallback.

Optuna's public calls are one transaction per user attribute and a full trial listing to count
states. hpsearch does both every trial (host, pid, device, history, seconds, ended…; the
budget check), and on PostgreSQL that was ~35 extra statements per trial: 1.5x a hand-written
loop's per-trial overhead. Here they become one transaction for all attributes (and the
trial's artifact links) and one `GROUP BY` for the counts, using the storage's own models.
Any other storage (the gRPC proxy, an Optuna whose internals moved) takes the public path.

What a trial costs on PostgreSQL is mostly its commits' WAL flushes (an fsync each, ~1-4 ms
here; a round trip is ~0.1 ms). hpsearch's own writes to a running trial (its first heartbeat,
its attributes) commit without waiting for that flush (`synchronous_commit = off` for that
transaction only): each is followed by a synchronous commit of the same trial (a parameter, a
report, its tell, or another worker failing it as stale), and WAL is flushed in order, so
what that commit makes durable includes them. Visibility to other workers is immediate; only a
crash of the database server itself within ~0.6 s of such a write, with no synchronous commit
in between, could lose it (the WAL writer flushes every 200 ms). A trial a worker creates
needs none of these: its beat and attributes ride on Optuna's own transactions
(`search._admission`); they remain for taken WAITING trials, failures and other callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna


def _rdb_backend(storage: Any) -> Any | None:
    backend = getattr(storage, "_backend", storage)
    if hasattr(backend, "check_trial_is_updatable") and hasattr(backend, "scoped_session"):
        return backend
    return None


@contextmanager
def _trial_write(backend: Any, trial_id: int) -> Iterator[Any]:
    """A transaction's connection on a running trial (else UpdateFinishedTrialError), committed
    without waiting for the WAL flush on PostgreSQL (see the module's docstring)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func, select

    trial = models.TrialModel
    with _create_scoped_session(backend.scoped_session) as session:
        # Core, not the ORM: this runs a few times a trial and the ORM's bookkeeping is not free.
        conn = session.connection()
        query = select(trial.state).where(trial.trial_id == trial_id)
        if conn.dialect.name == "postgresql":
            # SET LOCAL, in the same round trip as the state.
            query = query.add_columns(func.set_config("synchronous_commit", "off", True))
        state = conn.execute(query).scalar()
        if state is None:
            raise KeyError(models.NOT_FOUND_MSG)  # as Optuna's find_or_raise_by_id
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
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(model)
        stmt = stmt.on_conflict_do_update(index_elements=key,
                                          set_={update: stmt.excluded[update]})
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert

        stmt = insert(model)
        stmt = stmt.on_duplicate_key_update({update: stmt.inserted[update]})
    else:
        return None
    _UPSERTS[dialect, model.__tablename__] = stmt
    return stmt


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any], *,
                   system_attrs: dict[str, Any] | None = None) -> None:
    """Set `attrs` (and `system_attrs`, new keys) on a running trial, in one transaction
    where the storage allows it."""
    backend = _rdb_backend(trial.storage)
    if backend is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in (system_attrs or {}).items():
            trial.storage.set_trial_system_attr(trial._trial_id, key, value)
        return
    with _trial_write(backend, trial._trial_id) as conn:
        write_attrs(conn, trial._trial_id, attrs, system_attrs)


def write_attrs(conn: Any, trial_id: int, attrs: dict[str, Any],
                system_attrs: dict[str, Any] | None = None) -> None:
    """Upsert user attrs (and insert new system attrs) of a trial on `conn`, in its transaction,
    without checking the trial's state: the caller's transaction does."""
    import json

    from optuna.storages._rdb import models
    from sqlalchemy import delete, insert

    model = models.TrialUserAttributeModel
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
        conn.execute(insert(models.TrialSystemAttributeModel), [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in system_attrs.items()])


def first_heartbeat(storage: Any, trial_id: int) -> None:
    """The first heartbeat of a trial that just started (its later ones: `record_heartbeat`)."""
    from optuna.storages._rdb import models

    backend = _rdb_backend(storage)
    upsert = backend and _upsert_statement(backend.engine.dialect.name,
                                           models.TrialHeartbeatModel, ["trial_id"], "heartbeat")
    if upsert is None:
        storage.record_heartbeat(trial_id)
        return
    # The column's default is the server's clock, as Optuna's record_heartbeat writes it.
    with _trial_write(backend, trial_id) as conn:
        conn.execute(upsert, [{"trial_id": trial_id}])


def state_counts(study: optuna.Study) -> dict[Any, int]:
    """Trials of `study` by TrialState, in one query where the storage allows it."""
    from optuna.trial import TrialState

    backend = _rdb_backend(study._storage)
    counts = dict.fromkeys(TrialState, 0)
    if backend is None:
        for t in study.get_trials(deepcopy=False):
            counts[t.state] += 1
        return counts
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func, select

    query = (select(models.TrialModel.state, func.count())
             .where(models.TrialModel.study_id == study._study_id)
             .group_by(models.TrialModel.state))
    with _create_scoped_session(backend.scoped_session) as session:
        for state, n in session.connection().execute(query):
            counts[state] = n
    return counts


def retried_from(trial: optuna.Trial) -> int | None:
    """The number of the dead trial this one retries (the latest, for a retry of a retry)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    # The frozen trial fetched when the trial started carries the retry link (a system attr),
    # so no further storage read is needed.
    frozen = getattr(trial, "_cached_frozen_trial", None)
    if frozen is None:
        frozen = trial.storage.get_trial(trial._trial_id)
    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return history[-1] if history else None
