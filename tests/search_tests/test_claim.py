"""The budget lock on a real PostgreSQL server: exclusive, cheap to retake, and it survives its
connection being killed."""

from __future__ import annotations

import threading
import time

import sqlalchemy

from search._claim import DatabaseLock, budget_lock
from search._retry import with_retry


def _backend_pid(lock: DatabaseLock) -> int:
    return lock._conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()


def test_one_holder_at_a_time_and_one_connection_kept(postgres_url, study_name):
    first, second = budget_lock(postgres_url, study_name), budget_lock(postgres_url, study_name)
    assert isinstance(first, DatabaseLock)
    first.acquire()
    pid = _backend_pid(first)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    time.sleep(0.5)
    assert not got.is_set()  # blocked while the first holds it
    first.release()
    waiter.join(timeout=10)
    assert got.is_set()
    second.release()
    first.acquire()
    assert _backend_pid(first) == pid  # the same connection, not a new one per trial
    first.release()


def test_a_killed_lock_connection_is_replaced(postgres_url, study_name):
    lock = budget_lock(postgres_url, study_name)
    lock.acquire()
    pid = _backend_pid(lock)
    lock.release()
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    engine.dispose()
    with_retry(lock.acquire, what="taking the budget lock", log=lambda message: None)
    assert _backend_pid(lock) != pid
    lock.release()
