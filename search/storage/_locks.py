"""The budget lock: "count the trials, then start one" and "fail the stale trials, then queue
their retries" never interleave.

The count happens in the transaction that creates the trial, after Optuna locks the study's row
(`_trial_start`). Failing a dead worker's trial and queueing its retry are two steps, though:
between them the logical trial is neither running nor waiting, and a worker counting then
would start a new trial on top of the retry (the budget overshot). So a worker holds the lock
from just before its trial is created until it exists, and while it fails stale trials. SQLite:
a file lock beside the database (one machine by design). MySQL: the server's named lock
(GET_LOCK, waited for on the server) on a connection of its own. Through the gRPC proxy a
worker holds none: the proxy starts trials and fails stale ones itself, under this same lock
taken on its database (`_proxy_methods`).

PostgreSQL: a transaction-scoped advisory lock (`pg_try_advisory_xact_lock`), held by a
transaction left open on the lock's own connection and released by its COMMIT. That is right
both direct and through PgBouncer's transaction pooling, where a session-level lock is not
(`pg_advisory_lock` and its unlock may land on two server connections: a lock that never frees,
or two holders): PgBouncer gives a client one server connection from its BEGIN to its COMMIT,
so the lock lives and dies on that one. A holder that dies frees it: its socket closes,
PgBouncer closes the server connection it was in a transaction on, and PostgreSQL rolls back
(a host that vanishes without closing its socket is cut by TCP keepalives, or by PgBouncer's
`idle_transaction_timeout`). A waiter does not wait on the server: it tries, and sleeps between
tries (1 ms doubling to 250 ms, jittered: 1,000 waiters try at most ~4,000 times a second), so
only the holder pins a server connection; waiters blocked in `pg_advisory_xact_lock` would take
the whole server pool and leave none for the holder's own trial creation (a deadlock until
PgBouncer's query_wait_timeout).

Connections per worker for the lock: one client connection, kept between trials (pinged when it
sat idle). Direct, that is one PostgreSQL connection per worker, beside its storage's pool;
through PgBouncer it holds a server connection only from the lock's BEGIN to its COMMIT.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import time
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

# MySQL: the named lock, waited for on the server up to 300 s.
_MYSQL_TAKE, _MYSQL_GIVE = "SELECT GET_LOCK(:k, 300)", "SELECT RELEASE_LOCK(:k)"
# PostgreSQL: one round trip opens the lock's transaction and tries the lock in it; COMMIT (or
# a failed try's ROLLBACK) ends it. Sent whole, as text, on a connection in autocommit.
_PG_TRY = "BEGIN; SELECT pg_try_advisory_xact_lock(hashtext(:k))"
_PG_WAIT_S = 300.0  # as GET_LOCK's
_PG_FIRST_SLEEP_S, _PG_MAX_SLEEP_S = 0.001, 0.25


class DatabaseLock:
    """A named lock of the database server (MySQL GET_LOCK, a PostgreSQL transaction-scoped
    advisory lock) on a connection of its own.

    The connection is kept between trials (pinged when it sat idle, so a restarted server is
    noticed). It runs in autocommit: taking a free lock and releasing it are one round trip
    each. PostgreSQL's lock is the open transaction's (see the module's docstring).
    """

    def __init__(self, url: str, key: str) -> None:
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0,
                                                pool_recycle=300, isolation_level="AUTOCOMMIT")
        install_idle_ping(self._engine)
        self._postgres = self._engine.dialect.name == "postgresql"
        self._key = key[:64]  # MySQL's limit on lock names
        self._conn: Any = None

    def acquire(self) -> None:
        if self._conn is not None:
            return
        conn = self._engine.connect()
        try:
            if self._postgres:
                self._take_postgres(conn)
            else:
                got = conn.execute(sqlalchemy.text(_MYSQL_TAKE), {"k": self._key}).scalar()
                if got != 1:  # 0: 300 s went by; NULL: the server's error
                    raise TimeoutError(f"could not take the budget lock {self._key!r} "
                                       f"(GET_LOCK answered {got})")
        except BaseException:
            conn.invalidate()  # whatever state it is in, the server drops its locks with it
            conn.close()
            raise
        self._conn = conn

    def _take_postgres(self, conn: Any) -> None:
        """Try in a new transaction until the lock is this one's; the transaction stays open."""
        deadline = time.monotonic() + _PG_WAIT_S
        sleep = _PG_FIRST_SLEEP_S
        while not conn.execute(sqlalchemy.text(_PG_TRY), {"k": self._key}).scalar():
            conn.execute(sqlalchemy.text("ROLLBACK"))  # the server connection goes back
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not take the budget lock {self._key!r} in "
                                   f"{_PG_WAIT_S:.0f} s")
            time.sleep(sleep * random.uniform(0.5, 1.5))
            sleep = min(sleep * 2, _PG_MAX_SLEEP_S)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._postgres:
                conn.execute(sqlalchemy.text("COMMIT"))  # the lock ends with its transaction
            else:
                conn.execute(sqlalchemy.text(_MYSQL_GIVE), {"k": self._key})
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
    return NullLock()  # the gRPC proxy: the proxy takes the lock itself (_proxy_methods)
