"""Storage URLs: resolving the default, hiding passwords, and opening Optuna's RDB storage.

SQLite is set up for a few local processes (WAL journal, a long busy timeout) so local parallel
workers do not fail with "database is locked" (optuna#820). PostgreSQL and MySQL get a small
pool, recycled connections and a pre-ping, so a server restart or an idle-connection reaper
does not kill a worker (optuna#1347, #5600). The pre-ping runs only on connections idle for a
few seconds: SQLAlchemy's `pool_pre_ping` pings on every checkout, and Optuna checks out a
connection for every storage call, which doubled the round trips of a trial (measured: 1.5x
a hand loop's per-trial overhead on PostgreSQL).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search._errors import SpecError, StorageError

if TYPE_CHECKING:
    import optuna

DEFAULT_URL = "sqlite:///hpsearch.db"
ENV_VAR = "HPSEARCH_STORAGE"
SCHEMES = ("sqlite", "postgresql", "mysql", "grpc")
SQLITE_BUSY_TIMEOUT_S = 60

_PASSWORD = re.compile(r"(?P<head>[a-z0-9+.-]+://[^:/@\s]+:)(?P<pw>[^@\s]*)(?P<tail>@)", re.I)


def resolve_url(url: str | None) -> str:
    """The storage URL to use: the one given, else $HPSEARCH_STORAGE, else ./hpsearch.db."""
    url = url or os.environ.get(ENV_VAR) or DEFAULT_URL
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if "://" not in url or scheme not in SCHEMES:
        raise SpecError(
            f"--storage: expected a URL such as sqlite:///hpsearch.db, "
            f"postgresql+psycopg2://user@host/db, mysql+pymysql://user@host/db or "
            f"grpc://host:port, got {redact(url)!r}"
        )
    return url


def redact(text: str) -> str:
    """Replace any password inside URLs in `text` with ***."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite URL (None for in-memory or other schemes)."""
    if not url.startswith("sqlite:"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        return None
    return Path(path)


def engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": False, "pool_size": 2, "max_overflow": 4, "pool_recycle": 300}


IDLE_PING_S = 5.0


def install_idle_ping(engine: Any, *, idle_s: float = IDLE_PING_S) -> None:
    """Ping a pooled connection at checkout when it sat idle longer than `idle_s`.

    SQLAlchemy's recipe for custom pessimistic disconnect handling: a failed ping raises
    DisconnectionError, and the pool replaces the connection (and retries) transparently.
    """
    import time

    from sqlalchemy import event, exc

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["hpsearch_checkin"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        last = record.info.get("hpsearch_checkin")
        if last is None or time.monotonic() - last < idle_s:
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as e:  # any driver error: this connection is gone
            raise exc.DisconnectionError(str(e)) from e


def prepare_sqlite(url: str) -> None:
    """Switch a SQLite file to WAL once (it persists in the file): readers stop blocking writers."""
    path = sqlite_path(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StorageError(f"cannot open SQLite database {path}: {e}") from e


def open_storage(
    url: str | None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_stale: bool = True,
    must_exist: bool = False,
) -> optuna.storages.BaseStorage:
    """Open the study storage; heartbeats on when an interval is given.

    With `must_exist`, a SQLite file that is not there is an error rather than a new empty
    database (commands that only read never create files).
    """
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = resolve_url(url)
    if url.startswith("grpc://"):
        host, _, port = url[len("grpc://"):].rstrip("/").partition(":")
        try:
            from optuna.storages import GrpcStorageProxy

            proxy = GrpcStorageProxy(host=host or "localhost", port=int(port or 13000))
            proxy.wait_server_ready(timeout=30)
            return proxy
        except Exception as e:  # grpc raises its own error types
            raise StorageError(f"cannot reach the storage proxy at {url}: {e}") from e
    path = sqlite_path(url)
    if must_exist and path is not None and not path.exists():
        raise SpecError(f"--storage: no database at {path} (run `hpsearch run STUDY.yaml` first)")
    if path is not None:
        prepare_sqlite(url)
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period,
            "heartbeat_stale_trial_callback": (
                RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
                if retry_stale else None
            ),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
        if not url.startswith("sqlite:"):
            install_idle_ping(storage.engine)
        return storage
    except Exception as e:  # sqlalchemy/driver errors: name the URL without its password
        reason = redact(str(e)).splitlines()[0]
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from e
