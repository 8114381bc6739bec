"""Search efficiency on equal ground: hpsearch's shipped search against a hand-written Optuna loop,
Ray Tune and random search, the same space, epochs, objective, clock and cores, several seeds.

Every arm searches the shipped `studies/fashion_mlp.yaml` space without its `enqueue` (sampled by
hpsearch's own `suggest`, so the distributions are the same), trains each trial with
`trainers.train` on the config hpsearch maps the params to (784-128-56-10, 15 epochs, the same
data split and init seed), and minimizes the last epoch's validation loss:

1. hpsearch: `hpsearch run --pack auto` on that study, as shipped (its sampler and pruner), the
   sampler seeded with the arm's seed, the trial budget lifted;
2. optuna: `study.optimize` with TPESampler(seed) and MedianPruner around `trainers.train`;
3. ray: Ray Tune, OptunaSearch (TPE, seed) as searcher and ASHA (rungs at 1, 3, 9 epochs) as
   scheduler, one CPU per trial (Tune's default);
4. random: RandomSampler(seed), no pruning;
5. hpsearch_alone (not in the default arms): hpsearch with `--pack 1`, one trial at a time, for
   what packing changes in a search of the same seed.

Each arm runs alone on the machine, in a fresh process group launched by this script, so it pays
its own imports and data loading. The clock is a wall: at launch + `--budget-s` the group gets
SIGINT (SIGKILL 15 s later), and only trials that finished by then count (a trial cut there is
not one). The best finished trial (lowest final val loss among completed ones) is trained on
train+val and tested once (`search.run.final_test`), the same for every arm. Time to 0.88: from
launch until the first finished trial that reached validation accuracy 0.88 in any epoch ended.
Only the searcher's seed varies between seeds; the arms' order rotates from seed to seed.

    .venv/bin/python benchmarks/search_efficiency.py [--arms hpsearch,optuna,ray,random]
        [--seeds 3] [--budget-s 600] [--out DIR] [--epochs N (a dry run)]

With `--out` a folder of an earlier run, the arms and seeds recorded in its runs.json are not
run again: the table is resumed (a 600-s table of 4 arms and 3 seeds is about 2 h 10 min).

Prints `run arm=… seed=… test_acc=… time_to_088_s=… trials=… epochs=…` per arm and seed, then
`summary arm=… runs=n mean_test_acc=… sd=… mean_time_to_088_s=… reached=k/n` per arm (an arm that
never reached 0.88 in a seed counts the whole budget there, and `reached` says how often it did).
An arm whose process fails before the wall prints `error arm=… seed=…` and is not a figure: a
resume with the same `--out` runs it again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STUDY = ROOT / "studies" / "fashion_mlp.yaml"
TARGET_VAL = 0.88
ARMS = ("hpsearch", "optuna", "ray", "random", "hpsearch_alone")
DEFAULT_ARMS = ARMS[:4]
GRACE_S = 15.0  # after SIGINT at the wall, before SIGKILL


# --------------------------------------------------------------------- the space, shared

EPOCHS_ENV = "SEARCH_EFFICIENCY_EPOCHS"  # --epochs, passed on to the child arms


def cold_spec(seed: int) -> Any:
    """The shipped study without its enqueued config, its sampler seeded with `seed` (and its
    epochs those of `--epochs`, for a dry run)."""
    import yaml

    from search.spec import parse_spec

    data = yaml.safe_load(STUDY.read_text())
    data.update(name=f"{data['name']}-cold-{seed}", enqueue=[])
    if os.environ.get(EPOCHS_ENV):
        data["budget"] = {**data["budget"], "epochs": int(os.environ[EPOCHS_ENV])}
    data["sampler"] = {**data.get("sampler", {}), "seed": seed}
    return data, parse_spec(data, source=f"{STUDY} without its enqueue")


def trial_config(trial: Any, spec: Any) -> tuple[dict[str, Any], Any]:
    """The params of `trial` drawn from the study's space, and the trainer config of them."""
    from search.spec import suggest, train_config_for

    params = suggest(trial, spec, user_attrs={})
    return params, train_config_for(spec, params)


class Recorder:
    """Trial records of a child arm, a JSON line each, appended as the trial ends (the file
    opened for each: Ray pickles its callbacks, and an open file does not pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "finished_at": time.time()}) + "\n")


# --------------------------------------------------------------------- the peer arms (children)

def run_optuna(kind: str, seed: int, result: Path) -> None:
    """The hand-written loop (`optuna`) or random search (`random`), until it is stopped."""
    import optuna

    import trainers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, spec = cold_spec(seed)
    if kind == "optuna":
        sampler, pruner = optuna.samplers.TPESampler(seed=seed), optuna.pruners.MedianPruner()
    else:
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    out = Recorder(result)

    def objective(trial: optuna.Trial) -> float:
        params, config = trial_config(trial, spec)
        accuracies: list[float] = []

        def on_epoch(m: trainers.EpochMetrics) -> None:
            accuracies.append(m.val_accuracy)
            trial.report(m.val_loss, m.epoch)
            if trial.should_prune():
                raise trainers.StopTraining("pruned")

        run = trainers.train(config, on_epoch)
        done = run.status == "completed"
        out.write(number=trial.number, params=params, state="COMPLETE" if done else "PRUNED",
                  epochs=run.epochs_run, val_accuracy=accuracies,
                  val_loss=run.history[-1].val_loss if run.history else None)
        if not done:  # pruned, or diverged: a bad region, as hpsearch counts it
            raise optuna.TrialPruned()
        return run.history[-1].val_loss

    study.optimize(objective)


class DefineByRun:
    """Ray's OptunaSearch space: the study's params drawn by hpsearch's `suggest` (a class of
    the module, not a closure: Ray pickles its searcher with the standard pickle)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, trial: Any) -> dict[str, Any]:
        params, _ = trial_config(trial, cold_spec(self.seed)[1])
        return {"params": params}


def run_ray(seed: int, result: Path, deadline: float) -> None:
    """Ray Tune with OptunaSearch (TPE) and ASHA, until the deadline (Tune's time budget)."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    _, spec = cold_spec(seed)
    epochs = spec.budget.epochs
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)

    def trainable(config: dict[str, Any]) -> None:
        import trainers
        from search.spec import train_config_for

        best = 0.0

        def on_epoch(m: trainers.EpochMetrics) -> None:
            nonlocal best
            best = max(best, m.val_accuracy)
            tune.report({"val_loss": m.val_loss, "val_accuracy": m.val_accuracy,
                         "max_val_accuracy": best, "epochs_run": m.epoch})

        run = trainers.train(train_config_for(spec, config["params"]).replace(threads=1),
                             on_epoch)
        if run.status == "diverged":  # a bad region, as the other arms count it: TPE and ASHA
            # are told so (a trial that diverged in its first epoch reported nothing at all,
            # and Tune stops the whole run on a result without its metric)
            tune.report({"val_loss": float("inf"), "val_accuracy": 0.0,
                         "max_val_accuracy": best, "epochs_run": run.epochs_run,
                         "diverged": 1})

    class Record(tune.Callback):
        def __init__(self) -> None:
            self.out = Recorder(result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any
                              ) -> None:
            last = trial.last_result or {}
            ran = last.get("epochs_run", last.get("training_iteration", 0))
            done = ran >= epochs and not last.get("diverged")
            self.out.write(number=trial.trial_id, params=trial.config.get("params"),
                           state="COMPLETE" if done else "PRUNED", epochs=ran,
                           val_accuracy=[last.get("max_val_accuracy", 0.0)],
                           val_loss=last.get("val_loss"))

    searcher = OptunaSearch(DefineByRun(seed), metric="val_loss", mode="min",
                            sampler=optuna.samplers.TPESampler(seed=seed))
    scheduler = ASHAScheduler(max_t=epochs, grace_period=1, reduction_factor=3)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric="val_loss",
                                    mode="min", num_samples=-1,
                                    time_budget_s=max(1.0, deadline - time.time())),
        run_config=tune.RunConfig(storage_path=str(result.parent / "ray"), verbose=0,
                                  callbacks=[Record()]))
    tuner.fit()


# --------------------------------------------------------------------- running an arm

class ArmFailed(Exception):
    """An arm's process failed before the wall: its run is not a figure."""


def launch(argv: list[str], log: Path, budget_s: float, env: dict[str, str] | None = None
           ) -> tuple[float, float]:
    """Run `argv` in its own process group until it ends or the wall (launch + `budget_s`),
    where the group gets SIGINT, then SIGKILL; its launch time and the wall. ArmFailed when it
    exited with an error before the wall."""
    started = time.time()
    wall = started + budget_s
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent,
                                env=env, start_new_session=True)
        failed = None
        try:
            if proc.wait(timeout=max(0.0, wall - time.time())) != 0:
                failed = (f"exited {proc.returncode} after {time.time() - started:.0f} s, "
                          f"before the wall; see {log}")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left (Ray's workers)
        except ProcessLookupError:
            pass
        proc.wait()
    if failed:
        raise ArmFailed(failed)
    return started, wall


def hpsearch_trials(arm: str, out: Path, seed: int, budget_s: float
                    ) -> tuple[float, float, list, Any]:
    """hpsearch's arms: `hpsearch run` on the cold study, packed (`hpsearch`) or one trial at
    a time (`hpsearch_alone`); its finished trials as records."""
    import optuna
    import yaml

    from search.spec import params_from_optuna

    data, spec = cold_spec(seed)
    study_file = out / f"{arm}-{seed}.yaml"
    study_file.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{out / f'{arm}-{seed}.db'}"
    hpsearch = str(Path(sys.executable).with_name("hpsearch"))
    pack = "auto" if arm == "hpsearch" else "1"
    started, wall = launch([hpsearch, "run", str(study_file), "--storage", url, "--timeout",
                            str(budget_s), "--trials", "100000", "--pack", pack],
                           out / f"{arm}-{seed}.log", budget_s)
    study = optuna.load_study(study_name=data["name"], storage=url)
    records = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED") or t.datetime_complete is None:
            continue
        history = t.user_attrs.get("history") or []
        records.append({"number": t.number, "state": t.state.name,
                        "params": params_from_optuna(spec, t.params),
                        "epochs": int(t.user_attrs.get("epochs_run", len(history))),
                        "val_accuracy": [h["val_accuracy"] for h in history],
                        "val_loss": t.value if t.state.name == "COMPLETE" else None,
                        "finished_at": t.datetime_complete.timestamp()})
    return started, wall, records, spec


def run_arm(arm: str, seed: int, out: Path, budget_s: float) -> dict[str, Any]:
    """One arm and seed: search to the wall, retrain the best, test once."""
    from search.run import final_test
    from search.spec import train_config_for

    if arm.startswith("hpsearch"):
        started, wall, records, spec = hpsearch_trials(arm, out, seed, budget_s)
    else:
        _, spec = cold_spec(seed)
        result = out / f"{arm}-{seed}.jsonl"
        result.unlink(missing_ok=True)
        deadline = time.time() + budget_s
        started, wall = launch([sys.executable, __file__, "--child", arm, "--seeds", str(seed),
                                "--deadline", str(deadline), "--result", str(result)],
                               out / f"{arm}-{seed}.log", budget_s)
        records = ([json.loads(line) for line in result.read_text().splitlines()]
                   if result.exists() else [])
    finished = [r for r in records if r["finished_at"] <= wall]
    complete = [r for r in finished if r["state"] == "COMPLETE" and r["val_loss"] is not None]
    if not complete:
        raise ArmFailed(f"{arm} seed {seed}: no trial completed within {budget_s:g} s; "
                        f"see {out}")
    best = min(complete, key=lambda r: (r["val_loss"], r["finished_at"]))
    config = train_config_for(spec, best["params"])  # as `hpsearch retrain` maps them
    test = final_test(config, out=out / f"retrain-{arm}-{seed}")
    hits = [r["finished_at"] for r in finished
            if r["val_accuracy"] and max(r["val_accuracy"]) >= TARGET_VAL]
    return {"arm": arm, "seed": seed, "test_acc": test["test_accuracy"]["mean"],
            "time_to_088_s": min(hits) - started if hits else None,
            "trials": len(finished), "epochs": sum(r["epochs"] for r in finished),
            "best_val_loss": best["val_loss"], "best_config": config.to_dict()}


# --------------------------------------------------------------------- report

def _num(value: float | None, digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f}"


def run_line(r: dict[str, Any]) -> str:
    return (f"run arm={r['arm']} seed={r['seed']} test_acc={r['test_acc']:.4f} "
            f"time_to_088_s={_num(r['time_to_088_s'])} trials={r['trials']} "
            f"epochs={r['epochs']}")


def summary(runs: list[dict[str, Any]], arms: list[str], budget_s: float) -> None:
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        accs = [r["test_acc"] for r in mine]
        times = [r["time_to_088_s"] if r["time_to_088_s"] is not None else budget_s
                 for r in mine]
        reached = sum(r["time_to_088_s"] is not None for r in mine)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"summary arm={arm} runs={len(mine)} "
              f"mean_test_acc={statistics.mean(accs):.4f} sd={sd:.4f} "
              f"mean_time_to_088_s={statistics.mean(times):.1f} reached={reached}/{len(mine)} "
              f"mean_trials={statistics.mean(r['trials'] for r in mine):.1f} "
              f"mean_epochs={statistics.mean(r['epochs'] for r in mine):.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3, help="searcher seeds 0 … N-1")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-clock seconds of search per arm and seed (default 600)")
    parser.add_argument("--epochs", type=int, help="epochs per trial, for a dry run of the "
                        "script (default: the study's 15, which every figure uses)")
    parser.add_argument("--out", help="folder for storages, logs and retrained models "
                                      "(default: a new temporary folder); an earlier run's "
                                      "folder resumes it")
    parser.add_argument("--child", choices=("optuna", "random", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "ray":  # a child process: one peer arm, `--seeds` is its seed
        run_ray(args.seeds, Path(args.result), args.deadline)
        return 0
    if args.child:
        run_optuna(args.child, args.seeds, Path(args.result))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: expected some of {', '.join(ARMS)}, got {args.arms!r}")
    if args.seeds < 1 or args.budget_s <= 0 or (args.epochs is not None and args.epochs < 1):
        parser.error("--seeds and --epochs must be at least 1 and --budget-s above 0")
    if args.epochs:
        os.environ[EPOCHS_ENV] = str(args.epochs)
    out = Path(args.out or tempfile.mkdtemp(prefix="search-efficiency-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(f"search efficiency: {', '.join(arms)}; seeds 0-{args.seeds - 1}; "
          f"{args.budget_s:g} s per arm and seed; {os.cpu_count()} CPU cores; files in {out}",
          flush=True)
    record = out / "runs.json"
    # `--out` of an earlier run: the arms and seeds it finished stand (the table spans sessions)
    runs = json.loads(record.read_text()) if record.exists() else []
    for r in runs:
        print(f"{run_line(r)} (from {record})", flush=True)
    for seed in range(args.seeds):
        order = arms[seed % len(arms):] + arms[:seed % len(arms)]  # rotates between seeds
        for arm in order:
            if any(r["arm"] == arm and r["seed"] == seed for r in runs):
                continue
            try:
                r = run_arm(arm, seed, out, args.budget_s)
            except ArmFailed as e:  # not a figure: said, left out, run again by a resume
                print(f"error arm={arm} seed={seed}: {e}", flush=True)
                continue
            runs.append(r)
            print(run_line(r), flush=True)
            record.write_text(json.dumps(runs, indent=1, default=str))
    summary(runs, arms, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
