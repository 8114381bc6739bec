"""Search efficiency: hpsearch's shipped study against a hand-written Optuna loop and random search.

One invocation, FashionMNIST, the seed network (784-128-56-10), the same wall-clock budget for
each arm (`--budget-s`, default 600 s), each arm in a fresh process timed from its launch (so
each pays its own imports and data loading):

- ours: `hpsearch run studies/fashion_mlp.yaml` as shipped, except that the trial budget is
  lifted and `--timeout` is the budget, so it searches as long as the others;
- hand_loop: what one writes by hand: TPE + MedianPruner on lr log [1e-4, 1], batch
  {32..512}, momentum [0, 0.99] (SGD), weight decay {0, 1e-5, 1e-4, 1e-3}, optimizer {sgd,
  adam}, constant lr, 8 epochs, maximizing validation accuracy, in-memory storage. The training
  is `trainers.train` (the same data on tensors and the same loop), so only the search differs;
- random: the hand loop's space with random sampling and no pruning. Both loops are seeded 0,
  so they share their first 10 trials (TPE's random start-up): a paired comparison.

`--timeout` and Optuna's `timeout=` mean the same: start no trial after the budget. The best
trial of each arm (ours: lowest val loss, as the study chooses; the loops: highest val accuracy)
is then trained on train+validation and tested once, as `hpsearch retrain` does, for its
search's epochs. Time to 0.88 is when the first trial that reached validation accuracy 0.88 in
any epoch finished. Ends with `name: value` lines.

    .venv/bin/python benchmarks/search_efficiency.py [--budget-s 600] [--arms ours,hand_loop,random]

The optional arm `ours_cold` is ours without the file's enqueued config (what the search itself
finds); `ours_cold_packed` is the same with packed trials (`hpsearch run --pack auto`, or the
`--pack` given), so both run side by side. `--pack K|auto` runs the ours and ours_cold arms
with packed trials too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_VAL = 0.88
LOOP_EPOCHS = 8
ARMS = ("ours", "hand_loop", "random", "ours_cold", "ours_cold_packed")

# --------------------------------------------------------------------- the hand-written loops

def hand_loop_params(trial: Any) -> dict[str, Any]:
    """The hand loop's space, as one writes it with Optuna directly."""
    params: dict[str, Any] = {
        "optimizer": trial.suggest_categorical("optimizer", ["sgd", "adam"]),
        "lr": trial.suggest_float("lr", 1e-4, 1.0, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256, 512]),
        "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 1e-5, 1e-4, 1e-3]),
    }
    if params["optimizer"] == "sgd":
        params["momentum"] = trial.suggest_float("momentum", 0.0, 0.99)
    return params

def loop_config(params: dict[str, Any]) -> Any:
    from trainers import config_from_dict

    return config_from_dict({**params, "dataset": "fashion_mnist", "hidden": [128, 56],
                             "epochs": LOOP_EPOCHS})

def run_loop(kind: str, budget_s: float, result: Path) -> None:
    """One loop arm, in this (fresh) process; trial records to `result` as JSON lines."""
    import optuna

    import trainers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if kind == "hand_loop":
        sampler, pruner = optuna.samplers.TPESampler(seed=0), optuna.pruners.MedianPruner()
    else:
        sampler, pruner = optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    out = result.open("w")

    def objective(trial: optuna.Trial) -> float:
        params = hand_loop_params(trial)
        accs: list[float] = []

        def on_epoch(m: trainers.EpochMetrics) -> None:
            accs.append(m.val_accuracy)
            trial.report(m.val_accuracy, m.epoch)
            if trial.should_prune():
                raise trainers.StopTraining("pruned")

        run = trainers.train(loop_config(params), on_epoch)
        state = "COMPLETE" if run.status == "completed" else "PRUNED"
        out.write(json.dumps({"number": trial.number, "params": params, "state": state,
                              "epochs": run.epochs_run, "val_accuracy": accs,
                              "finished_at": time.time()}) + "\n")
        out.flush()
        if state != "COMPLETE":
            raise optuna.TrialPruned()
        return accs[-1]

    study.optimize(objective, timeout=budget_s)

# --------------------------------------------------------------------- running and reading arms

def launch(argv: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run `argv` to the end; return the wall-clock time of its launch."""
    started = time.time()
    with log.open("w") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent,
                              env=env).returncode
    if code != 0:
        raise SystemExit(f"{argv[:4]} failed with exit code {code}; see {log}")
    return started

def cold_study(path: Path) -> Path:
    """The shipped study without its enqueued config, under another name."""
    import yaml

    data = yaml.safe_load((ROOT / "studies" / "fashion_mlp.yaml").read_text())
    data.update(name=f"{data['name']}-cold", enqueue=[])
    path.write_text(yaml.safe_dump(data))
    return path

def run_ours(out: Path, budget_s: float, *, arm: str, pack: str | None = None
             ) -> dict[str, Any]:
    """hpsearch as a user runs it (`arm`: ours, ours_cold or ours_cold_packed); trial records
    read back from its storage."""
    import optuna

    from search.run import load, retrain
    from search.storage import open_storage

    cold = arm.startswith("ours_cold")
    if arm == "ours_cold_packed":
        pack = pack or "auto"
    study_file = cold_study(out / "cold.yaml") if cold else ROOT / "studies" / "fashion_mlp.yaml"
    url = f"sqlite:///{out / (arm + '.db')}"
    hpsearch = str(Path(sys.executable).with_name("hpsearch"))
    started = launch([hpsearch, "run", str(study_file), "--storage", url, "--timeout",
                      str(budget_s), "--trials", "100000",
                      *(["--pack", pack] if pack else [])], out / f"{arm}.log")
    searched = time.time() - started
    name = optuna.get_all_study_names(url)[0]
    study, spec = load(name, open_storage(url))
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED") or t.datetime_complete is None:
            continue
        history = t.user_attrs.get("history") or []
        trials.append({"number": t.number, "state": t.state.name,
                       "epochs": int(t.user_attrs.get("epochs_run", len(history))),
                       "val_accuracy": [h["val_accuracy"] for h in history],
                       "finished_at": t.datetime_complete.timestamp()})
    best = study.best_trial
    final = retrain(study, spec, out=out / f"retrain-{name}")
    return {"trials": trials, "started": started, "searched_s": searched,
            "best_val_accuracy": best.user_attrs["history"][-1]["val_accuracy"],
            "best_params": final["params"], "test": final, "epochs_per_trial": spec.budget.epochs}

def run_hand(kind: str, out: Path, budget_s: float) -> dict[str, Any]:
    from search.run import final_test

    result = out / f"{kind}.jsonl"
    started = launch([sys.executable, __file__, "--loop", kind, "--budget-s", str(budget_s),
                      "--result", str(result)], out / f"{kind}.log")
    searched = time.time() - started
    trials = [json.loads(line) for line in result.read_text().splitlines()]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if not complete:
        raise SystemExit(f"{kind}: no trial completed within {budget_s:g} s")
    best = max(complete, key=lambda t: (t["val_accuracy"][-1], -t["number"]))
    final = final_test(loop_config(best["params"]), out=out / f"retrain-{kind}")
    return {"trials": trials, "started": started, "searched_s": searched,
            "best_val_accuracy": best["val_accuracy"][-1], "best_params": best["params"],
            "test": final, "epochs_per_trial": LOOP_EPOCHS}

def time_to(arm: dict[str, Any], target: float) -> float | None:
    """Seconds from launch until the first trial that reached `target` finished."""
    hits = [t["finished_at"] for t in arm["trials"]
            if t["val_accuracy"] and max(t["val_accuracy"]) >= target]
    return min(hits) - arm["started"] if hits else None

# --------------------------------------------------------------------- report

def _fmt_time(seconds: float | None, unit: str = "") -> str:
    return "never" if seconds is None else f"{seconds:.1f}{unit}"

def report(arms: dict[str, dict[str, Any]], budget_s: float) -> None:
    print(f"\nsearch efficiency on FashionMNIST, seed MLP 784-128-56-10, {budget_s:g} s per arm "
          f"({dt.date.today()}, {os.cpu_count()} CPU cores)")
    print(f"{'arm':<16} {'trials':>6} {'epochs':>6} {'best val acc':>12} {'test acc':>9} "
          f"{'to val 0.88':>11}  best config")
    for name, arm in arms.items():
        finished = len(arm["trials"])
        epochs = sum(t["epochs"] for t in arm["trials"])
        print(f"{name:<16} {finished:>6} {epochs:>6} {arm['best_val_accuracy']:>12.4f} "
              f"{arm['test']['test_accuracy']['mean']:>9.4f} "
              f"{_fmt_time(time_to(arm, TARGET_VAL), 's'):>11}  {arm['best_params']}")
    print()
    print(f"budget_s: {budget_s:g}")
    for name, arm in arms.items():
        print(f"search_seconds_{name}: {arm['searched_s']:.1f}")
        print(f"trials_finished_{name}: {len(arm['trials'])}")
        print(f"epochs_trained_{name}: {sum(t['epochs'] for t in arm['trials'])}")
        print(f"best_val_accuracy_{name}: {arm['best_val_accuracy']:.4f}")
        print(f"test_accuracy_{name}: {arm['test']['test_accuracy']['mean']:.4f}")
        print(f"retrain_epochs_{name}: {arm['test']['epochs']}")
        print(f"time_to_088_{name}: {_fmt_time(time_to(arm, TARGET_VAL))}")
    if "ours" in arms and "hand_loop" in arms:
        ours, hand = time_to(arms["ours"], TARGET_VAL), time_to(arms["hand_loop"], TARGET_VAL)
        if ours is not None and hand is not None:
            ratio = f"{ours / hand:.3f}"
        else:
            ratio = "0 (hand loop never)" if ours is not None else ("inf" if hand else "n/a")
        print(f"time_to_088_ratio: {ratio}")
        test = arms["ours"]["test"]["test_accuracy"]["mean"]
        met = test >= 0.895 and ours is not None and (hand is None or ours <= 0.5 * hand)
        print(f"target_met: {'yes' if met else 'no'} (test >= 0.895 and time to 0.88 <= half "
              "the hand loop's)")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-clock seconds of search per arm (default 600)")
    parser.add_argument("--arms", default="ours,hand_loop,random",
                        help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--out", help="folder for the storages, logs and retrained models "
                                      "(default: a new temporary folder)")
    parser.add_argument("--pack", metavar="K|auto",
                        help="the ours arms with packed trials (`hpsearch run --pack`)")
    parser.add_argument("--loop", choices=("hand_loop", "random"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:  # a child process: one loop arm
        run_loop(args.loop, args.budget_s, Path(args.result))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: expected some of {', '.join(ARMS)}, got {', '.join(unknown)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="search-efficiency-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    packed = f"; ours with --pack {args.pack}" if args.pack else ""
    print(f"search efficiency: {', '.join(arms)}; {args.budget_s:g} s each{packed}; files in "
          f"{out}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        t0 = time.time()
        if arm.startswith("ours"):
            results[arm] = run_ours(out, args.budget_s, arm=arm, pack=args.pack)
        else:
            results[arm] = run_hand(arm, out, args.budget_s)
        r = results[arm]
        print(f"{arm}: {len(r['trials'])} trials in {r['searched_s']:.0f} s, best val accuracy "
              f"{r['best_val_accuracy']:.4f}, test {r['test']['test_accuracy']['mean']:.4f} "
              f"({time.time() - t0:.0f} s with the retrain)", flush=True)
    report(results, args.budget_s)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(math.isfinite(r["best_val_accuracy"]) for r in results.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
