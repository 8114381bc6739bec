"""Starting trials against the budget: exact under concurrent workers on every backend, and the
server's locks, MySQL's named lock and PostgreSQL's transaction-scoped one (exclusive, one kept
connection, survive their connection being killed; bound to a worker's storage, its holder's
writes in the lock's own transaction and the lock let go before the sampler runs; through
PgBouncer: test_pgbouncer.py)."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import sqlalchemy

from search.run import create_or_load
from search.spec import parse_spec
from search.storage import (
    BudgetReached,
    DatabaseLock,
    FileLock,
    WorkerHeartbeat,
    budget_lock,
    on_started,
    open_storage,
    quiet_optuna_warnings,
    with_retry,
    worker_study,
)
from tests.search_tests.studies import study_data

quiet_optuna_warnings()
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")

def _spec(name: str):
    return parse_spec(study_data(name, trials=12, epochs=1, size=None, hidden=8))


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "postgres-unbound", "mysql"])
def test_concurrent_starts_never_overshoot_the_budget(backend, request, study_name):
    # As workers take it: bound to the worker's storage (PostgreSQL: the holder's writes in the
    # lock's transaction) and let go once the trial exists; unbound, the lock of its own.
    backend, _, unbound = backend.partition("-")
    url = request.getfixturevalue(f"{backend}_url")
    spec = _spec(study_name)
    create_or_load(spec, open_storage(url))
    # A file lock for SQLite; the server's named lock for MySQL and PostgreSQL (the study's row
    # lock alone would leave a window between a stale trial's failing and its retry's queueing).
    expected = {"sqlite": FileLock, "postgres": DatabaseLock, "mysql": DatabaseLock}[backend]
    assert type(budget_lock(url, study_name)) is expected
    started: list[int] = []
    refused: list[BudgetReached] = []
    go = threading.Barrier(4)

    def worker() -> None:
        # Each its own storage, engine and lock, as separate processes or machines have.
        study = optuna.load_study(study_name=study_name, storage=open_storage(
            url, heartbeat_interval=5, grace_period=20))
        view, lock = worker_study(study, budget=12), budget_lock(url, study_name)
        if not unbound:
            lock.bind(study)
            on_started(view, lock.release)
        go.wait()
        while True:
            lock.acquire()
            try:
                started.append(view.ask().number)  # stays RUNNING: counts against the budget
            except BudgetReached as full:
                refused.append(full)
                return
            finally:
                lock.release()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(started) == list(range(12))
    assert len(refused) == 4 and all(r.counts.running == 12 for r in refused)

def test_a_waiting_trial_is_not_taken_once_the_budget_is_finished(sqlite_url, study_name):
    spec = _spec(study_name)
    study = create_or_load(spec, open_storage(sqlite_url))
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    study.enqueue_trial({"lr": 0.01})
    with pytest.raises(BudgetReached) as full:
        worker_study(study, budget=2).ask()
    assert full.value.counts.finished == 2 and full.value.counts.waiting == 1
    taken = worker_study(study, budget=3).ask()
    assert taken.number == 2 and taken.suggest_float("lr", 1e-3, 0.1, log=True) == 0.01

def _connection_id(lock: DatabaseLock) -> int:
    return lock._conn.execute(sqlalchemy.text("SELECT CONNECTION_ID()")).scalar()

def one_holder_at_a_time(url: str, name: str) -> DatabaseLock:
    first, second = budget_lock(url, name), budget_lock(url, name)
    assert isinstance(first, DatabaseLock)
    first.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    time.sleep(0.5)
    assert not got.is_set()  # blocked while the first holds it
    first.release()
    waiter.join(timeout=10)
    assert got.is_set()
    second.release()
    return first


def test_postgres_lock_one_holder_at_a_time(postgres_url, study_name):
    one_holder_at_a_time(postgres_url, study_name)


def test_mysql_lock_one_holder_at_a_time_and_one_connection_kept(mysql_url, study_name):
    first = one_holder_at_a_time(mysql_url, study_name)
    first.acquire()
    connection = _connection_id(first)
    first.release()
    first.acquire()
    assert _connection_id(first) == connection  # the same connection, not a new one per trial
    first.release()

def test_a_killed_mysql_lock_connection_is_replaced(mysql_url, study_name):
    lock = budget_lock(mysql_url, study_name)
    lock.acquire()
    connection = _connection_id(lock)
    lock.release()
    engine = sqlalchemy.create_engine(mysql_url)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"KILL {int(connection)}"))
    engine.dispose()
    with_retry(lock.acquire, what="taking the budget lock", log=lambda message: None)
    assert _connection_id(lock) != connection
    lock.release()

def test_a_mysql_waiter_gives_up_only_on_one_holder(mysql_url, study_name, monkeypatch):
    """MySQL's lock waited for on the server a look at a time (here 0.2 s): a holder that
    keeps it past the patience (here 1 s) ends the wait with TimeoutError, naming it; a lock
    its holder lets go of meanwhile is taken. (The count starting again for a new holder is
    `_Patience`'s, tested below and through PostgreSQL in test_pgbouncer.py.)"""
    from search.storage import _locks

    monkeypatch.setattr(_locks, "_WAIT_S", 1.0)
    monkeypatch.setattr(_locks, "_HOLDER_EVERY_S", 0.2)
    key = f"hpsearch:{study_name}"
    engine = sqlalchemy.create_engine(mysql_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as holder:
            assert holder.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 0)"), {"k": key}).scalar()
            waiter = budget_lock(mysql_url, study_name)
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="one holder has kept it for 1 s"):
                waiter.acquire()
            assert 1.0 <= time.monotonic() - started < 10
            letting_go = threading.Timer(0.7, lambda: holder.execute(
                sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": key}))
            letting_go.start()
            waiter.acquire()  # taken once the holder let go, within the patience
            # (the holder's thread may still be reading its answer: done with its connection
            # before this one closes it)
            letting_go.join(timeout=10)
            waiter.release()
    finally:
        engine.dispose()


def test_patience_starts_again_for_each_new_holder(monkeypatch):
    from search.storage import _locks

    now = [0.0]
    monkeypatch.setattr(_locks.time, "monotonic", lambda: now[0])
    patience = _locks._Patience("k")
    for step, holder in enumerate((7, 8, None, 9), start=1):  # 200 s each, a new holder each
        now[0] = 200.0 * step
        patience.saw(holder)
        patience.check()
    now[0] += 299.0
    patience.saw(9)  # the same holder: the count goes on
    patience.check()
    now[0] += 2.0
    with pytest.raises(TimeoutError, match="one holder has kept it for 300 s"):
        patience.check()


def _backend_pid(lock: DatabaseLock) -> int:
    return lock._conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()

def test_postgres_lock_keeps_one_connection_and_a_killed_one_frees_it(postgres_url, study_name):
    lock, other = budget_lock(postgres_url, study_name), budget_lock(postgres_url, study_name)
    lock.acquire()
    backend = _backend_pid(lock)
    lock.release()
    lock.acquire()
    assert _backend_pid(lock) == backend  # the same connection, not a new one per trial
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": backend})
    engine.dispose()
    other.acquire()  # the lock went with its transaction's connection
    other.release()
    lock.release()  # its COMMIT fails: the connection is discarded, nothing raised
    with_retry(lock.acquire, what="taking the budget lock", log=lambda message: None)
    assert _backend_pid(lock) != backend
    lock.release()


def _visible(url: str, name: str) -> int:
    """The trials of study `name` another connection sees."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM trials JOIN studies USING (study_id) "
                "WHERE study_name = :n"), {"n": name}).scalar()
    finally:
        engine.dispose()


def test_a_bound_lock_holds_its_holders_writes_in_its_own_transaction(postgres_url, study_name):
    create_or_load(_spec(study_name), open_storage(postgres_url))
    studies = [optuna.load_study(study_name=study_name, storage=open_storage(postgres_url))
               for _ in range(2)]
    first, second = budget_lock(postgres_url, study_name), budget_lock(postgres_url, study_name)
    first.bind(studies[0])
    second.bind(studies[1])
    first.acquire()
    view = worker_study(studies[0], budget=12)
    view.ask()
    view.ask()
    assert _visible(postgres_url, study_name) == 0  # in the lock's transaction, not committed
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    assert not got.wait(0.5)  # waits while the first holds it
    first.release()
    waiter.join(timeout=10)
    assert got.is_set() and _visible(postgres_url, study_name) == 2
    second.release()
    for lock in (first, second):  # no connection of its own: the storage's pool's only
        assert lock._engine.pool.checkedin() + lock._engine.pool.checkedout() == 0
    # Outside the lock the storage's calls are its own again, committed as they go.
    studies[0].tell(view.ask(), 1.0)
    assert _visible(postgres_url, study_name) == 3


class _Watching(optuna.samplers.RandomSampler):
    """Records, each time a trial is asked, whether the budget lock is held as the sampler
    first sees the trial (`before_trial`, inside `Study.ask`)."""

    def __init__(self, lock: DatabaseLock) -> None:
        super().__init__(seed=0)
        self.lock, self.held = lock, []

    def before_trial(self, study, trial):
        self.held.append(self.lock.held)
        super().before_trial(study, trial)


def test_the_runner_lets_go_of_the_lock_once_the_trial_exists(postgres_url, study_name):
    from search.trial._runner import TrialRunner

    create_or_load(_spec(study_name), open_storage(postgres_url))
    lock = budget_lock(postgres_url, study_name)
    study = optuna.load_study(study_name=study_name, sampler=_Watching(lock),
                              storage=open_storage(postgres_url, heartbeat_interval=5))
    heartbeat = WorkerHeartbeat(study)
    study.enqueue_trial({"lr": 0.01})  # the first taken from the queue, the second created
    runner = TrialRunner(None, study, worker_study(study, budget=12), heartbeat, lock, 12)
    try:
        trials = [runner.ask(), runner.ask()]
        for trial in trials:
            trial.suggest_float("lr", 1e-3, 0.1, log=True)
        assert [t.number for t in trials] == [0, 1]
        assert study.sampler.held == [False, False]
        assert not lock.held and _visible(postgres_url, study_name) == 2
    finally:
        heartbeat.close()


def test_a_trial_started_after_a_long_wait_for_the_lock_beats_at_its_start(postgres_url,
                                                                           study_name):
    # PostgreSQL's CURRENT_TIMESTAMP is a transaction's start: a first beat written in a
    # transaction that began before a wait would be as old as the wait, and a trial that
    # waited past the grace period would be failed as stale the moment it began.
    create_or_load(_spec(study_name), open_storage(postgres_url))
    studies = [optuna.load_study(study_name=study_name, storage=open_storage(
        postgres_url, heartbeat_interval=5, grace_period=20)) for _ in range(2)]
    first, second = budget_lock(postgres_url, study_name), budget_lock(postgres_url, study_name)
    first.bind(studies[0])
    second.bind(studies[1])
    view = worker_study(studies[1], budget=12)
    engine = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    clock = "SELECT clock_timestamp()::timestamp"
    try:
        first.acquire()
        with engine.connect() as conn:
            waited_from = conn.execute(sqlalchemy.text(clock)).scalar()
        started: list[int] = []

        def start() -> None:
            second.acquire()
            try:
                started.append(view.ask().number)
            finally:
                second.release()

        waiter = threading.Thread(target=start)
        waiter.start()
        time.sleep(2.0)
        first.release()
        waiter.join(timeout=10)
        assert started == [0]
        with engine.connect() as conn:
            beat = conn.execute(sqlalchemy.text(
                "SELECT heartbeat FROM trial_heartbeats JOIN trials USING (trial_id) "
                "JOIN studies USING (study_id) WHERE study_name = :n"), {"n": study_name}).scalar()
        assert (beat - waited_from).total_seconds() > 1.5  # stamped after the wait, not before
    finally:
        engine.dispose()
