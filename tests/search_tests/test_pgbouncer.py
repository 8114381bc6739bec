"""The budget lock through PgBouncer's transaction pooling, with a real PgBouncer (Debian's,
tests/servers.py) in front of the real PostgreSQL: one holder at a time among many clients
sharing a small server pool, more workers opening their storages at once than that pool,
workers' bound locks that start exactly the budget through that pool without a deadlock, a
killed holder's lock freed within seconds, and `hpsearch worker` processes that meet the exact
budget through it while a killed worker's trial is retried.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.run import create_or_load, load
from search.spec import parse_spec
from search.storage import (
    BudgetReached,
    DatabaseLock,
    _locks,
    budget_lock,
    count_trials,
    on_started,
    open_storage,
    worker_study,
)
from tests.search_tests.conftest import POSTGRES_URL, server_url
from tests.search_tests.studies import study_data
from tests.search_tests.test_workers import (
    create,
    running_with_epochs,
    slow,
    start_worker,
    wait_for,
)
from tests.servers import pgbouncer, pgbouncer_admin

POOL = 5  # PgBouncer's server connections: far fewer than its clients here
CLIENTS, ROUNDS = 60, 5


@pytest.fixture(scope="module")
def bouncer() -> Iterator[str]:
    server_url(POSTGRES_URL, "PostgreSQL")
    with pgbouncer(pool_size=POOL) as url:
        yield url


def held(key: str) -> int:
    """How many sessions of the PostgreSQL server hold the advisory lock on `key` (pg_locks
    spells a bigint key as classid, its high half, and objid, its low half)."""
    engine = sqlalchemy.create_engine(POSTGRES_URL, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                "objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = "
                "hashtext(:k)::bigint"), {"k": key}).scalar()
    finally:
        engine.dispose()


def servers_of(url: str) -> int:
    """The server connections PgBouncer holds for the `test` database."""
    return sum(int(p["sv_active"]) + int(p["sv_idle"]) + int(p["sv_used"]) + int(p["sv_tested"])
               + int(p["sv_login"]) for p in pgbouncer_admin(url, "SHOW POOLS")
               if p["database"] == "test")


def stuck_after(threads: list[threading.Thread], seconds: float) -> int:
    """Start `threads`; how many are still running `seconds` later (a deadlock's, or a hang's)."""
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return sum(t.is_alive() for t in threads)


def test_many_clients_over_a_small_server_pool_hold_the_lock_one_at_a_time(bouncer):
    # A read-modify-write of one row by 60 clients, each its own lock object and connection:
    # a second holder at any moment, or a lock that lands on the wrong server connection,
    # loses an update (or hangs: then not every client finishes).
    key, table = f"hpsearch:t-{uuid.uuid4().hex[:10]}", f"counter_{uuid.uuid4().hex[:10]}"
    direct = sqlalchemy.create_engine(POSTGRES_URL)
    with direct.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)"))
        conn.execute(sqlalchemy.text(f"INSERT INTO {table} VALUES (1, 0)"))
    counter = sqlalchemy.create_engine(bouncer, pool_size=CLIENTS, max_overflow=0,
                                       isolation_level="AUTOCOMMIT")
    holders, most, errors = [0], [0], []
    guard, go = threading.Lock(), threading.Barrier(CLIENTS)

    def client() -> None:
        lock = DatabaseLock(bouncer, key)
        go.wait()
        try:
            for _ in range(ROUNDS):
                lock.acquire()
                try:
                    with guard:
                        holders[0] += 1
                        most[0] = max(most[0], holders[0])
                    with counter.connect() as conn:
                        n = conn.execute(sqlalchemy.text(f"SELECT n FROM {table}")).scalar()
                        time.sleep(0.002)  # the window a second holder would need
                        conn.execute(sqlalchemy.text(f"UPDATE {table} SET n = :n"), {"n": n + 1})
                    with guard:
                        holders[0] -= 1
                finally:
                    lock.release()
        except Exception as e:  # noqa: BLE001 - reported below, with the count
            errors.append(f"{type(e).__name__}: {e}")

    try:
        stuck = stuck_after([threading.Thread(target=client, daemon=True)
                             for _ in range(CLIENTS)], 60)
        with direct.connect() as conn:
            count = conn.execute(sqlalchemy.text(f"SELECT n FROM {table}")).scalar()
        assert (stuck, errors[:3], most[0], count) == (0, [], 1, CLIENTS * ROUNDS), (
            "(clients stuck after 60 s, errors, most holders at once, the count)")
        assert held(key) == 0
        # It went through the pool: 60 clients over at most POOL server connections.
        assert 0 < servers_of(bouncer) <= POOL
    finally:
        counter.dispose()
        with direct.begin() as conn:
            conn.execute(sqlalchemy.text(f"DROP TABLE {table}"))
        direct.dispose()


def test_more_workers_opening_at_once_than_the_server_pool_all_open(bouncer):
    # Optuna's own schema check at opening reads on a second connection while its session's
    # transaction holds the first: 12 workers opening at once over 5 server connections waited
    # on each other until PgBouncer's query_wait_timeout. hpsearch's check takes one.
    opened, errors = [], []

    def open_one() -> None:
        try:
            opened.append(optuna.get_all_study_names(open_storage(bouncer)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    stuck = stuck_after([threading.Thread(target=open_one, daemon=True) for _ in range(12)], 60)
    assert (stuck, errors[:3], len(opened)) == (0, [], 12)


def test_bound_locks_over_a_small_server_pool_start_exactly_the_budget(bouncer, study_name):
    # As workers take it: bound to each worker's own storage, so the holder creates its trial
    # in the lock's own transaction and never needs another server connection, while waiters'
    # tries take the others. 12 workers over 5 server connections: none stuck (a holder needing
    # a second connection behind waiters blocked on the server would deadlock), exactly the
    # budget started, no lock left held.
    workers, budget = 12, 48
    create_or_load(parse_spec(study_data(study_name, trials=budget, epochs=1, size=None,
                                         hidden=8)), open_storage(bouncer))
    started, errors, go = [], [], threading.Barrier(workers)
    studies = [optuna.load_study(study_name=study_name, storage=open_storage(bouncer))
               for _ in range(workers)]

    def worker(study: optuna.Study) -> None:
        view, lock = worker_study(study, budget=budget), budget_lock(bouncer, study_name)
        lock.bind(study)
        on_started(view, lock.release)
        go.wait()
        try:
            while True:
                lock.acquire()
                try:
                    trial = view.ask()
                except BudgetReached:
                    return
                finally:
                    lock.release()
                started.append(trial.number)
                study.tell(trial, 1.0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    stuck = stuck_after([threading.Thread(target=worker, args=(study,), daemon=True)
                         for study in studies], 90)
    assert (stuck, errors[:3], sorted(started)) == (0, [], list(range(budget)))
    assert held(f"hpsearch:{study_name}") == 0
    assert 0 < servers_of(bouncer) <= POOL


HOLDER = """
import sys, time
from search.storage import DatabaseLock
DatabaseLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("path", ["pgbouncer", "direct"])
def test_a_holder_killed_while_holding_frees_the_lock_within_seconds(path, request):
    url = request.getfixturevalue("bouncer" if path == "pgbouncer" else "postgres_url")
    key = f"hpsearch:t-{uuid.uuid4().hex[:10]}"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, key], stdout=subprocess.PIPE,
                              text=True)
    waiter, took = DatabaseLock(url, key), threading.Event()
    try:
        assert holder.stdout.readline().strip() == "held"
        assert held(key) == 1
        threading.Thread(target=lambda: (waiter.acquire(), took.set()), daemon=True).start()
        assert not took.wait(1.0)  # held by the other process
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        assert took.wait(10), "the lock was not freed 10 s after its holder was killed"
        freed_s = time.monotonic() - killed
        assert freed_s < 3, f"freed {freed_s:.1f} s after its holder was killed"
        assert held(key) == 1  # the waiter's, now
        waiter.release()
        assert held(key) == 0
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("path", ["pgbouncer", "direct"])
def test_a_waiter_sees_who_holds_the_lock_and_gives_up_only_on_one_holder(
        path, request, monkeypatch):
    """The lock changing hands keeps a waiter waiting past the 300 s (here 1 s) a single holder
    may keep it; the same holder all that time ends the wait with TimeoutError."""
    url = request.getfixturevalue("bouncer" if path == "pgbouncer" else "postgres_url")
    key = f"hpsearch:t-{uuid.uuid4().hex[:10]}"
    monkeypatch.setattr(_locks, "_WAIT_S", 1.0)
    monkeypatch.setattr(_locks, "_HOLDER_EVERY_S", 0.2)
    first, second = DatabaseLock(url, key), DatabaseLock(url, key)
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            holder = _locks._holder(conn, key, own_transaction=False)
            assert holder() is None  # free
            first.acquire()
            one = holder()
            assert one is not None and holder() == one
            first.release()
            second.acquire()
            assert holder() not in (None, one)  # another transaction holds it now
            second.release()
    finally:
        engine.dispose()

    seen = iter(range(10**6))  # a new holder at every look: waited for as long as it changes
    tries = _locks._tries(key, lambda: next(seen))
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        next(tries)
    stuck = _locks._tries(key, lambda: (4242, "one transaction"))  # the same holder throughout
    with pytest.raises(TimeoutError, match="one holder has kept it"):
        while time.monotonic() - started < 10:
            next(stuck)


@pytest.mark.serial  # three workers killed and timed by the second: alone
def test_workers_through_pgbouncer_meet_the_budget_and_retry_a_killed_workers_trial(
        bouncer, tmp_path, study_name):
    study, _ = create(bouncer, slow(study_name, tmp_path, trials=4, epochs=4))
    workers = [start_worker(study_name, bouncer, tmp_path) for _ in range(3)]
    try:
        victim = wait_for(lambda: running_with_epochs(study, 1), timeout=120,
                          what="a trial an epoch in")
        dead = next(w for w in workers if w.pid == victim.user_attrs["pid"])
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        outs = {w.pid: w.communicate(timeout=240)[0] for w in workers if w is not dead}
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert all(w.returncode == 0 for w in workers if w is not dead), outs
    study, _ = load(study_name, open_storage(bouncer))
    trials = study.get_trials()
    assert count_trials(study).finished == 4  # the exact budget
    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    retried = [t.user_attrs["retried_from"] for t in trials if "retried_from" in t.user_attrs]
    assert victim.number in failed and sorted(retried) == sorted(failed)
    retry = next(t for t in trials if t.user_attrs.get("retried_from") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    lock = budget_lock(bouncer, study_name)
    lock.acquire()  # free: nobody left it held
    assert held(f"hpsearch:{study_name}") == 1
    lock.release()
    assert 0 < servers_of(bouncer) <= POOL
