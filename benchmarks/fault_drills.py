"""Fault drills against PostgreSQL, measured: what each fault costs a study.

Drills on real processes (`hpsearch run` / `hpsearch worker`), each on a study of synthetic
trials of about 0.3 s an epoch, heartbeat every 1 s, grace period 3 s:

  1. chaos: two workers; ten times, the worker of a trial an epoch in is killed with SIGKILL
     and a new one started in its place;
  3. the supervisor (`run --workers 2`) killed with SIGKILL mid-trials, then `run` again;
  4. PostgreSQL restarted (`pg_ctlcluster ... restart`) under `run --workers 2`;
  6. Ctrl-C (SIGINT) to the supervisor of `run --workers 2` mid-trials, then `run` again;
  7. a terminal's Ctrl-C: SIGINT to `run --workers 2`'s whole process group, then `run` again;
  8, 9. the database away for 45 s and for 3 minutes under `run --workers 2`: its connections
     go through a loopback proxy that drops them all and refuses new ones (a real outage for
     the run, none for the server's other clients).

Per drill: trials_lost (a faulted trial whose work no later trial took up), trials_duplicated
(finished trials beyond the budget), epochs_recomputed (epochs a retry trained again that its
dead trial had already trained; goal at most one per fault) and seconds_to_resume (from a
fault to the start of the retry that resumes its trial; after an outage, from the database's
return). Ctrl-C: processes_left (of the run, once it exited). Outages: exit_code of `run`,
trials_failed_stale (made stale by missed heartbeats, then retried) and
seconds_to_train_again (from the database's return to the study's next epoch: at most the
storage retries' longest wait, 15 s; 45 s and 180 s end 0.5 s before a try, on the backoff's
0.5 + 1 + 2 + 4 + 8 + 15k s). Ends with `name: value` lines.

    .venv/bin/python benchmarks/fault_drills.py [--drills 1,3,4,6,7,8,9]  # the local PostgreSQL
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.search_tests.faults import DatabaseProxy, processes_of  # noqa: E402 - the drills' own

POSTGRES = os.environ.get("HPSEARCH_TEST_POSTGRES",
                          "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


def study_file(folder: Path, name: str, trials: int, epochs: int) -> Path:
    data = {"name": name, "budget": {"trials": trials, "epochs": epochs},
            "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
            "data": {"dataset": "synthetic", "size": 30000}, "model": {"hidden": [256]},
            "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}},
            "run": {"checkpoint_dir": str(folder / "ckpt"), "heartbeat_interval": 1,
                    "grace_period": 3}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=POSTGRES)


def running(name: str, min_epochs: int = 1) -> list[optuna.trial.FrozenTrial]:
    try:
        trials = study(name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:
        return []
    return [t for t in trials if len(t.intermediate_values) >= min_epochs]


def spawn(*args: str, cwd: Path) -> subprocess.Popen:
    """`hpsearch ARGS` in a session of its own, as a terminal starts it (its process group's
    id is its pid)."""
    return subprocess.Popen([HPSEARCH, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def measure(name: str, budget: int, faults: dict[int, float]) -> dict[str, float]:
    """The cost of the faults that hit trials `faults` (number → when, epoch seconds)."""
    trials = study(name).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    by_retried = {t.user_attrs["retried_from"]: t for t in trials
                  if "retried_from" in t.user_attrs}
    number = {t.number: t for t in trials}
    lost, recomputed, resumption = 0, 0, []
    for dead, when in faults.items():
        retry = by_retried.get(dead)
        if retry is None:
            lost += 1
            continue
        trained = len(number[dead].intermediate_values)  # what the dead trial had reported
        resumed = retry.user_attrs.get("resumed_from_epoch")
        if resumed is None:  # the retry died too: its own retry says where it resumed
            resumed = len(retry.intermediate_values)
        recomputed += max(0, trained - resumed)
        if retry.datetime_start is not None:
            resumption.append(retry.datetime_start.timestamp() - when)
    return {"trials_lost": lost, "trials_duplicated": max(0, len(finished) - budget),
            "epochs_recomputed": recomputed, "faults": len(faults),
            "seconds_to_resume": statistics.median(resumption) if resumption else 0.0}


def drill_chaos(folder: Path, name: str) -> dict[str, float]:
    path = study_file(folder, name, trials=6, epochs=10)
    created = subprocess.run([HPSEARCH, "run", str(path), "--storage", POSTGRES,
                              "--create-only"], cwd=folder, capture_output=True)
    assert created.returncode == 0, created.stderr
    workers = [spawn("worker", name, "--storage", POSTGRES, "--gpus", "none", cwd=folder)
               for _ in range(2)]
    faults: dict[int, float] = {}
    for _ in range(10):
        by_pid = {w.pid: w for w in workers}
        victim = wait_for(lambda by_pid=by_pid: next(
            (t for t in running(name) if t.user_attrs.get("pid") in by_pid
             and t.number not in faults), None), 120, "a trial an epoch in")
        process = by_pid[victim.user_attrs["pid"]]
        process.kill()
        process.wait()
        faults[victim.number] = time.time()
        workers[workers.index(process)] = spawn("worker", name, "--storage", POSTGRES,
                                                "--gpus", "none", cwd=folder)
    for w in workers:
        w.wait(timeout=600)
    return measure(name, 6, faults)


def rerun_after(folder: Path, name: str, interrupt: Any) -> dict[str, float]:
    """`run --workers 2`, `interrupt` it once both trials are two epochs in, `run` again."""
    path = study_file(folder, name, trials=4, epochs=12)
    run = spawn("run", str(path), "--storage", POSTGRES, "--workers", "2", cwd=folder)
    hit = wait_for(lambda: len(running(name, 2)) == 2 and running(name, 2), 120,
                   "two trials two epochs in")
    when = time.time()
    interrupt(run)
    run.wait(timeout=60)
    time.sleep(1)  # what a parent-death signal kills takes a moment
    left = len(processes_of(run.pid))
    faults = {t.number: when for t in hit}
    again = subprocess.run([HPSEARCH, "run", str(path), "--storage", POSTGRES, "--workers",
                            "2"], cwd=folder, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr
    return {**measure(name, 4, faults), "exit_code": run.returncode, "processes_left": left}


def drill_restart(folder: Path, name: str) -> dict[str, float]:
    path = study_file(folder, name, trials=4, epochs=12)
    run = spawn("run", str(path), "--storage", POSTGRES, "--workers", "2", cwd=folder)
    hit = wait_for(lambda: running(name, 2), 120, "a trial two epochs in")
    version = os.listdir("/etc/postgresql")[0]
    started = time.time()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True)
    down = time.time() - started
    code = run.wait(timeout=600)
    assert code == 0, f"run exited {code} after the restart"
    # A trial the restart made stale (no heartbeat for the grace period) is a fault too.
    failed = {t.number: started for t in study(name).get_trials(states=(TrialState.FAIL,))}
    result = measure(name, 4, failed)
    result.update(restart_seconds=down, trials_running_at_restart=len(hit))
    return result


def epochs_trained(name: str) -> int:
    return sum(len(t.intermediate_values) for t in study(name).get_trials(deepcopy=False))


def drill_outage(folder: Path, name: str, seconds: float) -> dict[str, float]:
    """The database away for `seconds` under `run --workers 2` once two trials are two epochs
    in; trials of 20 epochs, so both are still training when it comes back."""
    path = study_file(folder, name, trials=4, epochs=20)
    proxy = DatabaseProxy(POSTGRES)
    run = spawn("run", str(path), "--storage", proxy.url, "--workers", "2", cwd=folder)
    try:
        hit = wait_for(lambda: len(running(name, 2)) == 2 and running(name, 2), 120,
                       "two trials two epochs in")
        started = time.monotonic()
        proxy.down()
        before = epochs_trained(name)  # read directly: nothing reaches it through the proxy
        time.sleep(seconds - (time.monotonic() - started))
        proxy.up()
        back, away = time.time(), time.monotonic() - started
        wait_for(lambda: epochs_trained(name) > before, seconds + 600, "an epoch trained")
        again = time.time() - back
        code = run.wait(timeout=seconds + 600)
    finally:
        proxy.close()
        if run.poll() is None:  # the drill failed: leave nothing of it running
            os.killpg(run.pid, signal.SIGKILL)
    stale = {t.number: back for t in study(name).get_trials(states=(TrialState.FAIL,))}
    return {**measure(name, 4, stale), "exit_code": code, "outage_seconds": away,
            "trials_running_at_outage": len(hit), "trials_failed_stale": len(stale),
            "seconds_to_train_again": again}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drills", default="1,3,4,6,7,8,9")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix="hpsearch-drills-"))
    tag = uuid.uuid4().hex[:6]
    drills = {
        "1": ("kill -9 of a worker, 10 times", lambda: drill_chaos(folder, f"drill1-{tag}")),
        "3": ("kill -9 of the supervisor", lambda: rerun_after(
            folder, f"drill3-{tag}", lambda run: run.kill())),
        "4": ("PostgreSQL restarted mid-trials", lambda: drill_restart(folder, f"drill4-{tag}")),
        "6": ("Ctrl-C to the supervisor mid-trials", lambda: rerun_after(
            folder, f"drill6-{tag}", lambda run: run.send_signal(signal.SIGINT))),
        "7": ("a terminal's Ctrl-C (the process group) mid-trials", lambda: rerun_after(
            folder, f"drill7-{tag}", lambda run: os.killpg(run.pid, signal.SIGINT))),
        "8": ("the database away 45 s", lambda: drill_outage(folder, f"drill8-{tag}", 45)),
        "9": ("the database away 3 minutes", lambda: drill_outage(folder, f"drill9-{tag}",
                                                                  180)),
    }
    results = {}
    for key in args.drills.split(","):
        what, drill = drills[key]
        t0 = time.monotonic()
        results[key] = drill()
        print(f"drill {key} ({what}): {results[key]} in {time.monotonic() - t0:.0f} s",
              flush=True)
    print(f"# PostgreSQL at {POSTGRES.split('@')[-1]}")
    for key, result in results.items():
        for metric, value in result.items():
            print(f"drill_{key}_{metric}: {value:.2f}" if isinstance(value, float)
                  else f"drill_{key}_{metric}: {value}")


if __name__ == "__main__":
    main()
