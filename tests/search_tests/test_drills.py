"""Fault drills on the real services: a PostgreSQL restart and a 45 s database outage under
running workers, a full disk under a SQLite study and under the checkpoints, a CUDA
out-of-memory error.

Each ends with the exact budget and no trial lost or counted twice. The disk drills mount a
small tmpfs, which needs root (CI runs as root); elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import search.trial._objective as objective_module
import trainers
from search.run import create_or_load
from search.spec import parse_spec
from search.storage import open_storage
from search.workers import run_worker
from tests.search_tests.faults import DatabaseProxy
from tests.search_tests.studies import study_data
from tests.search_tests.test_stop_and_delete import running_with_an_epoch
from tests.search_tests.test_workers import (
    alive,
    create,
    running_with_epochs,
    slow,
    start_worker,
    wait_for,
    write_spec,
)

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


def restart_postgres(down_s: float = 3.0) -> None:
    """Stop the local server, leave it down `down_s` seconds (a plain restart can be quick
    enough that no query meets it), and start it again."""
    versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        message = "pg_ctlcluster is not here: the PostgreSQL restart drill needs the local server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main"]
    subprocess.run([*ctl, "stop"], check=True, capture_output=True, timeout=120)
    try:
        time.sleep(down_s)
    finally:
        subprocess.run([*ctl, "start"], check=True, capture_output=True, timeout=120)


def exact_budget(url: str, name: str, trials: int) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(finished) != trials:
        for t in study.trials:
            print("DRILL", t.number, t.state.name, t.user_attrs.get("retried_from"),
                  t.user_attrs.get("pid"), t.datetime_start, t.datetime_complete,
                  t.user_attrs.get("ended"), t.system_attrs)
    assert len(finished) == trials, [(t.number, t.state.name, t.user_attrs.get("retried_from"),
                                      t.user_attrs.get("pid"), str(t.datetime_start)[11:23],
                                      str(t.datetime_complete)[11:23]) for t in study.trials]
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # No trial counted twice: a retry stands for its dead trial, never beside it.
    retried = [t.user_attrs["retried_from"] for t in finished if "retried_from" in t.user_attrs]
    assert len(retried) == len(set(retried))
    return finished


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_postgres_restart_mid_trial_is_ridden_out(tmp_path, study_name, postgres_url,
                                                    command):
    """`run --workers 2` (its supervisor's progress too) and a lone `worker`: the study completes
    without a second command."""
    path = write_spec(tmp_path, slow(study_name, tmp_path, trials=4, epochs=20))
    if command == "run":
        argv = [HPSEARCH, "run", str(path), "--storage", postgres_url, "--workers", "2"]
    else:
        created = subprocess.run([HPSEARCH, "run", str(path), "--storage", postgres_url,
                                  "--create-only"], cwd=tmp_path, capture_output=True, text=True)
        assert created.returncode == 0, created.stderr
        argv = [HPSEARCH, "worker", study_name, "--storage", postgres_url, "--gpus", "none"]
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: running_with_an_epoch(postgres_url, study_name, 1), timeout=120,
                 what="a trial an epoch in")
        restart_postgres()
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert "storage unreachable" in out  # it did see the restart, and waited
    exact_budget(postgres_url, study_name, trials=4)


OUTAGE_S = 45.0  # benchmarks/fault_drills.py drills three minutes


@pytest.mark.postgres
@pytest.mark.serial  # a minute of waiting on the database, timed to the second
def test_a_45_s_database_outage_under_run_is_ridden_out_to_the_exact_budget(
        tmp_path, study_name, postgres_url):
    """`run --workers 2` reaches PostgreSQL through a proxy that takes the database away for
    45 s once both trials are an epoch in: every connection dropped, new ones refused, for
    fifteen times the grace period. Everyone waits; `run` ends 0 with the budget met exactly,
    no trial lost or counted twice."""
    path = write_spec(tmp_path, slow(study_name, tmp_path, trials=2, epochs=8))
    proxy = DatabaseProxy(postgres_url)
    process = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", proxy.url,
                                "--workers", "2"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: running_with_an_epoch(postgres_url, study_name, 2), timeout=120,
                 what="two trials an epoch in")
        away = proxy.outage(OUTAGE_S)
        out, _ = process.communicate(timeout=240)
    finally:
        proxy.close()
        if process.poll() is None:
            process.kill()
    assert away >= OUTAGE_S
    assert process.returncode == 0, out
    assert "storage unreachable while reporting" in out  # the workers met it, and waited
    assert "heartbeat of trial" not in out  # the heartbeat thread skips its beats, silently
    finished = exact_budget(postgres_url, study_name, trials=2)
    # Usually the first beat after the return comes first and the trials go on; a worker's
    # stale check coming first fails them instead, and their retries resume.
    for retry in (t for t in finished if "retried_from" in t.user_attrs):
        assert retry.user_attrs["resumed_from_epoch"] >= 1, (retry.user_attrs, out)


def tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs ({mounted.stderr.strip()}): the disk drills need root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_a_full_disk_under_sqlite_is_one_line_and_the_study_continues(tmp_path):
    disk = tmpfs(tmp_path / "disk", "3M")
    try:
        url = f"sqlite:///{disk / 's.db'}"
        data = study_data("full", trials=6, epochs=2, size=256, heartbeat=True,
                          checkpoints=tmp_path / "ckpt")
        path = write_spec(tmp_path, data)
        assert subprocess.run([HPSEARCH, "run", str(path), "--storage", url, "--trials", "1"],
                              cwd=tmp_path, capture_output=True).returncode == 0
        filler = disk / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        full = subprocess.run([HPSEARCH, "run", str(path), "--storage", url], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HPSEARCH_ARTIFACTS": str(tmp_path / "art")})
        assert full.returncode != 0
        error = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "full" in error[0], full.stdout + full.stderr
        assert "storage unreachable" not in full.stderr  # not waited for five minutes
        filler.unlink()  # space again: the database is whole (WAL needs room to open it)
        check = sqlite3.connect(disk / "s.db").execute("PRAGMA integrity_check").fetchone()
        assert check == ("ok",)
        again = subprocess.run([HPSEARCH, "run", str(path), "--storage", url], cwd=tmp_path,
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HPSEARCH_ARTIFACTS": str(tmp_path / "art")})
        assert again.returncode == 0, again.stdout + again.stderr
        exact_budget(url, "full", trials=6)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_checkpoint_disk_is_a_warning_and_the_trial_goes_on(tmp_path, capfd):
    disk = tmpfs(tmp_path / "ckpt", "64k")  # smaller than one checkpoint of this network
    try:
        store = trainers.CheckpointStore(disk / "trial-0")
        result = trainers.train({"dataset": "synthetic", "hidden": [256], "epochs": 2,
                                 "device": "cpu"}, checkpoint=store)
        assert result.status == "completed" and result.epochs_run == 2
        warning = capfd.readouterr().err
        assert warning.count("warning: checkpoint not written") == 1
        assert "bytes free" in warning and not list((disk / "trial-0").glob("*.pt"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_cuda_out_of_memory_is_recorded_and_the_worker_goes_on(tmp_path, monkeypatch):
    """Injected where no GPU is present: the first two trials run out of memory."""
    spec = parse_spec(study_data("oom", trials=3, epochs=1, size=128,
                                 space={"lr": {"low": 1e-3, "high": 0.1, "log": True},
                                        "batch_size": {"pow2": [64, 128]}}))
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    real_train, calls = trainers.train, []

    def oom_twice(config, *args, **kwargs):
        calls.append(config.batch_size)
        if len(calls) <= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(objective_module.trainers, "train", oom_twice)
    run_worker(study, spec, device="cpu", artifacts=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    for t, batch in zip(failed, calls, strict=False):
        assert t.user_attrs["ended"].startswith(f"out of memory at batch_size {batch} on cpu: "
                                                "CUDA out of memory")


def test_a_paused_worker_past_its_grace_period_loses_its_trial_quietly_and_goes_on(
        tmp_path, study_name, postgres_url):
    """SIGSTOP past the grace period, then SIGCONT: the trial was retried by the other worker;
    the paused worker's late result is refused without an error, and it goes on."""
    study, _ = create(postgres_url, slow(study_name, tmp_path, trials=3, epochs=16))
    paused = start_worker(study_name, postgres_url, tmp_path)
    other = None
    try:
        victim = wait_for(lambda: running_with_epochs(study, 1, pid=paused.pid), timeout=90,
                          what="the first worker's trial an epoch in")
        paused.send_signal(signal.SIGSTOP)
        other = start_worker(study_name, postgres_url, tmp_path)
        wait_for(lambda: running_with_epochs(study, 1, retried_from=victim.number),
                 timeout=90, what="the retry running on the other worker")
        paused.send_signal(signal.SIGCONT)
        out, _ = paused.communicate(timeout=240)
        other_out, _ = other.communicate(timeout=240)
    finally:
        for process in (paused, other):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
    assert paused.returncode == 0, out
    assert other.returncode == 0, other_out
    assert "Traceback" not in out
    finished = exact_budget(postgres_url, study_name, trials=3)
    assert study.get_trials(states=(TrialState.FAIL,))[0].number == victim.number
    assert any(t.user_attrs.get("retried_from") == victim.number for t in finished)


def test_a_killed_supervisor_leaves_no_worker_and_the_next_run_resumes(tmp_path, study_name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_spec(tmp_path, slow(study_name, tmp_path, trials=2, epochs=30))
    run = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", url, "--workers", "2"],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: running_with_an_epoch(url, study_name, 2), timeout=90,
                 what="two trials an epoch in")
        study = optuna.load_study(study_name=study_name, storage=url)
        pids = {t.user_attrs["pid"] for t in study.get_trials(states=(TrialState.RUNNING,))}
        run.kill()  # SIGKILL: the supervisor can do nothing about it
        run.wait()
        wait_for(lambda: not [pid for pid in pids if alive(pid)], timeout=20,
                 what="the workers to die with their supervisor")
    finally:
        if run.poll() is None:
            run.kill()
    again = subprocess.run([HPSEARCH, "run", str(path), "--storage", url, "--workers", "2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    finished = exact_budget(url, study_name, trials=2)
    resumed = [t for t in finished if "retried_from" in t.user_attrs]
    assert len(resumed) == 2 and all(t.user_attrs["resumed_from_epoch"] >= 1 for t in resumed)


def test_ten_kills_of_a_worker_lose_no_trial_and_count_none_twice(tmp_path, study_name,
                                                                  postgres_url):
    """Chaos loop: two workers on PostgreSQL; ten times, the worker of a trial an epoch in is
    killed with SIGKILL and a new one takes its place. Every killed trial is retried and
    resumes from its checkpoint; the budget is met exactly."""
    study, _ = create(postgres_url, slow(study_name, tmp_path, trials=4, epochs=10))
    workers = [start_worker(study_name, postgres_url, tmp_path) for _ in range(2)]
    killed: list[int] = []
    try:
        def victim(by_pid: dict[int, subprocess.Popen]) -> optuna.trial.FrozenTrial | None:
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (t.user_attrs.get("pid") in by_pid and len(t.intermediate_values) >= 1
                        and t.number not in killed):
                    return t
            return None

        for _ in range(10):
            by_pid = {w.pid: w for w in workers}
            trial = wait_for(lambda by_pid=by_pid: victim(by_pid), timeout=120,
                             what="a trial an epoch in")
            process = by_pid[trial.user_attrs["pid"]]
            process.kill()
            process.wait()
            killed.append(trial.number)
            workers[workers.index(process)] = start_worker(study_name, postgres_url, tmp_path)
        outs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert all(w.returncode == 0 for w in workers), outs
    finished = exact_budget(postgres_url, study_name, trials=4)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert sorted(t.number for t in failed) == sorted(killed)  # only the killed ones
    retried = {t.user_attrs.get("retried_from"): t for t in study.get_trials()
               if "retried_from" in t.user_attrs}
    assert set(killed) <= set(retried)  # each killed trial was taken up again
    # Each retry resumed from the checkpoint of the trial it stands for (killed an epoch in).
    assert all(retried[n].user_attrs["resumed_from_epoch"] >= 1 for n in killed
               if retried[n].state in (TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4


def test_a_read_only_command_rides_out_a_lost_connection(tmp_path, study_name, postgres_url):
    """`status` loses its connection in the middle (after the storage opened): it waits for the
    storage and prints its whole answer, once."""
    path = write_spec(tmp_path, study_data(study_name, trials=2, epochs=1, size=128))
    done = subprocess.run([HPSEARCH, "run", str(path), "--storage", postgres_url],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proxy = DatabaseProxy(postgres_url, cut_on=b"GROUP BY")
    try:
        status = subprocess.run([HPSEARCH, "status", study_name, "--storage", proxy.url,
                                 "--json"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
    finally:
        proxy.close()
    assert proxy.cut.is_set()  # the connection was really lost in the middle
    assert status.returncode == 0, status.stderr
    assert "storage unreachable while hpsearch status" in status.stderr
    assert json.loads(status.stdout)["counts"]["complete"] == 2  # one whole answer
