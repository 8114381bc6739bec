"""Pausing and removing a study: `hpsearch stop`, Ctrl-C that loses no work, `hpsearch delete`.

Real processes and real signals: an interrupted trial ends FAIL "interrupted" and is queued
again; the next `run` resumes it from its last epoch checkpoint, and the budget is met exactly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from search.storage import budget_lock
from tests.search_tests.test_workers import _study_if_created, slow, wait_for, write_spec

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


def interrupted_run(tmp_path: Path, name: str, interrupt) -> tuple[Path, str, int, str]:
    """`run --workers 2` of a slow study, interrupted by `interrupt(process, url)` once both
    trials are an epoch in: (study file, url, run's exit code, its output). Each interrupted
    trial must be queued to resume (both are mid-trial: 30 epochs take ~9 s)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_spec(tmp_path, slow(name, tmp_path, trials=2, epochs=30))
    run = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", url, "--workers", "2"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        wait_for(lambda: running_with_an_epoch(url, name, 2), timeout=90,
                 what="two trials an epoch in")
        interrupt(run, url)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    study = optuna.load_study(study_name=name, storage=url)
    interrupted = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == len(interrupted) == 2, out
    return path, url, run.returncode, out


def test_stop_checkpoints_every_trial_and_run_resumes_them(tmp_path, study_name):
    def stop(run: subprocess.Popen, url: str) -> None:
        stopped = hp("stop", study_name, "--storage", url, "--wait", "60", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert "no trial is running" in stopped.stdout

    path, url, code, out = interrupted_run(tmp_path, study_name, stop)
    assert code == 0, out
    assert "stopped by `hpsearch stop`" in out and "Traceback" not in out
    again = resumed_to_the_budget(tmp_path, path, url, study_name, trials=2)
    assert f"resuming study {study_name!r} after `hpsearch stop`" in again


def test_ctrl_c_loses_no_work_the_next_run_resumes_the_trials(tmp_path, study_name):
    path, url, code, out = interrupted_run(
        tmp_path, study_name, lambda run, url: run.send_signal(signal.SIGINT))
    assert code == 130, out
    resumed_to_the_budget(tmp_path, path, url, study_name, trials=2)


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
