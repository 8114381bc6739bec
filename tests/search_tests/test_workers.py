"""Parallel workers and faults, with real processes and real databases.

Worker processes are real `hpsearch` commands; they are killed with real signals; PostgreSQL
connections are really terminated. Trials are small synthetic runs so the suite stays fast.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from search._urls import sqlite_path
from search.run import create_or_load, load
from search.spec import parse_spec
from search.storage import count_trials, open_storage
from search.workers import Slot, plan_slots, visible_gpu_ids, worker_command
from tests.search_tests.studies import LR, study_data
from tests.servers import storage_proxy

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

def spec_data(name: str, tmp_path: Path, *, trials: int, epochs: int, size: int = 512,
              hidden: int = 16, **changes) -> dict:
    space = {**LR, "batch_size": {"pow2": [32, 64]}}
    return study_data(name, trials=trials, epochs=epochs, size=size, hidden=hidden,
                      checkpoints=tmp_path / "ckpt", heartbeat=True,
                      **{"space": space, **changes})


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path

def slow(name: str, tmp_path: Path, *, trials: int, epochs: int = 8) -> dict:
    """Trials of a few seconds (about 0.3 s an epoch here), long enough to kill mid-trial."""
    return spec_data(name, tmp_path, trials=trials, epochs=epochs, size=30000, hidden=256)

def create(url: str, data: dict):
    spec = parse_spec(data)
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    return create_or_load(spec, storage), spec

def start_worker(name: str, url: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([HPSEARCH, "worker", name, "--storage", url, "--gpus", "none"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

def wait_for(predicate, *, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

def running_with_epochs(study, min_epochs: int, **attrs):
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if len(t.intermediate_values) >= min_epochs and all(
                t.user_attrs.get(k) == v for k, v in attrs.items()):
            return t
    return None

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False

# ---- dispatch (pure logic; CUDA itself is exercised only where a GPU exists) ----

@pytest.mark.parametrize(
    ("gpus", "per_gpu", "workers", "ids", "expected"),
    [
        ("auto", 1, None, ["0", "1"], [("cuda", "0"), ("cuda", "1")]),
        ("auto", 2, None, ["0", "1"], [("cuda", "0"), ("cuda", "0"), ("cuda", "1"),
                                       ("cuda", "1")]),
        ("1", 3, None, ["0", "1"], [("cuda", "1")] * 3),
        ("auto", 1, None, [], [("cpu", "")]),
        ("auto", 1, 3, [], [("cpu", "")] * 3),
        ("none", 1, 2, ["0", "1"], [("cpu", "")] * 2),
    ],
)
def test_plan_slots(gpus, per_gpu, workers, ids, expected):
    slots = plan_slots(gpus, trials_per_gpu=per_gpu, workers=workers, cores=8, gpu_ids=ids)
    assert [(s.device, s.cuda_visible_devices) for s in slots] == expected
    assert [s.index for s in slots] == list(range(len(expected)))
    assert all(s.threads == max(1, 8 // len(expected)) for s in slots)

@pytest.mark.parametrize(("gpus", "workers", "fragment"), [
    ("2", None, "GPU 2 not visible here (visible: 0, 1)"),
    ("0,x", None, "expected auto, none or GPU ids"),
    ("auto", 2, "use --trials-per-gpu"),
])
def test_plan_slots_rejects_bad_requests(gpus, workers, fragment):
    from search._errors import SpecError

    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_slots(gpus, workers=workers, gpu_ids=["0", "1"])

def test_visible_gpus_from_environment():
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]
    assert visible_gpu_ids({"HPSEARCH_FAKE_GPU_COUNT": "4"}) == ["0", "1", "2", "3"]

def test_each_worker_process_is_pinned_before_torch_starts():
    argv, env = worker_command(Slot(3, "cuda", "1", 4), "s", "sqlite:///x.db", timeout_s=None,
                               base_env={"PATH": "/bin", "HPSEARCH_FAKE_GPU_COUNT": "2"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["OMP_NUM_THREADS"] == "4"
    assert "HPSEARCH_FAKE_GPU_COUNT" not in env
    assert argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--worker-index") + 1] == "3"
    _, cpu_env = worker_command(Slot(0, "cpu", "", 1), "s", "u", timeout_s=None, base_env={})
    assert cpu_env["CUDA_VISIBLE_DEVICES"] == ""  # CPU workers see no GPU

def test_faked_gpus_give_one_pinned_process_per_slot(tmp_path, study_name):
    """With 2 faked GPUs and 2 per GPU, `run` starts 4 processes pinned 0, 0, 1, 1.

    No CUDA here: the workers fail their trials on the missing device, which is the point at
    which the pinning is visible (each records the device it tried).
    """
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = spec_data(study_name, tmp_path, trials=4, epochs=1,
                     run={"max_failures_in_row": 1, "heartbeat_interval": 1, "grace_period": 3})
    env = {**os.environ, "HPSEARCH_FAKE_GPU_COUNT": "2"}
    result = subprocess.run([HPSEARCH, "run", str(write_spec(tmp_path, data)), "--storage", url,
                             "--trials-per-gpu", "2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "started 4 worker processes" in result.stdout
    assert "#0 cuda GPU 0" in result.stdout and "#3 cuda GPU 1" in result.stdout
    study, _ = load(study_name, open_storage(url))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all("CUDA is not available" in t.user_attrs["ended"] for t in failed)
    assert result.returncode == 1  # every worker stopped: a broken setup, said clearly

# ---- many workers, one study ----

@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_four_workers_meet_the_budget_exactly(backend, tmp_path, study_name, request):
    url = (request.getfixturevalue("postgres_url") if backend == "postgres"
           else f"sqlite:///{tmp_path / 's.db'}")
    # Trials of about a second: long enough that a worker starting a second late still gets some.
    path = write_spec(tmp_path, spec_data(study_name, tmp_path, trials=20, epochs=4,
                                          size=20000, hidden=128))
    result = subprocess.run([HPSEARCH, "run", str(path), "--storage", url, "--workers", "4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    study, _ = load(study_name, open_storage(url))
    trials = study.get_trials()
    assert count_trials(study).finished == 20
    done = [t for t in trials if t.state != TrialState.FAIL]
    assert len(done) == 20 and all(t.state == TrialState.COMPLETE for t in done), [
        (t.number, t.state.name, t.user_attrs.get("ended")) for t in trials]
    # On a starved machine a worker may miss its 3 s grace period (1 s beats here): its trial
    # is failed as stale and retried, never lost and never counted twice.
    retried = [t.user_attrs["retried_from"] for t in trials if "retried_from" in t.user_attrs]
    assert sorted(retried) == sorted(t.number for t in trials if t.state == TrialState.FAIL)
    assert len({t.user_attrs["pid"] for t in done}) == 4  # every worker ran trials
    assert "locked" not in result.stdout + result.stderr

# ---- faults ----

def test_killed_worker_trial_is_retried_and_resumes_from_its_checkpoint(
        tmp_path, study_name, postgres_url):
    study, spec = create(postgres_url, slow(study_name, tmp_path, trials=2))
    first = start_worker(study_name, postgres_url, tmp_path)
    try:
        victim = wait_for(lambda: running_with_epochs(study, 2), timeout=90,
                          what="a trial two epochs in")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = start_worker(study_name, postgres_url, tmp_path)
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out
    trials = study.get_trials()
    assert count_trials(study).finished == 2  # the exact budget
    assert study.get_trials(states=(TrialState.FAIL,))[0].number == victim.number
    retry = next(t for t in trials if t.user_attrs.get("retried_from") == victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert retry.params == victim.params
    assert sorted(retry.intermediate_values) == list(range(1, 9))  # inherited + its own

def test_two_kills_in_a_row_still_resume_and_meet_the_budget(tmp_path, study_name,
                                                              postgres_url):
    study, spec = create(postgres_url, slow(study_name, tmp_path, trials=1, epochs=10))
    first = start_worker(study_name, postgres_url, tmp_path)
    try:
        victim = wait_for(lambda: running_with_epochs(study, 2), timeout=90,
                          what="trial 0 two epochs in")
    finally:
        first.kill()
        first.wait()
    second = start_worker(study_name, postgres_url, tmp_path)
    try:
        retry = wait_for(lambda: running_with_epochs(study, 4, retried_from=victim.number),
                         timeout=120, what="the retry two epochs past its resume point")
    finally:
        second.kill()
        second.wait()
    third = start_worker(study_name, postgres_url, tmp_path)
    out, _ = third.communicate(timeout=240)
    assert third.returncode == 0, out
    assert count_trials(study).finished == 1
    final = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert final.user_attrs["retried_from"] == retry.number
    assert final.user_attrs["resumed_from_epoch"] >= 4
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 2

@pytest.mark.serial  # timed: alone, not beside the parallel tests
def test_ctrl_c_stops_every_worker_within_ten_seconds(tmp_path, study_name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_spec(tmp_path, slow(study_name, tmp_path, trials=6, epochs=20))
    run = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", url, "--workers", "2"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    study = wait_for(lambda: _study_if_created(url, study_name), timeout=60, what="the study")
    try:
        running = wait_for(lambda: _running_pids(study, 2), timeout=180,
                           what="both workers training")
        pids = set(running)
        sent = time.monotonic()
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=15)
        elapsed = time.monotonic() - sent
    finally:
        if run.poll() is None:
            run.kill()
    assert elapsed < 10, out
    assert run.returncode == 130, out
    assert not [pid for pid in pids if alive(pid)]  # no orphan
    ended = [t.user_attrs.get("ended") for t in study.get_trials(states=(TrialState.FAIL,))]
    assert ended.count("interrupted") == 2, ended
    assert not study.get_trials(states=(TrialState.RUNNING,))

def _running_pids(study, n: int) -> list[int] | None:
    """The pids of the running trials once there are `n`, each past its first epoch (training,
    not still importing its first optimizer's modules) and with its pid written."""
    running = study.get_trials(states=(TrialState.RUNNING,))
    pids = [t.user_attrs.get("pid") for t in running]
    trained = all(t.intermediate_values for t in running)
    return pids if len(pids) == n and None not in pids and trained else None

def _study_if_created(url: str, name: str):
    # Read-only until the study exists: opening an Optuna storage on the file creates its
    # tables, racing the `run` that is creating them (and making it fail).
    path = sqlite_path(url)
    if path is not None:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                found = conn.execute("SELECT 1 FROM studies WHERE study_name = ?",
                                     (name,)).fetchone()
        except sqlite3.Error:
            return None
        if not found:
            return None
    try:
        return load(name, open_storage(url, must_exist=True))[0]
    except Exception:
        return None

def test_worker_recovers_when_postgres_kills_its_connections(tmp_path, study_name,
                                                             postgres_url):
    study, spec = create(postgres_url, slow(study_name, tmp_path, trials=3, epochs=4))
    # The worker's connections carry a name, so only they are terminated.
    tagged = f"{postgres_url}?application_name=hpsearch-victim"
    worker = start_worker(study_name, tagged, tmp_path)
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        wait_for(lambda: running_with_epochs(study, 1, host=socket.gethostname(),
                                             pid=worker.pid), timeout=90,
                 what="the worker one epoch in")
        with engine.connect() as conn:
            killed = conn.execute(sqlalchemy.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'hpsearch-victim'"
            )).scalar()
        assert killed >= 1
        out, _ = worker.communicate(timeout=240)
    finally:
        if worker.poll() is None:
            worker.kill()
        engine.dispose()
    assert worker.returncode == 0, out
    assert count_trials(study).finished == 3

def test_workers_through_the_grpc_storage_proxy(tmp_path, study_name, postgres_url):
    with storage_proxy(postgres_url, tmp_path) as grpc_url:
        path = write_spec(tmp_path, spec_data(study_name, tmp_path, trials=12, epochs=1))
        result = subprocess.run([HPSEARCH, "run", str(path), "--storage", grpc_url,
                                 "--workers", "4"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    study, _ = load(study_name, open_storage(postgres_url))  # the database behind the proxy
    trials = study.get_trials()
    # The proxy starts trials under the budget (tests/search_tests/test_proxy_path.py): exact;
    # a trial failed as stale on a starved machine is retried.
    assert count_trials(study).finished == 12
    retried = [t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs]
    assert sorted(retried) == sorted(t.number for t in trials if t.state == TrialState.FAIL)
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # trials of ms: late starters may idle

