"""Storages for the search tests: SQLite in a temp dir, and the real PostgreSQL/MySQL servers.

PostgreSQL and MySQL tests run against the servers of this machine. In CI (`CI` set) a server
that cannot be reached fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import uuid

import pytest

POSTGRES_URL = os.environ.get(
    "HPSEARCH_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("HPSEARCH_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


def _reachable(url: str) -> str | None:
    """None when the server answers, else why not."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # any driver error means: not reachable
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def server_url(url: str, name: str) -> str:
    why = _reachable(url)
    if why is not None:
        message = f"{name} at {url} is not reachable ({why})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the {name} tests")
        pytest.skip(message)
    return url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.fixture
def postgres_url() -> str:
    return server_url(POSTGRES_URL, "PostgreSQL")


@pytest.fixture
def mysql_url() -> str:
    return server_url(MYSQL_URL, "MySQL")


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path) -> str:
    """Every storage backend runs the shared suite (Optuna's habit)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return server_url(POSTGRES_URL, "PostgreSQL")


@pytest.fixture
def study_name() -> str:
    """Unique per test, so tests on a shared server never see each other's studies."""
    return f"t-{uuid.uuid4().hex[:10]}"
