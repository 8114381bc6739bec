"""Opening Optuna's storage: RDB for SQLite, PostgreSQL and MySQL, or the gRPC proxy.

SQLite is set up for a few local processes (WAL journal, a long busy timeout) so local parallel
workers do not fail with "database is locked" (optuna#820). PostgreSQL and MySQL get a small
pool, recycled connections and a ping on checkout of a connection that sat idle for a few
seconds (not on every checkout: Optuna checks one out per storage call), so a server restart or
an idle-connection reaper does not kill a worker (optuna#1347, #5600). Every RDB storage opened
here is closed when the process exits (`closed_at_exit`), so a SQLite study is whole in its file.
"""

from __future__ import annotations

import atexit
import functools
import sqlite3
import time
import weakref
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event, exc

from search._errors import SpecError, StorageError
from search._urls import is_proxy, redact, resolve_url, sqlite_path
from search.storage._compat import quiet_experimental
from search.storage._proxy import open_proxy

SQLITE_BUSY_TIMEOUT_S = 60
SQLITE_HEADER = b"SQLite format 3\x00"

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
    url = resolve_url(url)
    if is_proxy(url):  # (its TLS, its token, one call to check both: search.storage._proxy)
        return open_proxy(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    path = sqlite_path(url)
    if must_exist and path is not None and not path.exists():
        raise SpecError(f"--storage: no database at {path} (run `hpsearch run STUDY.yaml` first)")
    if path is not None:
        prepare_sqlite(url)
    kwargs: dict[str, Any] = {}
    try:
        with quiet_experimental():
            if heartbeat_interval:
                kwargs = {
                    "heartbeat_interval": heartbeat_interval,
                    "grace_period": grace_period,
                    "heartbeat_stale_trial_callback": (
                        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
                        if retry_stale else None
                    ),
                }
            # Optuna's own schema check reads the schema's revision on a second connection
            # while its session's transaction holds the first: through PgBouncer, more workers
            # opening at once than its server pool then wait on each other until its
            # query_wait_timeout. `check_schema` makes the same check on one connection.
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(url),
                                 skip_compatibility_check=True, **kwargs)
        check_schema(storage)
        closed_at_exit(storage.engine)
        if not url.startswith("sqlite:"):
            install_idle_ping(storage.engine)
        return storage
    except StorageError:
        raise
    except Exception as e:  # sqlalchemy/driver errors: name the URL without its password
        reason = redact(str(e)).splitlines()[0]
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from e

_OPEN_ENGINES: weakref.WeakSet[sqlalchemy.engine.Engine] = weakref.WeakSet()


def closed_at_exit(engine: sqlalchemy.engine.Engine) -> None:
    """Close `engine`'s pooled connections when the process exits (before `hpsearch`'s last
    exit handler freezes the garbage collector): the last connection to a SQLite file in WAL
    mode closing is what writes the journal back into the file, so a finished study is whole
    in its one .db file."""
    _dispose_at_exit()
    _OPEN_ENGINES.add(engine)


@functools.cache  # registered once a process
def _dispose_at_exit() -> None:
    atexit.register(lambda: [engine.dispose() for engine in list(_OPEN_ENGINES)])


def check_schema(storage: RDBStorage) -> None:
    """Optuna's check that the database's schema is the installed Optuna's (its revision read on
    one connection): a StorageError saying what to run when it is not."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current == head:
        return
    url = redact(storage.url)
    if current in storage.get_all_versions():
        advice = f"upgrade it with `optuna storage upgrade --storage {url}`"
    else:
        advice = "it was set up by a newer Optuna: install that one (`pip install -U optuna`)"
    raise StorageError(f"the storage {url} has Optuna's schema revision {current}, and Optuna "
                       f"{optuna.__version__} reads {head}: {advice}")


def open_for_watching(url: str) -> optuna.storages.BaseStorage:
    """The study storage opened for a dashboard: nothing created, refused if it is not Optuna's.

    Watching must never disturb the workers (optuna-dashboard#545: a dashboard on SQLite made a
    running study fail with "database is locked"). SQLite is opened in WAL mode (readers never
    block writers), with no schema created or checked (opening writes nothing, and a path that
    holds no Optuna database is refused, not initialised), and a 60 s busy timeout for the few
    writes a person makes from the UI (notes, deleting a study). Read-only (`?mode=ro`) would
    turn those edits into "readonly database" errors.
    """
    if is_proxy(url):
        return open_storage(url)
    path = sqlite_path(url)
    if path is not None:
        if not path.is_file():
            raise SpecError(f"--storage: no database at {path} (run `hpsearch run STUDY.yaml` "
                            "first, or pass the URL of an existing study database)")
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header and header != SQLITE_HEADER:
            raise SpecError(f"--storage: {path} is not a SQLite database")
        prepare_sqlite(url)
    try:
        # Looked at before Optuna opens it: RDBStorage would stamp a version row into any
        # database, and a dashboard pointed at the wrong file must leave it as it was.
        optuna_tables = _has_tables(url, ("studies", "version_info"))
        if not optuna_tables:
            raise SpecError(f"--storage: {redact(url)} holds no Optuna studies (no 'studies' "
                            "table); point it at the database your workers use")
        with quiet_experimental():
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(url),
                                 skip_table_creation=True, skip_compatibility_check=True)
    except SpecError:
        raise
    except Exception as e:  # sqlalchemy/driver errors: the server is not there
        reason = redact(str(e)).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from e
    closed_at_exit(storage.engine)
    if path is None:
        install_idle_ping(storage.engine)
    return storage

def _has_tables(url: str, names: tuple[str, ...]) -> bool:
    # A short connect timeout: an unreachable server is an answer the user is waiting for.
    connect = {"timeout": 60} if url.startswith("sqlite:") else {"connect_timeout": 10}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=connect)
    try:
        inspector = sqlalchemy.inspect(engine)
        return all(inspector.has_table(name) for name in names)
    finally:
        engine.dispose()
