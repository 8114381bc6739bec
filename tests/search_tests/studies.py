"""Study files for the search tests: one builder, and the spaces the tests search.

Tests import it as `from tests.search_tests.studies import ...`; each test states only what its
study does differently.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LR = {"lr": {"low": 1e-3, "high": 0.1, "log": True}}
OPTIMIZER_LR_BATCH = {"optimizer": {"choices": ["sgd", "adam"]},
                      "lr": {"low": 1e-3, "high": 1.0, "log": True},
                      "batch_size": {"pow2": [32, 128]}}
AUTO_LR = {"optimizer": {"choices": ["sgd", "adam"]}, "lr": {"auto": True},
           "batch_size": {"pow2": [32, 64]}}
SGD_MOMENTUM = {"momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}}}
WEIGHT_DECAY_GRID = {"weight_decay": {"grid": [0, 1e-4, 1e-3]}}


def study_data(name: str, *, trials: int = 4, epochs: int = 2,
               space: dict[str, Any] | None = None, sampler: str | dict = "random",
               pruner: str | dict = "none", size: int | None = 512, hidden: int = 16,
               checkpoints: Path | None = None, heartbeat: bool = False,
               **changes: Any) -> dict[str, Any]:
    """A study file (as a dict) on synthetic data: an MLP searched over `space` (default: lr).

    `sampler` and `pruner` are a type or the whole section. `checkpoints` sets
    run.checkpoint_dir; `heartbeat` beats every second with a 3 s grace period, so a dead
    worker's trial goes stale within seconds. Other top-level keys: `changes`.
    """
    data: dict[str, Any] = {
        "name": name,
        "budget": {"trials": trials, "epochs": epochs},
        "sampler": sampler if isinstance(sampler, dict) else {"type": sampler, "seed": 0},
        "pruner": pruner if isinstance(pruner, dict) else {"type": pruner},
        "data": {"dataset": "synthetic", **({"size": size} if size is not None else {})},
        "model": {"type": "mlp", "hidden": [hidden]},
        "space": dict(space if space is not None else LR),
    }
    run: dict[str, Any] = {}
    if checkpoints is not None:
        run["checkpoint_dir"] = str(checkpoints)
    if heartbeat:
        run.update(heartbeat_interval=1, grace_period=3)
    if run:
        data["run"] = run
    data.update(changes)
    return data


def searched(name: str, tmp: Path, **changes: Any) -> dict[str, Any]:
    """A study with complete and pruned trials to show: TPE, Hyperband, 1024 samples."""
    settings: dict[str, Any] = {"trials": 6, "epochs": 3, "sampler": "tpe", "pruner": "hyperband",
                                "size": 1024, "hidden": 32, "space": OPTIMIZER_LR_BATCH,
                                "checkpoints": tmp / "ckpt"}
    settings.update(changes)
    return study_data(name, **settings)


def views_and_retrain(hpsearch: str, name: str, cwd: Path) -> tuple[dict[str, int], dict]:
    """A finished study read back through the command line as a user would: `status --json`
    (its counts), `report` (an offline page, checked for size) and `retrain` (its results)."""
    import json
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([hpsearch, *args], cwd=cwd, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    counts = json.loads(run("status", name, "--json").stdout)["counts"]
    run("report", name, "--out", "r.html")
    assert (cwd / "r.html").stat().st_size > 100_000
    run("retrain", name)
    return counts, json.loads((cwd / f"retrain-{name}" / "results.json").read_text())


def running_trials(db: Path) -> list[tuple[int, int, int | None]]:
    """(number, worker pid, last epoch reported) of each RUNNING trial, read straight from the
    SQLite file: a short read that never holds the workers up."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            rows = conn.execute(
                "SELECT t.number, a.value_json, (SELECT MAX(v.step) FROM "
                "trial_intermediate_values v WHERE v.trial_id = t.trial_id) FROM trials t "
                "JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'pid'"
            ).fetchall()
        except sqlite3.OperationalError:  # the tables are not there yet, or a writer holds it
            return []
    return [(number, json.loads(pid), last) for number, pid, last in rows]


def run_killing_a_worker(project: Path, ready: Callable[[int, int | None], bool], *,
                         env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """`hpsearch run study.yaml --workers 2 --gpus none` in `project` (an example copied with
    its SQLite storage), SIGKILLing the worker of the first RUNNING trial for which
    ``ready(number, last epoch reported)`` holds (it has a checkpoint and epochs still to
    train); (that trial's number, the run's exit code, what it printed)."""
    import pytest

    hpsearch = str(Path(sys.executable).with_name("hpsearch"))
    process = subprocess.Popen([hpsearch, "run", "study.yaml", "--workers", "2", "--gpus",
                                "none"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline, killed = time.monotonic() + 120, None
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            for number, pid, last in running_trials(project / "hpsearch.db"):
                if ready(number, last):
                    os.kill(pid, signal.SIGKILL)
                    killed = number
                    break
            time.sleep(0.05)
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if killed is None:
        pytest.fail(f"no trial was seen running with a checkpoint:\n{out}")
    return killed, process.returncode, out
