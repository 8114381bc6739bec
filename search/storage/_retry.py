"""Riding out a storage that goes away for a while (a database restart, a killed connection, the
storage proxy restarting).

A worker must not die because PostgreSQL restarted: storage calls that fail with a lost
connection (or SQLite's write lock held past its timeout) are retried with exponential backoff
until the storage answers again or a deadline passes. Every other storage failure (a full
disk, a lock or statement timeout, a read-only file, a constraint) is raised at once as a
StorageError: one line with the storage's own message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy.exc

from search._errors import StorageError
from search._log import logger
from search._urls import redact

T = TypeVar("T")
LOG = logger("storage")

RETRY_DEADLINE_S = 300.0  # how long a worker waits for its storage before giving up
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 15.0


# PostgreSQL error codes (SQLSTATE) of a lost connection or a server going down or starting
# up: class 08 (connection exception), admin/crash shutdown, "cannot connect now"; and a server
# out of connections (53300: max_connections, a role's CONNECTION LIMIT), which frees one as
# other clients leave (refused at connecting, psycopg2 gives no code: its words, below).
_PG_CONNECTION = ("57P01", "57P02", "57P03", "53300")
# MySQL/MariaDB client and server codes of the same: can't connect, server gone away, lost
# connection, server shutdown, connection killed, disconnected for inactivity.
_MYSQL_CONNECTION = {2002, 2003, 2006, 2013, 2055, 1053, 1927, 4031}
# Words of a lost connection where a driver gives no code (psycopg2 before it reaches the
# server, an unknown driver).
_CONNECTION_WORDS = ("server closed the connection", "could not connect", "connection refused",
                     "terminating connection", "connection reset", "connection timed out",
                     "lost connection", "gone away", "ssl connection has been closed",
                     "connection is closed", "connection already closed", "no connection to",
                     "the database system is", "could not receive data", "could not send data",
                     "too many clients already", "too many connections for")


def _driver_error(error: BaseException) -> BaseException | None:
    """The first SQLAlchemy error in `error`'s chain (Optuna wraps them in its own); None
    under a StorageError, hpsearch's final word (a storage that cannot be opened at all is
    not waited for)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return None
        if isinstance(e, sqlalchemy.exc.SQLAlchemyError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _proxy_unavailable(error: BaseException) -> bool:
    """Whether `error`'s chain holds a gRPC call the storage proxy did not answer: UNAVAILABLE
    (the proxy restarting, or its address not answering yet), as a lost connection is."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "code", None)
        if type(e).__module__.startswith("grpc") and callable(code):
            return getattr(code(), "name", None) == "UNAVAILABLE"
        e = e.__cause__ or e.__context__
    return False


def is_connection_error(error: BaseException) -> bool:
    """A lost connection or a server restarting (a database, or the storage proxy): worth
    waiting for. A full disk, a lock or statement timeout, a permissions error or a constraint
    is not, and is raised at once."""
    if _proxy_unavailable(error):
        return True
    e = _driver_error(error)
    if e is None:
        return False
    if isinstance(e, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.InterfaceError)):
        return True
    if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
        return True
    if isinstance(e, sqlalchemy.exc.PendingRollbackError):
        # The same session used again after its connection was lost (Optuna's fallback query
        # in `get_all_trials` does): the session is rolled back as the call fails, so a retry
        # gets a new connection. Other pending rollbacks (a failed flush) are not waited for.
        return "can't reconnect until invalid transaction is rolled back" in str(e).lower()
    if not isinstance(e, sqlalchemy.exc.OperationalError):
        return False
    orig = e.orig
    code = getattr(orig, "pgcode", None)
    if code is not None:  # PostgreSQL said why
        return code.startswith("08") or code in _PG_CONNECTION
    args = getattr(orig, "args", ())
    if type(orig).__module__.startswith("pymysql") and args and isinstance(args[0], int):
        return args[0] in _MYSQL_CONNECTION
    text = str(orig).lower()
    if type(orig).__module__ == "sqlite3":
        # Another process holds SQLite's write lock past the busy timeout: contention that
        # clears by itself, unlike a full disk or a read-only file.
        return "database is locked" in text or "database table is locked" in text
    return any(words in text for words in _CONNECTION_WORDS)


def storage_error(error: BaseException, what: str) -> StorageError | None:
    """A storage failure that is not a lost connection, as one line with the storage's own
    message; None when `error` did not come from the storage."""
    e = _driver_error(error)
    if e is None:
        return None
    return StorageError(f"the storage failed while {what}: "
                        f"{redact(_root_cause(e)).splitlines()[0][:300]}")


def _root_cause(error: BaseException) -> str:
    """The driver's own words (Optuna wraps them in a generic "exception during commit"); a
    gRPC call's, its status and details."""
    while error.__cause__ is not None:
        error = error.__cause__
    if _proxy_unavailable(error):
        return f"the storage proxy: UNAVAILABLE, {error.details()}"  # type: ignore[attr-defined]
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def with_retry(fn: Callable[[], T], *, what: str, deadline_s: float = RETRY_DEADLINE_S,
               log: Callable[[str], None] | None = None) -> T:
    """Call `fn`; on a connection error wait and call again, up to `deadline_s` in all."""
    log = log or LOG.info
    started = time.monotonic()
    delay = FIRST_DELAY_S
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_connection_error(e):
                failure = storage_error(e, what)
                if failure is not None:  # a full disk, a timeout, permissions: say it now
                    raise failure from e
                raise
            if time.monotonic() - started > deadline_s:
                raise
            reason = redact(_root_cause(e)).splitlines()[0][:160]
            log(f"storage unreachable while {what} ({reason}); retrying in {delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
