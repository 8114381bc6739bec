"""What hpsearch adds per trial around a trial of 2 processes, against a hand torchrun loop.

The same user code in every arm (`train` below): a small MLP under DistributedDataParallel on
2 gloo ranks, on seeded synthetic tensors (each rank its half of every global batch), the
mean training loss all-reduced and reported once an epoch. OMP_NUM_THREADS=1 everywhere (2
ranks on a 2-core machine). Arms, one trial at a time, SQLite, no pruning:

- **hand**: what a user writes without hpsearch, run as its own Python process: an Optuna
  ask/tell loop (TPE, seed 0) that launches ``python -m torch.distributed.run
  --nproc-per-node 2 --master-port <free> this_file.py rank <lr> <momentum> <epochs>`` per
  trial, reads rank 0's report lines as they come (``trial.report`` and ``should_prune``) and
  tells the last loss.
- **ours**: ``hpsearch run study.yaml --storage sqlite:///... --workers 1`` with
  ``resources: {processes: 2}`` and ``trainer: multiprocess_overhead:fit``: hpsearch starts the
  2 ranks and `fit` calls `train` with ``trial.report``.
- **command** (``--arms`` adds it): the same torchrun line as the hand loop's, as
  ``trainer: {command: [..., "{nproc}", --master-port, "{master_port}", ...]}``.

Each round runs every arm once, in an order that rotates from round to round; an arm's
per-trial time is its process's wall time (start to exit, interpreter start-up included) over
the trials it ran (a torchrun trial whose rank died at exit after its last report is told FAIL
by the hand loop and run again by hpsearch: each run costs the same work). Rank 0 marks when
`train` is entered (group ready), each report and its end; with the storage's trial start
(ask) and end (tell) those give each arm's phases: start (ask to `train`), first report (ask
to the first report's return), training (reports included), end (`train`'s return to tell),
between trials, and outside any trial (start-up and exit of the loop's process).

    .venv/bin/python benchmarks/multiprocess_overhead.py [--rounds 5] [--trials 6]
        [--epochs 4] [--arms hand,ours]

Ends with `name: value` lines: multiprocess_overhead_ratio (ours / hand, the median of the
per-round ratios of per-trial time; goal <= 1.1) and its range, command_overhead_ratio the
same for the command arm, and each arm's median seconds a trial.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
MARKS_ENV = "BENCH_MARKS"
SPACE = {"lr": (1e-3, 0.3), "momentum": (0.5, 0.95)}
DATA = {"samples": 16384, "features": 64, "hidden": 256, "classes": 10, "batch": 256}


# ------------------------------------------------------------------ the user's code, every arm


def mark(event: str) -> None:
    """Rank 0 notes when `event` happened (wall clock, to compare with the storage's times)."""
    path = os.environ.get(MARKS_ENV)
    if path and os.environ.get("RANK") == "0":
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time()}) + "\n")


def train(lr: float, momentum: float, epochs: int, report: Any) -> float:
    """Rank `dist.get_rank()`'s part of a data-parallel run; the last epoch's mean loss.
    The default process group is initialized by the caller (torchrun's script, hpsearch)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    mark("train")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(DATA["samples"], DATA["features"])
    y = (x @ torch.randn(DATA["features"], DATA["classes"])).argmax(1)
    model = DistributedDataParallel(nn.Sequential(
        nn.Linear(DATA["features"], DATA["hidden"]), nn.ReLU(),
        nn.Linear(DATA["hidden"], DATA["hidden"]), nn.ReLU(),
        nn.Linear(DATA["hidden"], DATA["classes"])))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = torch.Generator().manual_seed(1)
    loss = float("nan")
    for epoch in range(1, epochs + 1):
        total = torch.zeros(1, dtype=torch.float64)
        for batch in torch.randperm(len(x), generator=order).split(DATA["batch"]):
            mine = batch[rank::world]  # this rank's half of the global batch
            step = nn.functional.cross_entropy(model(x[mine]), y[mine])
            optimizer.zero_grad()
            step.backward()  # DDP averages the gradients over the ranks
            optimizer.step()
            total += step.detach().double() * len(mine)
        dist.all_reduce(total)
        loss = total.item() / len(x)
        report(epoch, loss)
        mark("report")
    mark("done")
    return loss


def fit(params: dict[str, Any], trial: Any) -> float:
    """hpsearch's ``trainer: multiprocess_overhead:fit``, in each of the trial's ranks."""
    return train(params["lr"], params["momentum"], trial.epochs,
                 lambda epoch, loss: trial.report(epoch, loss=loss))


def rank_script(lr: str, momentum: str, epochs: str) -> None:
    """This file under torchrun (hand loop, command trainer): rank 0 prints report lines."""
    import torch.distributed as dist

    dist.init_process_group("gloo")

    def report(epoch: int, loss: float) -> None:
        if dist.get_rank() == 0:
            print("@hpsearch " + json.dumps({"epoch": epoch, "loss": loss}), flush=True)

    train(float(lr), float(momentum), int(epochs), report)
    dist.destroy_process_group()
    sys.stdout.flush()  # DDP's gloo threads can abort the interpreter's exit (pytorch#190489)
    os._exit(0)


# ------------------------------------------------------------------ the hand loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hand_loop(url: str, name: str, trials: int, epochs: int) -> None:
    """What a user writes without hpsearch: ask, torchrun, report each line, tell."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=name, storage=url,
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.NopPruner())
    for _ in range(trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", *SPACE["lr"], log=True)
        momentum = trial.suggest_float("momentum", *SPACE["momentum"])
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", str(free_port()), str(HERE), "rank", str(lr),
                   str(momentum), str(epochs)]
        last = None
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("@hpsearch "):
                    record = json.loads(line[len("@hpsearch "):])
                    last = record["loss"]
                    trial.report(last, record["epoch"])
                    if trial.should_prune():
                        raise AssertionError("NopPruner pruned")
        if proc.returncode != 0 or last is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, last)


# ------------------------------------------------------------------ the arms, timed


def study_file(path: Path, name: str, trials: int, epochs: int, trainer: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": name, "trainer": trainer, "objective": {"metric": "loss"},
        "budget": {"trials": trials, "epochs": epochs}, "sampler": {"type": "tpe", "seed": 0},
        "pruner": {"type": "none"}, "resources": {"processes": 2},
        "space": {"lr": {"low": SPACE["lr"][0], "high": SPACE["lr"][1], "log": True},
                  "momentum": {"low": SPACE["momentum"][0], "high": SPACE["momentum"][1]}},
        "run": {"checkpoint_dir": str(path.parent / "ckpt")},
    }, sort_keys=False))


def arm_command(arm: str, folder: Path, name: str, url: str, trials: int,
                epochs: int) -> list[str]:
    """The process an arm runs, its study written where it needs one."""
    if arm == "hand":
        return [sys.executable, str(HERE), "hand-loop", url, name, str(trials), str(epochs)]
    trainer: Any = "multiprocess_overhead:fit"
    if arm == "command":
        trainer = {"command": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                               "{nproc}", "--master-port", "{master_port}", str(HERE), "rank",
                               "{lr}", "{momentum}", "{epochs}"]}
    study_file(folder / f"{name}.yaml", name, trials, epochs, trainer)
    return [HPSEARCH, "run", f"{name}.yaml", "--storage", url, "--workers", "1"]


def run_arm(arm: str, tmp: Path, trials: int, epochs: int) -> dict[str, float]:
    """One arm's run: wall time, per trial, and its phases (seconds a trial)."""
    name = f"mp-{arm}-{uuid.uuid4().hex[:6]}"
    folder = tmp / name
    folder.mkdir()
    url = f"sqlite:///{folder / 'study.db'}"
    marks = folder / "marks.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARKS_ENV: str(marks),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    command = arm_command(arm, folder, name, url, trials, epochs)
    t0 = time.time()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.time() - t0  # the loop's whole process: start-up and exit included
    if done.returncode != 0:
        raise SystemExit(f"{arm} arm failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return {"wall": wall, **phases(url, name, marks, wall)}


def phases(url: str, name: str, marks: Path, wall: float) -> dict[str, float]:
    """Seconds a trial in all (`per_trial`) and in each phase, from the storage's start and
    end times and rank 0's marks, over the trials run: a failed trial (torchrun's rank dying
    at its exit, after its last report) is run again by hpsearch to fill the budget, where
    the hand loop counts it; `failed`: how many."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ran = sorted(optuna.load_study(study_name=name, storage=url).trials,
                 key=lambda t: t.datetime_start)
    events = [json.loads(line) for line in marks.read_text().splitlines()]
    starts = [e["t"] for e in events if e["event"] == "train"]
    firsts = [events[i + 1]["t"] for i, e in enumerate(events) if e["event"] == "train"]
    ends = [e["t"] for e in events if e["event"] == "done"]
    if not len(ran) == len(starts) == len(firsts) == len(ends):
        raise SystemExit(f"{name}: {len(ran)} trials stored, {len(starts)} started and "
                         f"{len(ends)} ended training")
    asked = [t.datetime_start.timestamp() for t in ran]
    told = [t.datetime_complete.timestamp() for t in ran]
    trials = len(ran)
    return {
        "per_trial": wall / trials, "failed": sum(t.state.name != "COMPLETE" for t in ran),
        "start": sum(s - a for a, s in zip(asked, starts, strict=True)) / trials,
        "first_report": sum(f - a for a, f in zip(asked, firsts, strict=True)) / trials,
        "training": sum(e - s for s, e in zip(starts, ends, strict=True)) / trials,
        "end": sum(t - e for e, t in zip(ends, told, strict=True)) / trials,
        "between": sum(a - t for t, a in zip(told, asked[1:], strict=False)) / trials,
        "outside": (wall - (told[-1] - asked[0])) / trials,
    }


PHASES = ("start", "first_report", "training", "end", "between", "outside")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def ratios(runs: dict[str, list[dict[str, float]]], arm: str) -> list[float]:
    """Per round: the arm's seconds a trial over the hand loop's."""
    return [a["per_trial"] / h["per_trial"] for a, h in zip(runs[arm], runs["hand"], strict=True)]


def show_round(r: int, rounds: int, order: list[str], runs: dict[str, list[dict[str, float]]]
               ) -> None:
    times = ", ".join(f"{arm} {runs[arm][-1]['per_trial']:.2f}" for arm in runs)
    against = "".join(f"; {arm}/hand {ratios(runs, arm)[-1]:.3f}" for arm in runs
                      if arm != "hand")
    failed = "".join(f"; {arm}: {int(runs[arm][-1]['failed'])} trial(s) not COMPLETE"
                     for arm in runs if runs[arm][-1]["failed"])
    print(f"round {r + 1}/{rounds} ({', '.join(order)}): s/trial {times}{against}{failed}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=6, help="trials per arm and round")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--arms", default="hand,ours", help="hand and any of ours, command")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if "hand" not in arms or not set(arms) <= {"hand", "ours", "command"} or len(arms) < 2:
        parser.error(f"--arms: hand and any of ours, command, got {args.arms!r}")
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-multiprocess-"))
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]  # each arm first in turn
        for arm in order:
            runs[arm].append(run_arm(arm, tmp, args.trials, args.epochs))
        show_round(r, args.rounds, order, runs)
    print(f"# {args.trials} trials of 2 gloo ranks x {args.epochs} epochs per arm and round; "
          f"seconds a trial, median (range) of {args.rounds} rounds")
    for arm in arms:
        print(f"# {arm:>7}: total {spread([x['per_trial'] for x in runs[arm]])}; "
              + ", ".join(f"{p} {spread([x[p] for x in runs[arm]])}" for p in PHASES))
    for arm in arms:
        seconds = [x["per_trial"] for x in runs[arm]]
        print(f"seconds_per_trial_{arm}: {statistics.median(seconds):.3f}")
    for arm in [a for a in arms if a != "hand"]:
        key = "multiprocess_overhead_ratio" if arm == "ours" else f"{arm}_overhead_ratio"
        print(f"{key}_range: {min(ratios(runs, arm)):.3f}-{max(ratios(runs, arm)):.3f}")
        print(f"{key}: {statistics.median(ratios(runs, arm)):.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["rank"]:
        rank_script(*sys.argv[2:5])
    elif sys.argv[1:2] == ["hand-loop"]:
        hand_loop(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
