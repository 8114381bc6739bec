"""What hpsearch adds per trial around a user's own training code, side by side in one run.

Two comparisons on SQLite, each round running both arms back to back (the order alternating):

- **function**: the same `fit(params, trial)` through `trainer: module:fit` (hpsearch's real
  worker loop: heartbeats, history, artifacts in a temporary store, the budget lock) and
  through a hand-written Optuna loop that calls it with a two-line adapter (report →
  `trial.report` + `should_prune`). `fit` sleeps `--sleep-ms` per epoch for `--epochs` epochs
  and reports a made-up loss; the time it spends in its own work is measured inside it, so
  per-trial wall time minus that is the overhead. Both prune with the same median rule.
- **command**: the same script through `trainer: {command: [...]}` and through a hand loop
  that runs it with `subprocess.run` and parses its report lines at the end, no pruning on
  either side. The script writes how long it ran (from its first line to its exit); per-trial
  wall time minus that is the overhead (process start-up counts as overhead on both sides).

    .venv/bin/python benchmarks/own_code_overhead.py [--trials 100] [--command-trials 30]
        [--rounds 3] [--epochs 3] [--sleep-ms 2]

Ends with `name: value` lines: function_overhead_ratio and command_overhead_ratio (hpsearch's
per-trial overhead over the hand loop's, median of the rounds; goal <= 1.1 each), and the
overheads in ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna

from search.run import create_or_load
from search.spec import parse_spec
from search.storage import budget_lock, open_artifact_store, open_storage, quiet_optuna_warnings
from search.trial import ArtifactRecorder
from search.workers import run_worker

SETTINGS = {"epochs": 3, "sleep_s": 0.002}
WORK = {"seconds": 0.0}  # the user's own work, summed inside fit

SCRIPT = '''
import json, os, sys, time
started = time.perf_counter()
lr, epochs, sleep_s = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for epoch in range(1, epochs + 1):
    time.sleep(sleep_s)
    loss = (__import__("math").log10(lr) + 2) ** 2 + 1.0 / epoch
    print("@hpsearch " + json.dumps({"epoch": epoch, "val_loss": loss}), flush=True)
with open(os.environ["BENCH_TIMES"], "a") as f:
    f.write(f"{time.perf_counter() - started}\\n")
'''


def fake_loss(lr: float, epoch: int) -> float:
    return (math.log10(lr) + 2) ** 2 + 1.0 / epoch


def fit(params: dict[str, Any], trial: Any) -> float:
    """The user's function: its own work is timed, the reports are not."""
    loss = math.inf
    for epoch in range(1, SETTINGS["epochs"] + 1):
        t0 = time.perf_counter()
        time.sleep(SETTINGS["sleep_s"])
        loss = fake_loss(params["lr"], epoch)
        WORK["seconds"] += time.perf_counter() - t0
        trial.report(epoch, val_loss=loss)
    return loss


SPACE = {"lr": {"low": 1e-4, "high": 1.0, "log": True}, "batch_size": {"pow2": [32, 1024]},
         "momentum": {"low": 0.8, "high": 0.99}}


def study_spec(name: str, n: int, tmp: Path, trainer: Any, pruner: dict) -> Any:
    return parse_spec({
        "name": name, "trainer": trainer, "budget": {"trials": n, "epochs": SETTINGS["epochs"]},
        "sampler": {"type": "tpe", "seed": 0}, "pruner": pruner, "space": SPACE,
        "run": {"checkpoint_dir": str(tmp / "ckpt")},
    })


def run_ours(url: str, spec: Any, tmp: Path) -> float:
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    study = create_or_load(spec, storage)
    location = str(tmp / f"artifacts-{spec.name}")
    artifacts = ArtifactRecorder(open_artifact_store(location), location=location)
    t0 = time.perf_counter()
    run_worker(study, spec, device="cpu", lock=budget_lock(url, spec.name), artifacts=artifacts)
    return time.perf_counter() - t0


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {"lr": trial.suggest_float("lr", 1e-4, 1.0, log=True),
            "batch_size": 2 ** trial.suggest_int("log2_batch_size", 5, 10),
            "momentum": trial.suggest_float("momentum", 0.8, 0.99)}


class Adapter:
    """What a hand loop writes to give `fit` a report that prunes."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def report(self, epoch: int, **metrics: float) -> None:
        self.trial.report(metrics["val_loss"], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned()


def run_hand_function(url: str, n: int, name: str) -> float:
    study = optuna.create_study(study_name=name, storage=url,
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5))
    t0 = time.perf_counter()
    study.optimize(lambda trial: fit(suggest(trial), Adapter(trial)), n_trials=n)
    return time.perf_counter() - t0


def run_hand_command(url: str, n: int, name: str, script: Path) -> float:
    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial)
        out = subprocess.run([sys.executable, str(script), str(params["lr"]),
                              str(SETTINGS["epochs"]), str(SETTINGS["sleep_s"])],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "HPSEARCH_PARAMS": json.dumps(params)})
        reports = [json.loads(line[len("@hpsearch "):]) for line in out.stdout.splitlines()
                   if line.startswith("@hpsearch ")]
        return reports[-1]["val_loss"]

    study = optuna.create_study(study_name=name, storage=url,
                                sampler=optuna.samplers.TPESampler(seed=0))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return time.perf_counter() - t0


def function_round(n: int, tmp: Path, ours_first: bool) -> tuple[float, float]:
    """Per-trial overhead (ms) of the hand loop and of hpsearch around the same function."""
    tag = uuid.uuid4().hex[:6]
    median = {"type": "median", "options": {"n_startup_trials": 5}}
    spec = study_spec(f"fn-ours-{tag}", n, tmp, "__main__:fit", median)
    arms = {"hand": lambda: run_hand_function(f"sqlite:///{tmp / f'hand-{tag}.db'}", n,
                                              f"fn-hand-{tag}"),
            "ours": lambda: run_ours(f"sqlite:///{tmp / f'ours-{tag}.db'}", spec, tmp)}
    overhead = {}
    for name in (["ours", "hand"] if ours_first else ["hand", "ours"]):
        WORK["seconds"] = 0.0
        wall = arms[name]()
        overhead[name] = (wall - WORK["seconds"]) / n * 1e3
    return overhead["hand"], overhead["ours"]


def command_round(n: int, tmp: Path, ours_first: bool) -> tuple[float, float]:
    """Per-trial overhead (ms) of the hand subprocess loop and of hpsearch's `command:`."""
    tag = uuid.uuid4().hex[:6]
    script = tmp / "script.py"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), "{lr}", "{epochs}", str(SETTINGS["sleep_s"])]
    spec = study_spec(f"cmd-ours-{tag}", n, tmp, {"command": command}, {"type": "none"})
    arms = {"hand": lambda: run_hand_command(f"sqlite:///{tmp / f'chand-{tag}.db'}", n,
                                             f"cmd-hand-{tag}", script),
            "ours": lambda: run_ours(f"sqlite:///{tmp / f'cours-{tag}.db'}", spec, tmp)}
    overhead = {}
    for name in (["ours", "hand"] if ours_first else ["hand", "ours"]):
        times = tmp / f"times-{tag}-{name}.txt"
        os.environ["BENCH_TIMES"] = str(times)
        wall = arms[name]()
        alive = sum(float(x) for x in times.read_text().split())
        overhead[name] = (wall - alive) / n * 1e3
    return overhead["hand"], overhead["ours"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="function trials per arm")
    parser.add_argument("--command-trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sleep-ms", type=float, default=2.0)
    args = parser.parse_args()
    SETTINGS.update(epochs=args.epochs, sleep_s=args.sleep_ms / 1e3)
    quiet_optuna_warnings()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-own-code-"))
    results: dict[str, float] = {}
    for kind, run, n in (("function", function_round, args.trials),
                         ("command", command_round, args.command_trials)):
        hands, ours, ratios = [], [], []
        for r in range(args.rounds):
            hand_ms, ours_ms = run(n, tmp, ours_first=r % 2 == 1)
            hands.append(hand_ms)
            ours.append(ours_ms)
            ratios.append(ours_ms / hand_ms)
            print(f"{kind:>8}, {n} trials, round {r + 1}/{args.rounds}: overhead per trial "
                  f"hand loop {hand_ms:.1f} ms, hpsearch {ours_ms:.1f} ms ({ratios[-1]:.3f})",
                  flush=True)
        results[f"{kind}_overhead_ms_hand"] = statistics.median(hands)
        results[f"{kind}_overhead_ms_ours"] = statistics.median(ours)
        results[f"{kind}_overhead_ratio"] = statistics.median(ratios)
    print(f"# SQLite; median of {args.rounds} round(s), each running both arms back to back")
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if "ratio" in key else f"{key}: {value:.1f}")


if __name__ == "__main__":
    main()
