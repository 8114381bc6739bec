"""Pausing and removing a study: `hpsearch stop`, Ctrl-C that loses no work, `hpsearch delete`.

Real processes and real signals: an interrupted trial ends FAIL "interrupted" and is queued
again; the next `run` resumes it from its last epoch checkpoint, and the budget is met exactly.
Ctrl-C is sent as a terminal sends it, to `run`'s whole process group (SIGINT to the supervisor
alone: test_workers.py and benchmarks/fault_drills.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState

from search.storage import budget_lock
from tests.search_tests.faults import processes_of
from tests.search_tests.test_workers import (
    _study_if_created,
    alive,
    slow,
    wait_for,
    write_spec,
)

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


def hp(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def running_with_an_epoch(url: str, name: str, n: int) -> bool:
    study = _study_if_created(url, name)  # never creates tables under the running `run`
    if study is None:
        return False
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(running) >= n and all(len(t.intermediate_values) >= 1 for t in running)


def resumed_to_the_budget(tmp_path: Path, path: Path, url: str, name: str, trials: int) -> str:
    """`run` again: the interrupted trials resume from their checkpoints; budget met exactly;
    nothing left running or waiting, and no checkpoint folder left behind. Its output."""
    again = hp("run", str(path), "--storage", url, "--workers", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    study = optuna.load_study(study_name=name, storage=url)
    by_state = {s: study.get_trials(states=(s,)) for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == trials
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    interrupted = {t.number for t in by_state[TrialState.FAIL]}
    assert interrupted and all(t.user_attrs["ended"] == "interrupted"
                               for t in by_state[TrialState.FAIL])
    retries = [t for t in by_state[TrialState.COMPLETE] if "retried_from" in t.user_attrs]
    assert {t.user_attrs["retried_from"] for t in retries} == interrupted
    assert all(t.user_attrs["resumed_from_epoch"] >= 1 for t in retries)  # not from scratch
    assert not (tmp_path / "ckpt" / name).exists()
    return again.stdout


def interrupted_run(tmp_path: Path, data: dict, interrupt, *,
                    running: int = 2) -> tuple[Path, str, int, str]:
    """`run --workers 2` of the study `data` (in a session of its own, as a terminal starts
    it), interrupted by `interrupt(process, url)` once `running` trials are an epoch in:
    (study file, url, run's exit code, its output). Each interrupted trial must be queued to
    resume (all are mid-trial)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_spec(tmp_path, data)
    run = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", url, "--workers", "2"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)

    def ready() -> bool:
        if run.poll() is not None:
            raise AssertionError(f"run exited {run.returncode} first:\n{run.stdout.read()}")
        return running_with_an_epoch(url, data["name"], running)

    try:
        wait_for(ready, timeout=90, what=f"{running} trials an epoch in")
        interrupt(run, url)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    study = optuna.load_study(study_name=data["name"], storage=url)
    interrupted = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == len(interrupted) == running, \
        out
    return path, url, run.returncode, out


def test_stop_checkpoints_every_trial_and_run_resumes_them(tmp_path, study_name):
    def stop(run: subprocess.Popen, url: str) -> None:
        stopped = hp("stop", study_name, "--storage", url, "--wait", "60", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert "no trial is running" in stopped.stdout

    path, url, code, out = interrupted_run(tmp_path, slow(study_name, tmp_path, trials=2,
                                                          epochs=30), stop)
    assert code == 0, out
    assert "stopped by `hpsearch stop`" in out and "Traceback" not in out
    again = resumed_to_the_budget(tmp_path, path, url, study_name, trials=2)
    assert f"resuming study {study_name!r} after `hpsearch stop`" in again


# A command trainer that checkpoints as a user's script does: its last epoch in the trial's
# folder, read back as it starts, so that a retry resumes after it. 0.3 s an epoch, as `slow`.
RESUMING_SCRIPT = """
import os, pathlib, sys, time
import search

state = pathlib.Path(os.environ["HPSEARCH_CHECKPOINT_DIR"]) / "epoch.txt"
start = int(state.read_text()) if state.exists() else 0
for epoch in range(start + 1, int(sys.argv[1]) + 1):
    time.sleep(0.3)
    search.report(epoch, val_loss=float(sys.argv[2]) + 1.0 / epoch)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(str(epoch))
"""


def ctrl_c_study(kind: str, name: str, tmp_path: Path, epochs: int) -> tuple[dict, int]:
    """The study of a Ctrl-C drill and how many trials `run --workers 2` runs at once: the
    built-in trainer one trial a worker (plain) or two (packed, `run.pack`), or a command."""
    data = slow(name, tmp_path, trials=2, epochs=epochs)
    if kind == "packed":
        data["budget"]["trials"] = 4
        data["run"]["pack"] = 2
        return data, 4
    if kind == "command":
        (tmp_path / "train.py").write_text(RESUMING_SCRIPT)
        del data["data"], data["model"]  # the script's own
        data["trainer"] = {"command": [sys.executable, str(tmp_path / "train.py"), "{epochs}",
                                       "{lr}"], "kill_grace_s": 2}
    return data, 2


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.serial  # multi-process, timed on the trials' epochs
@pytest.mark.parametrize("kind", ["plain", "packed", "command"])
def test_ctrl_c_to_the_process_group_loses_no_work_and_leaves_no_process(tmp_path, study_name,
                                                                         kind):
    """What a terminal's Ctrl-C sends: SIGINT to every process of `run --workers 2`'s group at
    once (the supervisor and its workers; a command trainer sits in a session of its own).
    `run` exits 130, no process of it is left, and the next `run` resumes every interrupted
    trial from its checkpoint and meets the budget exactly."""
    data, running = ctrl_c_study(kind, study_name, tmp_path, epochs=8)
    seen: dict[psutil.Process, str] = {}  # each process of the run, its command line
    session: list[int] = []

    def ctrl_c(run: subprocess.Popen, url: str) -> None:
        session.append(run.pid)  # its process group's id too
        seen.update((p, _cmdline(p)) for p in processes_of(run.pid))
        os.killpg(run.pid, signal.SIGINT)

    path, url, code, out = interrupted_run(tmp_path, data, ctrl_c, running=running)
    assert code == 130, out
    workers = [p for p, line in seen.items() if "search.cli worker" in line]
    commands = [p for p, line in seen.items() if "train.py" in line]
    assert len(workers) == 2 and len(commands) == (2 if kind == "command" else 0), seen
    # Gone with `run`: a command killed by its parent-death signal may take a moment.
    wait_for(lambda: not [p for p in seen if p.is_running() and alive(p.pid)]
             and not processes_of(session[0]),
             timeout=5, what="every process of the run to end")
    resumed_to_the_budget(tmp_path, path, url, study_name, trials=data["budget"]["trials"])


def test_sigterm_to_a_single_in_process_worker_queues_its_trial_like_ctrl_c(tmp_path,
                                                                          study_name):
    """One worker runs inside `run` (a container's PID 1, a pod's only process): SIGTERM, as
    Kubernetes or Docker send on stop, interrupts it as Ctrl-C does instead of being ignored."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_spec(tmp_path, slow(study_name, tmp_path, trials=1, epochs=30))
    run = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", url], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: running_with_an_epoch(url, study_name, 1), timeout=90,
                 what="the trial an epoch in")
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, out
    study = optuna.load_study(study_name=study_name, storage=url)
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["ended"] == "interrupted"
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1  # queued to resume


def test_delete_removes_the_study_its_artifacts_checkpoints_and_lock(tmp_path, study_name,
                                                                    monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", str(artifacts))
    data = slow(study_name, tmp_path, trials=2, epochs=1)
    data["run"]["keep_checkpoints"] = True
    path = write_spec(tmp_path, data)
    other = write_spec(tmp_path, {**yaml.safe_load(path.read_text()), "name": "other"})
    for study_file in (path, other):
        assert hp("run", str(study_file), "--storage", url, cwd=tmp_path).returncode == 0
    before = set(artifacts.iterdir())
    assert len(before) == 2 * 2 * 4  # two studies, two trials, four files each
    assert (tmp_path / "ckpt" / study_name).is_dir()
    lock = Path(budget_lock(url, study_name).path)
    assert lock.exists()

    refused = hp("delete", study_name, "--storage", url, cwd=tmp_path)  # no terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    deleted = hp("delete", study_name, "--storage", url, "--yes", cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    assert "2 trials, 8 artifact files, 1 checkpoint folder(s), 1 lock file(s)" in deleted.stdout
    assert optuna.get_all_study_names(url) == ["other"]
    assert len(set(artifacts.iterdir())) == 8  # the other study's are kept
    assert not (tmp_path / "ckpt" / study_name).exists() and not lock.exists()
    assert (tmp_path / "ckpt" / "other").is_dir()
    gone = hp("delete", study_name, "--storage", url, "--yes", cwd=tmp_path)
    assert gone.returncode == 2 and "no study named" in gone.stderr
