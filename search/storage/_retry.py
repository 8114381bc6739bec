"""Riding out a storage that goes away for a while (a database restart, a killed connection).

A worker must not die because PostgreSQL restarted: storage calls that fail with a connection
error are retried with exponential backoff until the storage answers again or a deadline
passes. Other errors (a bug, a constraint) are raised at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy.exc

from search._urls import redact

T = TypeVar("T")

RETRY_DEADLINE_S = 300.0  # how long a worker waits for its storage before giving up
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 15.0


def is_connection_error(error: BaseException) -> bool:
    """A failure of the connection to the storage, rather than of the request itself."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, sqlalchemy.exc.DisconnectionError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _root_cause(error: BaseException) -> str:
    """The driver's own words (Optuna wraps them in a generic "exception during commit")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def with_retry(fn: Callable[[], T], *, what: str, deadline_s: float = RETRY_DEADLINE_S,
               log: Callable[[str], None] | None = None) -> T:
    """Call `fn`; on a connection error wait and call again, up to `deadline_s` in all."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.monotonic()
    delay = FIRST_DELAY_S
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_connection_error(e) or time.monotonic() - started > deadline_s:
                raise
            reason = redact(_root_cause(e)).splitlines()[0][:160]
            log(f"storage unreachable while {what} ({reason}); retrying in {delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
