"""The gRPC storage proxy as a first-class path: the budget held, heartbeats recorded, dead
workers' trials failed and retried, all through `hpsearch storage-proxy` in front of a real
PostgreSQL, behind its token.

The in-process tests run the proxy's real gRPC server (`proxy_server` with hpsearch's worker
methods) on loopback; the end-to-end ones the real `hpsearch storage-proxy` command and real
worker processes, one killed with SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from search._auth import Serving
from search._errors import StorageError
from search._process import free_port
from search.run import create_or_load, load
from search.spec import parse_spec
from search.storage import (
    BudgetReached,
    WorkerHeartbeat,
    count_trials,
    open_storage,
    requeue_interrupted,
    worker_study,
)
from search.storage._compat import (
    add_storage_service,
    stale_trial_ids,
    storage_of,
    study_id_of,
    trial_id_of,
)
from search.storage._proxy import proxy_server
from search.storage._proxy_client import SERVICE
from search.storage._proxy_methods import add_worker_service
from tests.servers import storage_proxy

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
TOKEN = "tok-proxy-path-never-printed"
# A trial of `epochs` steps of 0.3 s; a retry resumes after the last epoch its dead run reported.
FIT = '''
import time

def fit(params, trial):
    for epoch in range((trial.last_epoch or 0) + 1, trial.epochs + 1):
        time.sleep(0.3)
        trial.report(epoch, loss=(params["x"] - 1) ** 2 + 1 / epoch)
        trial.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        trial.checkpointed()  # (nothing to save but the reports, which a retry resumes after)
'''
# The same trial, whose epoch 2 waits (up to 120 s) for the file `proxy-down` next to it before
# it reports: the report is made while the test holds the proxy down.
GATED_FIT = FIT.replace("        time.sleep(0.3)\n", """        time.sleep(0.3)
        gate, waited = __import__("pathlib").Path(__file__).with_name("proxy-down"), 0.0
        while epoch == 2 and not gate.exists() and waited < 120:
            time.sleep(0.1)
            waited += 0.1
""")
assert GATED_FIT != FIT


def spec_data(name: str, tmp_path: Path, *, trials: int, epochs: int) -> dict:
    (tmp_path / "fit_proxy.py").write_text(FIT)
    return {"name": name, "trainer": "fit_proxy:fit", "objective": {"metric": "loss"},
            "budget": {"trials": trials, "epochs": epochs},
            "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
            "space": {"x": {"low": -2.0, "high": 3.0}},
            "run": {"heartbeat_interval": 1, "grace_period": 3,
                    "checkpoint_dir": str(tmp_path / "ckpt")}}


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HPSEARCH_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def served(postgres_url, token):
    """The proxy's real gRPC server in this process, in front of PostgreSQL, with the token:
    its grpc:// URL."""
    storage = optuna.storages.get_storage(open_storage(postgres_url))
    port = free_port()
    server = proxy_server(storage, Serving(host="127.0.0.1", token=token), port)
    add_worker_service(server, storage, postgres_url)
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)


def _env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HPSEARCH_TLS_CA", "HPSEARCH_STORAGE")}
    return {**clean, "HPSEARCH_TOKEN": TOKEN, "PYTHONPATH": str(tmp_path)}


@pytest.fixture
def proxy_command(tmp_path, postgres_url, token):
    """The real `hpsearch storage-proxy` in front of PostgreSQL, with the token: its URL."""
    with storage_proxy(postgres_url, tmp_path, env=_env(tmp_path)) as url:
        yield url
    assert all(TOKEN not in log.read_text() for log in tmp_path.glob("proxy-*.log"))


def _create(url: str, data: dict) -> optuna.Study:
    spec = parse_spec(data)
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    return create_or_load(spec, storage)


def _beats(postgres_url: str, trial_ids: list[int]) -> dict[int, object]:
    engine = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT trial_id, heartbeat FROM trial_heartbeats WHERE trial_id = ANY(:ids)"),
                {"ids": trial_ids}).all()
    finally:
        engine.dispose()
    return dict(rows)


def _tcp_peers(pid: int) -> list[int]:
    """The remote ports of the established TCP connections process `pid` holds (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    peers = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                peers.append(int(fields[2].rsplit(":", 1)[1], 16))
    return peers


# ---- in-process: the proxy's real server, its worker methods called by real clients ----

def test_concurrent_starts_through_the_proxy_never_overshoot(served, postgres_url, study_name,
                                                             tmp_path):
    """16 clients, each its own channel, start trials at once under a budget of 5: exactly 5
    start, each with its first heartbeat; the others are told the budget is reached."""
    study = _create(served, spec_data(study_name, tmp_path, trials=5, epochs=1))
    started: list[int] = []
    full: list[BudgetReached] = []
    go = threading.Barrier(16)

    def client() -> None:
        storage = open_storage(served, heartbeat_interval=1, grace_period=3)
        view = worker_study(optuna.load_study(study_name=study_name, storage=storage), 5)
        go.wait()
        for _ in range(2):
            try:
                started.append(trial_id_of(view.ask()))
            except BudgetReached as e:
                full.append(e)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(started) == 5 and len(full) == 27, (len(started), len(full))
    assert count_trials(study).running == 5
    assert {c.counts.running for c in full} == {5}
    assert sorted(_beats(postgres_url, started)) == sorted(started)


def test_heartbeats_and_the_stale_scan_go_through_the_proxy(served, postgres_url, study_name,
                                                            tmp_path):
    """A worker's beats land in the database; a trial whose beats stop is failed after the
    grace period by the proxy and its retry queued, which the next start takes."""
    study = _create(served, spec_data(study_name, tmp_path, trials=3, epochs=1))
    view = worker_study(study, 3)
    heartbeat = WorkerHeartbeat(study)
    assert heartbeat.interval == 1
    trial = view.ask()
    trial_id = trial_id_of(trial)
    first = _beats(postgres_url, [trial_id])[trial_id]
    heartbeat.begin(trial_id, written=True)
    time.sleep(2.5)
    assert _beats(postgres_url, [trial_id])[trial_id] > first  # the thread's beats arrived
    heartbeat.end(trial_id)  # as a worker that froze: no more beats
    time.sleep(4)
    assert stale_trial_ids(storage_of(study), study_id_of(study)) == [trial_id]
    heartbeat.fail_stale(now=True)
    heartbeat.close()
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    retry = view.ask()  # the retry, taken under the budget with its first beat
    assert retry.number == 1 and trial_id_of(retry) in _beats(postgres_url, [trial_id_of(retry)])
    assert study.get_trials(deepcopy=False)[1].system_attrs["failed_trial"] == 0


def test_a_heartbeat_the_proxy_held_up_lengthens_the_grace(served, postgres_url, study_name,
                                                           tmp_path, token, monkeypatch, caplog):
    """A beat that waited 20 s inside the proxy (its deadline says it arrived 20 s before it
    was served: sent with 280 s left, said to be sent with 300) and then no beat for 4 s, past
    the 3 s grace: the trial is not stale through the proxy (grace 3 + 20 s), though it is by
    the database's clock alone, and the proxy warns. Once that wait leaves the window, the
    trial is failed as usual. (gRPC sends a deadline rounded: the wait reads within a second or
    so of 20 s; a CI run read a 10 s one as 9.0 s.)"""
    from search.storage import _proxy_methods

    monkeypatch.setattr(_proxy_methods, "LAG_WINDOW_S", 6.0)
    study = _create(served, spec_data(study_name, tmp_path, trials=3, epochs=1))
    trial_id = trial_id_of(worker_study(study, 3).ask())
    channel = grpc.insecure_channel(served.removeprefix("grpc://"))
    try:
        beat = channel.unary_unary(f"/{SERVICE}/Beat")
        request = b'{"trial_ids": [%d], "timeout_s": 300, "grace": 3}' % trial_id
        beat(request, metadata=(("authorization", f"Bearer {token}"),), timeout=280)
    finally:
        channel.close()
    waited = re.search(r"a heartbeat waited ([0-9.]+) s inside the proxy", caplog.text)
    assert waited and 18 <= float(waited[1]) <= 22, caplog.text
    assert "3 s grace period" in caplog.text
    time.sleep(4)
    direct = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=3)
    assert stale_trial_ids(direct, study_id_of(study)) == [trial_id]  # the database's clock
    assert stale_trial_ids(storage_of(study), study_id_of(study)) == []  # the proxy's
    heartbeat = WorkerHeartbeat(study)
    heartbeat.fail_stale(now=True)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING
    time.sleep(3)  # the 20 s wait is out of the window now
    assert stale_trial_ids(storage_of(study), study_id_of(study)) == [trial_id]
    heartbeat.fail_stale(now=True)
    heartbeat.close()
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL,
                                                                    TrialState.WAITING]


def test_a_beat_claiming_a_timeout_past_an_hour_is_refused(served, study_name, tmp_path,
                                                          token, caplog):
    """The wait a Beat's `timeout_s` implies lengthens every trial's grace: one past an hour,
    not a number or not positive is refused (INVALID_ARGUMENT), and no wait is counted."""
    study = _create(served, spec_data(study_name, tmp_path, trials=3, epochs=1))
    trial_id = trial_id_of(worker_study(study, 3).ask())
    channel = grpc.insecure_channel(served.removeprefix("grpc://"))
    try:
        beat = channel.unary_unary(f"/{SERVICE}/Beat")
        for sent, said in (("86400", "86400"), ("true", "True"), ("-1", "-1"),
                           ('"300"', "'300'")):
            request = b'{"trial_ids": [%d], "timeout_s": %s, "grace": 3}' % (
                trial_id, sent.encode())
            with pytest.raises(grpc.RpcError) as refused:
                beat(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, sent
            assert refused.value.details() == (
                f"timeout_s: expected seconds in (0, 3600], got {said}"), sent
        request = b'{"trial_ids": [%d], "timeout_s": 3600, "grace": 3}' % trial_id
        assert beat(request, metadata=(("authorization", f"Bearer {token}"),), timeout=3600)
    finally:
        channel.close()
    assert "inside the proxy" not in caplog.text


def test_the_lag_is_a_sliding_maximum(monkeypatch):
    from search.storage import _proxy_methods

    now = [100.0]
    monkeypatch.setattr(_proxy_methods.time, "monotonic", lambda: now[0])
    lag = _proxy_methods._Lag()
    assert lag.recent() == 0.0
    for at, wait in ((100, 1.0), (110, 5.0), (120, 2.0), (130, 0.5)):
        now[0] = at
        lag.add(wait)
    assert lag.recent() == 5.0
    now[0] = 110 + _proxy_methods.LAG_WINDOW_S + 1  # 5.0 is out: 2.0 is the longest left
    assert lag.recent() == 2.0
    now[0] = 130 + _proxy_methods.LAG_WINDOW_S + 1
    assert lag.recent() == 0.0


def test_an_interrupted_trial_is_queued_again_by_the_proxy(served, study_name, tmp_path):
    """`requeue_interrupted` through the proxy runs there, under its lock: the trial ends FAIL
    "interrupted" and one retry waits; asked again, nothing more is queued."""
    study = _create(served, spec_data(study_name, tmp_path, trials=3, epochs=1))
    trial = worker_study(study, 3).ask()
    assert requeue_interrupted(study, {trial.number}) == [trial.number]
    assert requeue_interrupted(study, {trial.number}) == []
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["ended"] == "interrupted"
    assert trials[1].system_attrs["failed_trial"] == trial.number


def test_every_worker_method_needs_the_token(served, token):
    channel = grpc.insecure_channel(served.removeprefix("grpc://"))
    try:
        for method in ("Hello", "StartTrial", "Beat", "Stale", "FailStale", "Requeue"):
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"{}", metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        hello = channel.unary_unary(f"/{SERVICE}/Hello")
        assert hello(b"{}", metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        bad = channel.unary_unary(f"/{SERVICE}/StartTrial")
        with pytest.raises(grpc.RpcError) as refused:  # not JSON of the expected shape
            bad(b'{"study_id": "1; DROP"}', metadata=(("authorization", f"Bearer {token}"),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def test_a_proxy_without_the_worker_methods_is_one_clear_line(postgres_url, token):
    """An older hpsearch's proxy (Optuna's service alone): a worker is refused in one line;
    a reader (no heartbeats) still reads through it."""
    storage = optuna.storages.get_storage(open_storage(postgres_url))
    port = free_port()
    server = grpc.server(ThreadPoolExecutor(2))
    add_storage_service(server, storage)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        url = f"grpc://127.0.0.1:{port}"
        with pytest.raises(StorageError) as refused:
            open_storage(url, heartbeat_interval=1, grace_period=3)
        assert str(refused.value) == (
            f"the storage proxy at {url} has no hpsearch worker methods (an hpsearch older "
            "than this client serves it): upgrade the proxy's hpsearch")
        assert isinstance(open_storage(url).get_all_studies(), list)
    finally:
        server.stop(grace=None)


# ---- end to end: `hpsearch storage-proxy`, real worker processes ----

@pytest.mark.serial
def test_workers_through_the_proxy_meet_the_budget_exactly(proxy_command, postgres_url,
                                                           study_name, tmp_path):
    """`run --workers 3` through the proxy: exactly the budget finished (0 over, 0 under),
    every trial failed as stale (a starved machine) retried."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec_data(study_name, tmp_path, trials=7, epochs=1)))
    run = subprocess.run([HPSEARCH, "run", str(path), "--storage", proxy_command,
                          "--workers", "3", "--gpus", "none"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240, env=_env(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    study, _ = load(study_name, open_storage(postgres_url))  # the database behind the proxy
    trials = study.get_trials()
    assert count_trials(study).finished == 7, [(t.number, t.state.name) for t in trials]
    retried = sorted(t.system_attrs["failed_trial"] for t in trials
                     if "failed_trial" in t.system_attrs)
    assert retried == sorted(t.number for t in trials if t.state == TrialState.FAIL)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert TOKEN not in run.stdout + run.stderr


@pytest.mark.serial
def test_a_killed_workers_trial_is_retried_through_the_proxy(proxy_command, postgres_url,
                                                             study_name, tmp_path):
    """A worker killed with SIGKILL mid-trial: through the proxy its trial goes stale, is
    failed and retried, and the retry resumes after the epochs it reported; budget exact."""
    _create(proxy_command, spec_data(study_name, tmp_path, trials=2, epochs=8))
    direct = optuna.load_study(study_name=study_name, storage=postgres_url)

    def worker() -> subprocess.Popen:
        return subprocess.Popen([HPSEARCH, "worker", study_name, "--storage", proxy_command,
                                 "--gpus", "none"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))

    def two_epochs_in() -> optuna.trial.FrozenTrial | None:
        return next((t for t in direct.get_trials(states=(TrialState.RUNNING,))
                     if len(t.intermediate_values) >= 2), None)

    first = worker()
    try:
        deadline = time.monotonic() + 90
        while (victim := two_epochs_in()) is None:
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        # A worker's one connection: to the proxy (none to the database, none for a lock).
        assert _tcp_peers(first.pid) == [int(proxy_command.rsplit(":", 1)[1])]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = worker()
    out, _ = second.communicate(timeout=180)
    assert second.returncode == 0, out
    trials = direct.get_trials()
    assert count_trials(direct).finished == 2  # the exact budget
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [victim.number]
    retry = next(t for t in trials if t.user_attrs.get("retried_from") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert sorted(retry.intermediate_values) == list(range(1, 9))  # inherited + its own
    assert TOKEN not in out


@pytest.mark.serial
def test_a_worker_waits_out_a_proxy_restart(postgres_url, study_name, tmp_path, token):
    """The proxy stopped while a worker's trial runs (its report of epoch 2 waits for that) and
    started again on its address a few seconds later: the worker's calls meet UNAVAILABLE,
    which it waits out as a lost database connection, and the budget finishes exactly."""
    port, env = free_port(), _env(tmp_path)
    with storage_proxy(postgres_url, tmp_path, env=env, port=port) as url:
        _create(url, spec_data(study_name, tmp_path, trials=3, epochs=6))
        (tmp_path / "fit_proxy.py").write_text(GATED_FIT)  # epoch 2 reports into the outage
        direct = optuna.load_study(study_name=study_name, storage=postgres_url)
        worker = subprocess.Popen([HPSEARCH, "worker", study_name, "--storage", url, "--gpus",
                                   "none"], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env)
        try:
            deadline = time.monotonic() + 90
            while not any(t.intermediate_values for t in
                          direct.get_trials(states=(TrialState.RUNNING,))):
                assert worker.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        except BaseException:
            worker.kill()
            raise
    try:
        (tmp_path / "proxy-down").touch()  # the first trial's epoch 2 reports now, and fails
        time.sleep(3)  # the proxy is down: the worker's next calls fail
        with storage_proxy(postgres_url, tmp_path, env=env, port=port):
            out, _ = worker.communicate(timeout=180)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == 0, out
    assert "storage unreachable" in out and "UNAVAILABLE" in out  # it said it waited
    assert count_trials(direct).finished == 3  # the exact budget
    assert not direct.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
