"""What logging a study's trials to MLflow or TensorBoard costs a trial, against no tracking.

The quick start's study (`studies/fashion_mlp.yaml`: FashionMNIST, the seed MLP, TPE seeded)
cut to `--trials` trials of `--epochs` epochs without pruning, so every arm trains the same
configs, run by `search.tune` (one worker, in a fresh process per run) three ways, the arms
alternating over `--rounds` rounds:

- **none**: no `tracking:`;
- **mlflow**: `tracking: {mlflow: ...}` to a real `mlflow server` (SQLite backend) started here
  on loopback: a parent run and a nested run per trial with every metric per epoch;
- **tensorboard**: `tracking: {tensorboard: DIR}`: an event folder per trial.

A tracked trial pays for its tracking twice at most: the worker reads the told trial back
before the next one starts (timed), and the tracker's thread logs it beside the training, on
the same cores (its CPU time, `time.thread_time`, counted whole, as if it took it all from the
trial). Their sum per trial, over the arm's own mean trial time, is the share reported. Once
per worker, the thread also imports the tracker's package and finds MLflow's parent run: that
CPU time is reported apart (`<arm>_start_s_per_worker`). The study's wall time against the
untracked arm of the same round is printed too, as context: on a 2-core machine it moves by
more than the costs above from run to run.

    .venv/bin/python benchmarks/tracking_overhead.py [--trials 10] [--epochs 4] [--rounds 3]

Ends with `name: value` lines: `<arm>_added_ms_per_trial`, `<arm>_share_of_trial` (medians of
the rounds; goal: share <= 0.05 each), `<arm>_start_s_per_worker` and `<arm>_study_ratio`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.servers import mlflow_server  # noqa: E402 - the test suite's, from the root

ARMS = ("none", "mlflow", "tensorboard")


def study_of(name: str, trials: int, epochs: int, tracking: dict | None) -> dict:
    study = yaml.safe_load((ROOT / "studies" / "fashion_mlp.yaml").read_text())
    study.update(name=name, budget={"trials": trials, "epochs": epochs},
                 pruner={"type": "none"})
    if tracking is not None:
        study["tracking"] = tracking
    return study


def one_run(args: argparse.Namespace) -> None:
    """One arm, in this process: the study's wall time, its mean trial time and what the
    tracker cost, as one JSON line."""
    import search
    from search.tracking import Tracker

    spent = {"sync": 0.0, "per_trial_cpu": 0.0, "start_cpu": 0.0}
    told, log_to, start = Tracker.trial_ended, Tracker._log_to, Tracker._start

    def trial_ended(self, trial):  # the worker waits for this one
        started = time.perf_counter()
        told(self, trial)
        spent["sync"] += time.perf_counter() - started

    def timed(method, key):  # the tracker's thread: its CPU time in `method`
        def run(self, *a):
            started = time.thread_time()
            method(self, *a)
            spent[key] += time.thread_time() - started
        return run

    Tracker.trial_ended = trial_ended
    Tracker._log_to = timed(log_to, "per_trial_cpu")
    Tracker._start = timed(start, "start_cpu")
    tracking = json.loads(args.tracking) or None  # "" for none
    started = time.monotonic()
    results = search.tune(study_of(args.name, args.trials, args.epochs, tracking),
                          storage=args.storage, gpus="none", show_progress=False)
    wall = time.monotonic() - started
    for thread in threading.enumerate():  # the tracker's last trial logged (closed already)
        if thread.name == "hpsearch-tracking":
            thread.join()
    trials = optuna.load_study(study_name=args.name, storage=args.storage).trials
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    print(json.dumps({"wall": wall, "trial": statistics.fmean(seconds), "trials": len(trials),
                      "complete": results.counts["complete"], **spent}), flush=True)


def run_arm(folder: Path, arm: str, name: str, args: argparse.Namespace, uri: str) -> dict:
    tracking = {"none": None, "mlflow": {"mlflow": {"uri": uri}},
                "tensorboard": {"tensorboard": str(folder / "tb")}}[arm]
    command = [sys.executable, __file__, "--one", name, "--storage",
               f"sqlite:///{folder / 'bench.db'}", "--trials", str(args.trials),
               "--epochs", str(args.epochs), "--tracking", json.dumps(tracking or "")]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0 or "not logged" in done.stderr:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a study's name: run one arm here
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--tracking", help=argparse.SUPPRESS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.one:
        args.name = args.one
        return one_run(args)
    share: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    added: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    ratio: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    fixed: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(Path(tmp)) as uri:
        folder = Path(tmp)
        # The data's first load (and its cache) and the imports' first run: untimed.
        run_arm(folder, "none", "warm-up", argparse.Namespace(trials=1, epochs=1), uri)
        for r in range(args.rounds):
            order = ARMS if r % 2 == 0 else tuple(reversed(ARMS))  # alternated
            runs = {arm: run_arm(folder, arm, f"{arm}-{r}", args, uri) for arm in order}
            for arm in ARMS[1:]:
                run = runs[arm]
                per_trial = (run["sync"] + run["per_trial_cpu"]) / run["trials"]
                fixed[arm].append(run["start_cpu"])
                added[arm].append(per_trial)
                share[arm].append(per_trial / run["trial"])
                ratio[arm].append(run["wall"] / runs["none"]["wall"])
            print(f"round {r + 1}: " + ", ".join(
                f"{arm} {runs[arm]['wall']:.1f} s (trial {runs[arm]['trial']:.2f} s, tracker "
                f"{(runs[arm]['sync'] + runs[arm]['per_trial_cpu']) * 1000:.0f} ms + start "
                f"{runs[arm]['start_cpu'] * 1000:.0f} ms)"
                for arm in ARMS), flush=True)

    for arm in ARMS[1:]:
        print(f"{arm}: {statistics.median(added[arm]) * 1000:.1f} ms per trial (range "
              f"{min(added[arm]) * 1000:.1f} .. {max(added[arm]) * 1000:.1f}), "
              f"{statistics.median(share[arm]):.2%} of a trial (range {min(share[arm]):.2%} .. "
              f"{max(share[arm]):.2%}); once per worker {statistics.median(fixed[arm]):.2f} s "
              f"CPU; study wall ratio {statistics.median(ratio[arm]):.3f} "
              f"(range {min(ratio[arm]):.3f} .. {max(ratio[arm]):.3f})")
    for arm in ARMS[1:]:
        print(f"{arm}_added_ms_per_trial: {statistics.median(added[arm]) * 1000:.1f}")
        print(f"{arm}_share_of_trial: {statistics.median(share[arm]):.4f}")
        print(f"{arm}_start_s_per_worker: {statistics.median(fixed[arm]):.2f}")
        print(f"{arm}_study_ratio: {statistics.median(ratio[arm]):.3f}")


if __name__ == "__main__":
    main()
