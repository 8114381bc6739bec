"""Locks that make "count the trials, then start one" atomic where a row lock is not enough.

The count happens in the transaction that creates the trial, after Optuna locks the study's row
(`_trial_start`); on PostgreSQL that row lock is all it takes. SQLite has no row locks: a file
lock beside the database (one machine by design). MySQL: a named lock (GET_LOCK) across
machines, so the count does not depend on when InnoDB takes its repeatable-read snapshot. A
worker holds it from just before its trial is created until the trial exists. The gRPC proxy
offers none: there the budget may overshoot by up to the number of workers, as Optuna's own
MaxTrialsCallback does.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Any, Protocol

import sqlalchemy

from search._urls import sqlite_path
from search.storage._open import install_idle_ping


class Lock(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...

class NullLock:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

class FileLock:
    """flock on a file beside the SQLite database; released by the OS if the process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

class DatabaseLock:
    """A MySQL named lock (GET_LOCK) on a connection of its own.

    The connection is kept between trials (pinged when it sat idle, so a restarted server is
    noticed). It runs in autocommit: taking and releasing the lock are one round trip each.
    """

    def __init__(self, url: str, key: str) -> None:
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0,
                                                pool_recycle=300, isolation_level="AUTOCOMMIT")
        install_idle_ping(self._engine)
        self._key = key[:64]  # MySQL's limit on lock names
        self._conn: Any = None

    def acquire(self) -> None:
        if self._conn is not None:
            return
        conn = self._engine.connect()
        try:
            got = conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 300)"),
                               {"k": self._key}).scalar()
            if got != 1:
                raise TimeoutError(f"could not take the budget lock {self._key!r}")
        except BaseException:
            conn.invalidate()  # whatever state it is in, the server drops its locks with it
            conn.close()
            raise
        self._conn = conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": self._key})
        except Exception:  # closed below: the server drops the lock with the connection
            conn.invalidate()
        finally:
            conn.close()  # back to the pool, unlocked (or discarded)

def budget_lock(url: str, study_name: str) -> Lock:
    """The lock held around trial starts of `study_name` in the storage at `url`, where the
    storage's own row lock is not enough."""
    key = f"hpsearch:{study_name}"
    path = sqlite_path(url)
    if path is not None:
        return FileLock(f"{path}.{hashlib.sha1(key.encode()).hexdigest()[:12]}.lock")
    if url.startswith("mysql"):
        return DatabaseLock(url, key)
    return NullLock()  # PostgreSQL: the study's row lock (search.storage._trial_start); gRPC: none
