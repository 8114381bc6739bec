"""`hpsearch dashboard`: optuna-dashboard on the study storage, with the trials' artifacts.

Watching must never disturb the workers (optuna-dashboard#545: a dashboard on SQLite made a
running study fail with "database is locked"). In SQLite's default rollback-journal mode a
reader's shared lock keeps a writer from committing, so a dashboard polling every second can
hold a worker past its busy timeout. So the dashboard opens SQLite read-mostly:

- the file is in WAL mode (hpsearch sets it; a database made elsewhere is switched once), where
  readers never block writers and writers never block readers;
- no schema is created or checked (`skip_table_creation`, `skip_compatibility_check`), so
  opening writes nothing, and a path that holds no Optuna database is refused, not initialised;
- a 60 s busy timeout for the few writes a person makes from the UI (notes, deleting a study),
  so those wait for a worker's commit instead of failing.

A `?mode=ro` URI was ruled out: WAL already keeps reads out of the workers' way, and read-only
would turn the dashboard's own edits (notes, deleting a study) into "readonly database" errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from search._command import EXIT_OK, Command, _positive_int, _storage_arg
from search._errors import SearchError, SpecError, StorageError
from search._storage import redact

if TYPE_CHECKING:
    import optuna

SQLITE_HEADER = b"SQLite format 3\x00"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def open_dashboard_storage(url: str) -> optuna.storages.BaseStorage:
    """The study storage opened for watching: nothing created, refused if it is not Optuna's."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage

    from search._storage import (
        engine_kwargs,
        install_idle_ping,
        open_storage,
        prepare_sqlite,
        sqlite_path,
    )

    if url.startswith("grpc://"):
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(url),
                                 skip_table_creation=True, skip_compatibility_check=True)
    except SpecError:
        raise
    except Exception as e:  # sqlalchemy/driver errors: the server is not there
        reason = redact(str(e)).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from e
    if path is None:
        install_idle_ping(storage.engine)
    return storage


def _has_tables(url: str, names: tuple[str, ...]) -> bool:
    import sqlalchemy

    # A short connect timeout: an unreachable server is an answer the user is waiting for.
    connect = {"timeout": 60} if url.startswith("sqlite:") else {"connect_timeout": 10}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=connect)
    try:
        inspector = sqlalchemy.inspect(engine)
        return all(inspector.has_table(name) for name in names)
    finally:
        engine.dispose()


class Dashboard(Command):
    """Serve optuna-dashboard on the study storage (live curves, plots, trial artifacts)."""

    name = "dashboard"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _storage_arg(parser)
        parser.add_argument("--host", default="127.0.0.1",
                            help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
        parser.add_argument("--port", type=_positive_int, default=8080)

    def run(self, args: argparse.Namespace) -> int:
        from search._artifacts import artifact_location, open_artifact_store
        from search._storage import resolve_url

        url = resolve_url(args.storage)
        storage = open_dashboard_storage(url)  # refuse what cannot be opened, now
        try:
            from optuna_dashboard import run_server
        except ImportError as e:
            raise SearchError("optuna-dashboard is not installed: pip install "
                              "'hpsearch[dashboard]'") from e
        location = artifact_location(url)
        store = open_artifact_store(location) if location else None
        if args.host not in LOCAL_HOSTS:
            print(f"warning: the dashboard has no authentication; binding {args.host} lets "
                  "anyone who can reach this machine read and edit the studies",
                  file=sys.stderr)
        shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
        if ":" in shown:
            shown = f"[{shown}]"
        artifacts = f"artifacts from {location}" if location else "artifacts off"
        print(f"optuna-dashboard for {redact(url)} at http://{shown}:{args.port}/ "
              f"({artifacts}; Ctrl-C stops it)", flush=True)
        run_server(storage, host=args.host, port=args.port, artifact_store=store)
        return EXIT_OK
