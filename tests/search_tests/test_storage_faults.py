"""Storage faults on the real servers: a lost connection is waited for, every other failure is
one line at once; nothing is left waiting once a study's budget is met."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy
import sqlalchemy.orm
from optuna.trial import TrialState

from search import StorageError
from search.run import create_or_load
from search.spec import parse_spec
from search.storage import is_connection_error, open_storage, with_retry
from search.workers import run_worker
from tests.search_tests.studies import study_data


def failing(engine: sqlalchemy.Engine, sql: str) -> BaseException:
    """The real error a statement raises on `engine`."""
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(sql))
    except Exception as e:  # noqa: BLE001 - the error is what the test is about
        return e
    raise AssertionError(f"{sql!r} did not fail")


def test_a_read_only_sqlite_file_is_reported_at_once_not_retried(tmp_path):
    path = tmp_path / "s.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x INTEGER)").connection.commit()
    engine = sqlalchemy.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    error = failing(engine, "INSERT INTO t VALUES (1)")
    assert not is_connection_error(error)

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))

    started = time.monotonic()
    with pytest.raises(StorageError, match="while writing: OperationalError: attempt to write "
                                           "a readonly database"):
        with_retry(write, what="writing")
    assert time.monotonic() - started < 2


def test_sqlite_write_contention_is_waited_for(tmp_path):
    path = tmp_path / "s.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    assert is_connection_error(failing(engine, "INSERT INTO t VALUES (1)"))  # locked: transient
    holder.execute("COMMIT")


def test_postgres_lock_timeout_is_one_line_at_once_and_a_killed_connection_is_waited_for(
        postgres_url):
    table = f"hp_lock_{int(time.time() * 1000)}"
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE TABLE {table} (x int)"))
    holder = sqlalchemy.create_engine(postgres_url).connect()
    try:
        holder.execute(sqlalchemy.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        waiter = sqlalchemy.create_engine(
            postgres_url, connect_args={"options": "-c lock_timeout=200"})

        def read() -> None:
            with waiter.connect() as conn:
                conn.execute(sqlalchemy.text(f"SELECT * FROM {table}"))

        error = failing(waiter, f"SELECT * FROM {table}")
        assert not is_connection_error(error) and error.orig.pgcode == "55P03"
        started = time.monotonic()
        with pytest.raises(StorageError, match="lock timeout"):
            with_retry(read, what="reading")
        assert time.monotonic() - started < 3
    finally:
        holder.rollback()
        holder.close()

    # A connection the server terminates is a lost connection: waited for, then it works.
    victim = sqlalchemy.create_engine(postgres_url, pool_pre_ping=False, pool_size=1)
    with victim.connect() as conn:
        pid = conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"SELECT pg_terminate_backend({pid})"))
        time.sleep(0.2)
    lost = failing(victim, "SELECT 1")
    assert is_connection_error(lost)
    logged: list[str] = []
    calls = iter([lost, None])

    def flaky() -> str:
        error = next(calls)
        if error is not None:
            raise error
        with victim.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT 'back'")).scalar()

    assert with_retry(flaky, what="reading", log=logged.append) == "back"
    assert "storage unreachable while reading" in logged[0]

    # Optuna's fallback query reuses the session whose connection was lost: SQLAlchemy refuses
    # it until the session is rolled back (Optuna's session is, as the call fails): a retry
    # works. It failed `run --workers 2`'s progress across a server restart once.
    session = sqlalchemy.orm.Session(victim)
    pid = session.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"SELECT pg_terminate_backend({pid})"))
        time.sleep(0.2)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        session.execute(sqlalchemy.text("SELECT 1"))
    with pytest.raises(sqlalchemy.exc.PendingRollbackError) as pending:
        session.execute(sqlalchemy.text("SELECT 1"))
    assert is_connection_error(pending.value)
    session.rollback()
    assert session.execute(sqlalchemy.text("SELECT 'back'")).scalar() == "back"
    session.close()
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP TABLE {table}"))


def test_nothing_is_left_waiting_once_the_budget_is_met(tmp_path):
    configs = [{"lr": lr} for lr in (0.01, 0.02, 0.03, 0.04)]
    spec = parse_spec(study_data("w", trials=2, epochs=1, size=128, enqueue=configs))
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 4
    run_worker(study, spec, device="cpu", artifacts=False)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.WAITING not in states
    skipped = study.get_trials(states=(TrialState.FAIL,))
    assert len(skipped) == 2 and all(t.user_attrs["ended"].startswith(
        "not run: the budget was met") for t in skipped)


@pytest.mark.parametrize("revision, says", [
    ("v3.0.0.d", "upgrade it with `optuna storage upgrade --storage sqlite:///"),
    ("v9.9.9.z", "set up by a newer Optuna"),
])
def test_a_storage_of_another_schema_revision_is_one_line_saying_what_to_run(tmp_path,
                                                                            revision, says):
    url = f"sqlite:///{tmp_path / 's.db'}"
    head = open_storage(url).get_head_version()
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    with pytest.raises(StorageError) as error:
        open_storage(url)
    assert says in str(error.value) and revision in str(error.value) and head in str(error.value)


def test_a_server_out_of_connections_is_waited_for_until_one_frees(postgres_url):
    # PostgreSQL refuses a connection past a limit (max_connections; here a role's CONNECTION
    # LIMIT 1) with SQLSTATE 53300: a worker's call waits for a connection to free, as for a
    # lost one, and says why.
    role = f"hp_limit_{int(time.time() * 1000)}"
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1"))
    url = sqlalchemy.make_url(postgres_url).set(username=role)
    holder = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool).connect()
    client = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        refused = failing(client, "SELECT 1")
        assert "too many connections for role" in str(refused) and is_connection_error(refused)

        def read() -> int:
            with client.connect() as conn:
                return conn.execute(sqlalchemy.text("SELECT 1")).scalar()

        threading.Timer(1.0, holder.close).start()  # the one connection frees in a second
        logged: list[str] = []
        assert with_retry(read, what="reading", log=logged.append) == 1
        assert "too many connections" in logged[0]
    finally:
        holder.close()
        client.dispose()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP ROLE {role}"))
        admin.dispose()
