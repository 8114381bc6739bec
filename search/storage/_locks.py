"""The budget lock: "count the trials, then start one" and "fail the stale trials, then queue
their retries" never interleave.

The count happens in the transaction that creates the trial, after Optuna locks the study's row
(`_trial_start`). Failing a dead worker's trial and queueing its retry are two steps, though:
between them the logical trial is neither running nor waiting, and a worker counting then
would start a new trial on top of the retry (the budget overshot). So a worker holds the lock
from just before its trial is created until it exists, and while it fails stale trials. SQLite:
a file lock beside the database (one machine by design). MySQL: the server's named lock
(GET_LOCK, waited for on the server 10 s at a time, between which the waiter asks who holds it:
it gives up only when one holder has kept it for 300 s) on a connection of its own. Through the
gRPC proxy a worker holds none: the proxy starts trials and fails stale ones itself, under this
same lock taken on its database (`_proxy_methods`).

PostgreSQL: a transaction-scoped advisory lock, taken in a transaction and released by its
COMMIT. That is right both direct and through PgBouncer's transaction pooling, where a
session-level lock is not (`pg_advisory_lock` and its unlock may land on two server
connections: a lock that never frees, or two holders): PgBouncer gives a client one server
connection from its BEGIN to its COMMIT, so the lock lives and dies on that one. A holder that
dies frees it: its socket closes, PgBouncer closes the server connection it was in a
transaction on, and PostgreSQL rolls back (a host that vanishes without closing its socket is
cut by TCP keepalives, or by PgBouncer's `idle_transaction_timeout`).

A worker's lock is bound to its storage (`DatabaseLock.bind`): the lock's transaction is one of
the storage's own connections, and while it is held every storage call of the holder's thread
runs inside it (Optuna's sessions joined to it, each call a savepoint), so the holder's work is
on the server connection it already has and never queues for another behind the waiters. A
waiter does not wait on the server: it tries (`pg_try_advisory_xact_lock` in a new
transaction), rolls back and sleeps between tries (1 ms doubling to 250 ms, jittered: 1,000
waiters try at most ~4,000 times a second), so between tries its server connection goes back to
PgBouncer's pool for other clients' calls; it gives up only when one holder has kept the lock
for 300 s, not while the lock changes hands. (Waiters blocked on the server in
`pg_advisory_xact_lock` each hold a server connection for their whole wait: measured through a
20-connection pool, everything else queued behind them; at 300 workers 44 workers' trials were
failed as stale while they ran, and at 1,000 no trial ended in 90 s.) A worker lets go as soon
as its trial exists, before `ask` reads it back (`search.trial._runner`): the lock is held for a
few statements. A lock bound to no storage tries the same way on a connection of its own, and
its holder's work goes through the storage's other connections.

Connections per worker for the lock: bound, none beyond its storage's pool (the lock's
transaction takes one of the pool's for a few milliseconds a trial); unbound, one client
connection of its own, kept between trials (pinged when it sat idle), which through PgBouncer
holds a server connection only from the lock's BEGIN to its COMMIT.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import optuna
import sqlalchemy
import sqlalchemy.orm

from search._urls import sqlite_path
from search.storage._compat import join_sessions, rdb_backend, storage_of
from search.storage._open import install_idle_ping


class Lock(Protocol):
    """The budget lock: held from a budget check until the trial it admits exists."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def bind(self, storage: Any) -> None:
        """Where the lock can, its holder's storage calls run in the lock's transaction."""

class NullLock:
    """No lock: where the storage itself serializes trial starts (or nothing can)."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def bind(self, storage: Any) -> None:
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

    def bind(self, storage: Any) -> None:
        pass  # SQLite: one writer at a time anyway; the file lock is beside the database

# MySQL: the named lock, waited for on the server a look's time at a time (:s seconds); its
# holder: the connection id IS_USED_LOCK answers (NULL: free).
_MYSQL_TAKE, _MYSQL_GIVE = "SELECT GET_LOCK(:k, :s)", "SELECT RELEASE_LOCK(:k)"
_MYSQL_HOLDER = "SELECT IS_USED_LOCK(:k)"
# PostgreSQL, unbound: one round trip opens the lock's transaction and tries the lock in it;
# COMMIT (or a failed try's ROLLBACK) ends it. Sent whole, as text, on a connection in autocommit.
_PG_TRY = "BEGIN; SELECT pg_try_advisory_xact_lock(hashtext(:k))"
_WAIT_S = 300.0  # the longest one holder may keep the lock while a worker waits for it
# Bound: tried in a transaction of the storage's pool that the holder's calls then join.
_PG_TRY_BOUND = "SELECT pg_try_advisory_xact_lock(hashtext(:k))"
_PG_FIRST_SLEEP_S, _PG_MAX_SLEEP_S = 0.001, 0.25
# The lock's holder: its server process and its transaction's start (pg_locks spells a bigint
# key as classid, its high half, and objid, its low half). No row: nobody holds it.
_PG_HOLDER = ("SELECT a.pid, a.xact_start FROM pg_locks l JOIN pg_stat_activity a "
              "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
              "AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext(:k)::bigint")
_HOLDER_EVERY_S = 10.0  # how often a waiter looks who holds the lock


def _tries(key: str, holder: Callable[[], Any]) -> Iterator[None]:
    """Paces a waiter's tries: the first at once, then after a sleep of 1 ms doubling to 250
    ms, jittered (1,000 waiters try at most ~4,000 times a second). Every 10 s it asks
    `holder()` who holds the lock: TimeoutError once one holder has kept it for 300 s. A lock
    that changes hands is waited for as long as it does: with a thousand workers of short
    trials a waiter's turn can come later than 300 s (measured: 148 of 1,000 workers through
    PgBouncer ended on a fixed 300 s limit while the study went on)."""
    now = time.monotonic()
    look = now + _HOLDER_EVERY_S
    patience = _Patience(key)
    sleep = _PG_FIRST_SLEEP_S
    while True:
        yield
        now = time.monotonic()
        if now >= look:
            patience.saw(holder())
            look = now + _HOLDER_EVERY_S
        patience.check()
        time.sleep(sleep * random.uniform(0.5, 1.5))
        sleep = min(sleep * 2, _PG_MAX_SLEEP_S)


class _Patience:
    """A waiter's patience with the lock's holders: TimeoutError (`check`) once the holder it
    `saw` last has kept the lock for _WAIT_S; a new holder, or none, starts the count again."""

    def __init__(self, key: str) -> None:
        self.key, self.last = key, None
        self.deadline = time.monotonic() + _WAIT_S

    def saw(self, holder: Any) -> None:
        if holder is None or holder != self.last:  # free a moment ago, or another: progress
            self.deadline, self.last = time.monotonic() + _WAIT_S, holder

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"could not take the budget lock {self.key!r}: one holder has "
                               f"kept it for {_WAIT_S:.0f} s")


def _holder(conn: Any, key: str, *, own_transaction: bool) -> Callable[[], Any]:
    """Who holds the PostgreSQL lock on `key`, asked on `conn` (in a transaction of its own
    when `own_transaction`: the bound lock's connection, not in autocommit)."""
    def ask() -> Any:
        if own_transaction:
            with conn.begin():
                row = conn.execute(sqlalchemy.text(_PG_HOLDER), {"k": key}).first()
        else:
            row = conn.execute(sqlalchemy.text(_PG_HOLDER), {"k": key}).first()
        return None if row is None else tuple(row)

    return ask


class DatabaseLock:
    """A named lock of the database server (MySQL GET_LOCK, a PostgreSQL transaction-scoped
    advisory lock).

    Bound to a storage (PostgreSQL), the lock is a transaction on one of the storage's own
    connections that the holder's storage calls join (`bind`, `_Joined`). Otherwise it is taken
    on a connection of its own, kept between trials (pinged when it sat idle, so a restarted
    server is noticed), in autocommit: taking a free lock and releasing it are one round trip
    each. PostgreSQL's lock is the open transaction's (see the module's docstring).
    """

    def __init__(self, url: str, key: str) -> None:
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0,
                                                pool_recycle=300, isolation_level="AUTOCOMMIT")
        install_idle_ping(self._engine)
        self._postgres = self._engine.dialect.name == "postgresql"
        self._key = key[:64]  # MySQL's limit on lock names
        self._conn: Any = None
        self._bound: list[Any] = []  # RDB storages whose calls join the lock's transaction
        self._joined: _Joined | None = None

    def bind(self, storage: Any) -> None:
        """PostgreSQL: hold the lock in a transaction of `storage`'s own engine, in which the
        holder's thread's calls of that storage (and of any view sharing its sessions) run until
        `release` commits it. `storage`: a study, or its storage. Elsewhere (MySQL, a storage
        the fast paths do not know) nothing changes."""
        if isinstance(storage, optuna.Study):
            storage = storage_of(storage)
        backend = rdb_backend(storage)
        if (not self._postgres or backend is None
                or backend.engine.dialect.name != "postgresql"
                or any(b.scoped_session is backend.scoped_session for b in self._bound)):
            return
        self._bound.append(backend)

    @property
    def held(self) -> bool:
        return self._conn is not None or self._joined is not None

    def acquire(self) -> None:
        if self.held:
            return
        if self._bound:
            self._joined = _Joined.take(self._bound, self._key)
            return
        conn = self._engine.connect()
        try:
            if self._postgres:
                self._take_postgres(conn)
            else:
                self._take_mysql(conn)
        except BaseException:
            conn.invalidate()  # whatever state it is in, the server drops its locks with it
            conn.close()
            raise
        self._conn = conn

    def _take_postgres(self, conn: Any) -> None:
        """Try in a new transaction until the lock is this one's; the transaction stays open."""
        for _ in _tries(self._key, _holder(conn, self._key, own_transaction=False)):
            if conn.execute(sqlalchemy.text(_PG_TRY), {"k": self._key}).scalar():
                return
            conn.execute(sqlalchemy.text("ROLLBACK"))  # the server connection goes back

    def _take_mysql(self, conn: Any) -> None:
        """Wait on the server a look's time at a time; between waits, see who holds it."""
        patience = _Patience(self._key)
        while True:
            got = conn.execute(sqlalchemy.text(_MYSQL_TAKE),
                               {"k": self._key, "s": _HOLDER_EVERY_S}).scalar()
            if got == 1:
                return
            if got is None:  # (0: the wait went by)
                raise TimeoutError(f"could not take the budget lock {self._key!r} (GET_LOCK "
                                   "answered NULL: the server's error)")
            patience.saw(conn.execute(sqlalchemy.text(_MYSQL_HOLDER), {"k": self._key}).scalar())
            patience.check()

    def release(self) -> None:
        joined, self._joined = self._joined, None
        if joined is not None:
            joined.end()
            return
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


class _Joined:
    """A bound PostgreSQL lock, held: a transaction on a connection of the bound storages' own
    engine that took the advisory lock, and a session on it (each use a savepoint) that the
    holder's thread's storage calls take until `end` commits the transaction."""

    def __init__(self, conn: Any, transaction: Any, session: Any,
                 restore: Callable[[], None]) -> None:
        self.conn, self.transaction, self.session, self.restore = (conn, transaction, session,
                                                                   restore)

    @classmethod
    def take(cls, backends: list[Any], key: str) -> _Joined:
        """Try the lock, each try in a new transaction (rolled back while another holds the
        lock: its server connection goes back to PgBouncer's pool between tries, for other
        clients' calls), until one gets it; that transaction stays open."""
        conn = backends[0].engine.connect()
        try:
            for _ in _tries(key, _holder(conn, key, own_transaction=True)):
                transaction = conn.begin()
                if conn.execute(sqlalchemy.text(_PG_TRY_BOUND), {"k": key}).scalar():
                    break
                transaction.rollback()
        except BaseException:
            conn.invalidate()  # the server drops a lock taken with it, if any
            conn.close()
            raise
        session = sqlalchemy.orm.Session(bind=conn, join_transaction_mode="create_savepoint")
        return cls(conn, transaction, session, join_sessions(backends, session))

    def end(self) -> None:
        """Commit: what the holder wrote becomes visible and the lock is free. A commit that
        fails drops the connection (the server rolls back and frees the lock with it) and
        raises: the holder's writes are lost, and its caller retries as for any lost call."""
        self.restore()
        try:
            self.session.close()
            self.transaction.commit()
        except BaseException:
            self.conn.invalidate()
            raise
        finally:
            self.conn.close()


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
