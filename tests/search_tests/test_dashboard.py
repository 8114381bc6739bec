"""`hpsearch dashboard` as users run it: a subprocess, real HTTP, a worker writing meanwhile."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.run import create_or_load
from search.spec import parse_spec
from search.storage import open_storage, quiet_optuna_warnings
from search.storage._artifact_store import ENV_VAR
from search.workers import run_worker
from tests.search_tests.studies import searched

quiet_optuna_warnings()
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def spec_data(name: str, tmp: Path, *, trials: int, epochs: int, size: int = 1024) -> dict:
    return searched(name, tmp, trials=trials, epochs=epochs, size=size)


def get(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()

def start_dashboard(url: str, cwd: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """`hpsearch dashboard` on a free port, once it answers."""
    port = free_port()
    # Output to files, not pipes: the server logs every request, and a full pipe that nobody
    # reads would stall it.
    proc = subprocess.Popen([HPSEARCH, "dashboard", "--storage", url, "--port", str(port),
                             *extra], cwd=cwd, stdout=(cwd / "dashboard.out").open("w"),
                            stderr=(cwd / "dashboard.err").open("w"), text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}: "
                                 f"{(cwd / 'dashboard.err').read_text()}")
        try:
            get(f"http://127.0.0.1:{port}/api/studies", timeout=2)
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the dashboard did not answer within 60 s")

def stop(proc: subprocess.Popen[str], cwd: Path) -> tuple[str, str]:
    """Stop the dashboard; its (stdout, stderr)."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return (cwd / "dashboard.out").read_text(), (cwd / "dashboard.err").read_text()

@pytest.mark.parametrize("case, code, message", [
    ("missing", 2, "error: --storage: no database at {tmp}/missing.db (run `hpsearch run"),
    ("scheme", 2, "error: --storage: expected a URL such as sqlite:///hpsearch.db"),
    ("text", 2, "error: --storage: {tmp}/notes.db is not a SQLite database"),
    ("empty", 2, "error: --storage: sqlite:///{tmp}/empty.db holds no Optuna studies"),
    ("unreachable", 1, "error: cannot open storage postgresql+psycopg2://u:***@127.0.0.1:9/x:"),
])
def test_dashboard_refuses_a_storage_it_cannot_open(tmp_path, case, code, message):
    (tmp_path / "notes.db").write_text("not a database\n")
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE t (x)").connection.close()
    url = {"missing": f"sqlite:///{tmp_path}/missing.db", "scheme": "redis://localhost/0",
           "text": f"sqlite:///{tmp_path}/notes.db", "empty": f"sqlite:///{tmp_path}/empty.db",
           "unreachable": "postgresql+psycopg2://u:secret@127.0.0.1:9/x"}[case]
    result = subprocess.run([HPSEARCH, "dashboard", "--storage", url, "--port",
                             str(free_port())], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert result.stderr.startswith(message.format(tmp=tmp_path))
    assert "secret" not in result.stderr + result.stdout
    assert not (tmp_path / "missing.db").exists()  # watching never creates a database

def test_dashboard_serves_trial_artifacts_and_warns_on_a_public_address(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    url = f"sqlite:///{tmp_path / 'hp.db'}"
    spec = parse_spec(spec_data("served", tmp_path, trials=2, epochs=2))
    run_worker(create_or_load(spec, open_storage(url)), spec, device="cpu")
    proc, port = start_dashboard(url, tmp_path, "--host", "0.0.0.0", "--insecure")
    try:
        _, _, body = get(f"http://127.0.0.1:{port}/api/studies/1?after=0")
        study = json.loads(body)
        assert study["note"]["body"].startswith("## served")  # the study note
        trial = study["trials"][0]
        names = {a["filename"]: a for a in trial["artifacts"]}
        assert set(names) == {"curves.svg", "lr.svg", "grad_norms.svg", "metrics.json"}
        status, kind, svg = get(f"http://127.0.0.1:{port}/artifacts/1/{trial['trial_id']}/"
                                f"{names['curves.svg']['artifact_id']}")
        assert status == 200 and kind.startswith("image/svg+xml") and svg.startswith(b"<svg")
    finally:
        out, err = stop(proc, tmp_path)
    assert f"at http://localhost:{port}/ (artifacts from {tmp_path}/hp.db.artifacts;" in out
    assert ("warning: --insecure: the dashboard on 0.0.0.0 without TLS and a token: anyone who "
            "reaches this port can read and change every study it serves") in err

def test_watching_never_disturbs_a_running_worker(tmp_path):
    """optuna-dashboard#545: a dashboard polling SQLite must not make a worker's writes fail."""
    url = f"sqlite:///{tmp_path / 'hp.db'}"
    trials = 10
    spec = parse_spec(spec_data("watched", tmp_path, trials=trials, epochs=3, size=4096))
    create_or_load(spec, open_storage(url))
    proc, port = start_dashboard(url, tmp_path)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([HPSEARCH, "worker", "watched", "--storage", url],
                              cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              text=True)
    polls = 0
    try:
        # Poll as hard as a browser tab full of graphs would, until the worker is done.
        while worker.poll() is None:
            for path in ("/api/studies", "/api/studies/1?after=0"):
                status, _, _ = get(f"http://127.0.0.1:{port}{path}", timeout=30)
                assert status == 200
                polls += 1
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
        _, err = stop(proc, tmp_path)
    output = log.read_text()
    assert worker.returncode == 0, output
    assert "locked" not in output and "locked" not in err
    assert polls >= 20
    study = create_or_load(spec, open_storage(url))
    states = [t.state for t in study.trials]
    assert TrialState.FAIL not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == trials
