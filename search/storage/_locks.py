"""The budget lock: "count the trials, then start one" and "fail the stale trials, then queue
their retries" never interleave.

The count happens in the transaction that creates the trial, after Optuna locks the study's row
(`_trial_start`). Failing a dead worker's trial and queueing its retry are two steps, though:
between them the logical trial is neither running nor waiting, and a worker counting then
would start a new trial on top of the retry (the budget overshot). So a worker holds the lock
from just before its trial is created until it exists, and while it fails stale trials. SQLite:
a file lock beside the database (one machine by design). MySQL and PostgreSQL: a named lock
(GET_LOCK, pg_advisory_lock) across machines, on a connection of its own. The gRPC proxy offers
none: there the budget may overshoot by up to the number of workers, as Optuna's own
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
    """The budget lock: held from a budget check until the trial it admits exists."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

class NullLock:
    """No lock: where the storage itself serializes trial starts (or nothing can)."""

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

# Taking and releasing a named lock, by dialect: MySQL's GET_LOCK (waits up to 300 s) and
# PostgreSQL's session-level advisory lock on the key's hash.
_LOCK_SQL = {
    "mysql": ("SELECT GET_LOCK(:k, 300)", "SELECT RELEASE_LOCK(:k)"),
    "postgresql": ("SELECT pg_advisory_lock(hashtext(:k)), 1",
                   "SELECT pg_advisory_unlock(hashtext(:k))"),
}


class DatabaseLock:
    """A named lock of the database server (MySQL GET_LOCK, PostgreSQL advisory lock) on a
    connection of its own.

    The connection is kept between trials (pinged when it sat idle, so a restarted server is
    noticed). It runs in autocommit: taking and releasing the lock are one round trip each.
    """

    def __init__(self, url: str, key: str) -> None:
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0,
                                                pool_recycle=300, isolation_level="AUTOCOMMIT")
        install_idle_ping(self._engine)
        self._take, self._give = _LOCK_SQL[self._engine.dialect.name]
        self._key = key[:64]  # MySQL's limit on lock names
        self._conn: Any = None

    def acquire(self) -> None:
        if self._conn is not None:
            return
        conn = self._engine.connect()
        try:
            got = conn.execute(sqlalchemy.text(self._take), {"k": self._key}).fetchone()[-1]
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
            conn.execute(sqlalchemy.text(self._give), {"k": self._key})
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
    if url.startswith(("mysql", "postgresql")):
        return DatabaseLock(url, key)
    return NullLock()  # the gRPC proxy: none
