"""Study files for the search tests: one builder, and the spaces the tests search.

Tests import it as `from tests.search_tests.studies import ...`; each test states only what its
study does differently.
"""

from __future__ import annotations

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
