"""Servers that tests and benchmarks start themselves on loopback: an MLflow tracking server,
Debian's PgBouncer in transaction pooling in front of this machine's PostgreSQL, and
`hpsearch storage-proxy` in front of a database."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from search._process import free_port


@contextmanager
def mlflow_server(folder: Path, *, start_s: float = 120) -> Iterator[str]:
    """A real `mlflow server` with a SQLite backend in `folder`, on a free loopback port: its
    URL. Stopped with every process it started (uvicorn, its job runners) as one group."""
    port = free_port()
    log = (folder / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{folder}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n" + (
                        folder / "mlflow-server.log").read_text()[-3000:]) from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()


PGBOUNCER = os.environ.get("HPSEARCH_PGBOUNCER", "/usr/sbin/pgbouncer")
PGBOUNCER_USER = "postgres"  # PgBouncer refuses to run as root

_PGBOUNCER_INI = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/userlist.txt
admin_users = {user}
stats_users = {user}
pool_mode = transaction
max_client_conn = {max_client_conn}
default_pool_size = {pool_size}
reserve_pool_size = 0
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""


def pgbouncer_missing() -> str | None:
    """None when Debian's pgbouncer is there to start, else why not (for a skip's reason)."""
    if not (Path(PGBOUNCER).is_file() and os.access(PGBOUNCER, os.X_OK)):
        return f"{PGBOUNCER} not found (apt-get install pgbouncer)"
    return None


def _skip_or_fail(why: str) -> None:
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the PgBouncer tests")
    pytest.skip(why)


@contextmanager
def pgbouncer(*, pool_size: int = 5, max_client_conn: int = 2000,
              upstream: str = "127.0.0.1:5432", database: str = "test",
              start_s: float = 30) -> Iterator[str]:
    """Debian's PgBouncer in transaction pooling on a free loopback port, in front of the
    PostgreSQL at `upstream` (trust auth, as this machine's): the client URL
    `postgresql+psycopg2://postgres@127.0.0.1:<port>/<database>`. At most `pool_size` server
    connections per database and user; `max_client_conn` clients (the open-files limit raised
    to fit). Run as the `postgres` user when root (it refuses root), its config, log and pid in
    a temp folder of its own; stopped, and checked stopped, on exit. Skips (fails under `CI`)
    when pgbouncer is not installed. Its admin console: `pgbouncer_admin`."""
    why = pgbouncer_missing()
    if why is not None:
        _skip_or_fail(why)
    folder = Path(tempfile.mkdtemp(prefix="hpsearch-pgbouncer-"))
    as_root = os.getuid() == 0
    user = PGBOUNCER_USER if as_root else None
    host, _, upstream_port = upstream.partition(":")
    listen = free_port()
    (folder / "userlist.txt").write_text(f'"{user or _login()}" ""\n')
    (folder / "pgbouncer.ini").write_text(_PGBOUNCER_INI.format(
        host=host, port=upstream_port or 5432, listen=listen, folder=folder,
        user=user or _login(), max_client_conn=max_client_conn, pool_size=pool_size))
    if as_root:
        for path in (folder, *folder.iterdir()):
            shutil.chown(path, user=PGBOUNCER_USER, group=PGBOUNCER_USER)
    files = max_client_conn + 10 * pool_size + 100  # a socket each, and the server side
    server = subprocess.Popen(
        [PGBOUNCER, str(folder / "pgbouncer.ini")], user=user, group=user,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: _raise_open_files(files))
    url = f"postgresql+psycopg2://{user or _login()}@127.0.0.1:{listen}/{database}"
    try:
        _wait_until_serving(server, url, folder, start_s)
        yield url
    finally:
        _stop_pgbouncer(server, listen, folder)
        shutil.rmtree(folder, ignore_errors=True)


def pgbouncer_admin(url: str, command: str) -> list[dict[str, object]]:
    """`command` (`SHOW POOLS`, `SHOW SERVERS`…) on the admin console of the PgBouncer whose
    client URL is `url`: its rows as dicts. (psycopg2 directly: SQLAlchemy's first queries on
    a new connection are not commands the console knows.)"""
    import psycopg2
    import sqlalchemy

    parsed = sqlalchemy.make_url(url)
    conn = psycopg2.connect(host=parsed.host, port=parsed.port, user=parsed.username,
                            dbname="pgbouncer", connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(command)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        conn.close()


def _login() -> str:
    import getpass

    return getpass.getuser()


def _raise_open_files(files: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (
            files if hard == resource.RLIM_INFINITY else min(files, hard), hard))


def _wait_until_serving(server: subprocess.Popen, url: str, folder: Path,
                        start_s: float) -> None:
    """Until a query through PgBouncer reaches PostgreSQL (not only its port is open)."""
    import psycopg2
    import sqlalchemy

    parsed = sqlalchemy.make_url(url)
    deadline = time.monotonic() + start_s
    while True:
        try:
            conn = psycopg2.connect(host=parsed.host, port=parsed.port, user=parsed.username,
                                    dbname=parsed.database, connect_timeout=3)
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            conn.close()
            return
        except psycopg2.Error:
            if server.poll() is not None or time.monotonic() > deadline:
                log = folder / "pgbouncer.log"
                raise RuntimeError("pgbouncer did not start:\n" + (
                    log.read_text()[-3000:] if log.exists() else "(no log)")) from None
            time.sleep(0.1)


def _stop_pgbouncer(server: subprocess.Popen, port: int, folder: Path) -> None:
    """SIGTERM (PgBouncer's immediate shutdown), SIGKILL after 10 s; then its port is free."""
    try:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return
    raise RuntimeError(f"pgbouncer on port {port} still accepts connections after it was "
                       f"stopped (log in {folder})")


@contextmanager
def storage_proxy(url: str, folder: Path, *, env: dict[str, str] | None = None,
                  port: int | None = None, start_s: float = 60) -> Iterator[str]:
    """The real `hpsearch storage-proxy` in front of the database at `url`, on loopback `port`
    (a free one if None), run in `folder` with its output in folder/proxy-<port>.log and `env`
    (the token, say): its `grpc://` URL. Stopped with Ctrl-C (killed after 15 s) on leaving."""
    port = port or free_port()
    log = folder / f"proxy-{port}.log"
    starts = (log.read_text().count("Ctrl-C stops it") if log.exists() else 0) + 1
    proxy = subprocess.Popen(
        [str(Path(sys.executable).with_name("hpsearch")), "storage-proxy", "--storage", url,
         "--port", str(port)], cwd=folder, stdout=log.open("a"), stderr=subprocess.STDOUT,
        env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + start_s
        while log.read_text().count("Ctrl-C stops it") < starts:
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storage-proxy did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proxy.send_signal(signal.SIGINT)
        try:
            proxy.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
