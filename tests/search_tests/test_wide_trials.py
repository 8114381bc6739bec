"""Trials of several processes (`resources: {gpus: N}` / `{processes: N}`): the slots a
machine makes of them, the refusals, the built-in trainer's data parallelism against one
process and a hand-written torchrun script, and real studies of 2 gloo ranks a trial on the
CPU: the budget, ranks at once, one stop decision for every rank, a rank killed or raising,
a port clash, and no process left behind.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import trainers
from search import SpecError
from search.spec import Resources, parse_spec
from search.trial import _ranks
from search.workers import Slot, plan_slots, widen

ROOT = Path(__file__).resolve().parents[2]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


def hp(*args: str, cwd: Path, env: dict[str, str] | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def trials_of(folder: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'hpsearch.db'}")
    return optuna.load_study(study_name=name, storage=storage).trials


def processes_with(token: str) -> list[int]:
    """The pids whose environment holds `token` (a test's own mark, inherited by its ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# --------------------------------------------------------------------------- slots and refusals


def test_gpus_n_groups_a_machines_gpus_and_says_which_stay_idle():
    eight = plan_slots("auto", gpu_ids=[str(i) for i in range(8)], cores=16)
    slots = widen(eight, Resources(gpus=2), cores=16)
    assert [s.cuda_visible_devices for s in slots] == ["0,1", "2,3", "4,5", "6,7"]
    assert {(s.device, s.ranks, s.threads) for s in slots} == {("cuda", 2, 2)}
    said: list[str] = []
    three = widen(plan_slots("auto", gpu_ids=["0", "1", "2"], cores=4), Resources(gpus=2),
                  cores=4, say=said.append)
    assert [s.cuda_visible_devices for s in three] == ["0,1"] and len(said) == 1
    assert "GPU 2 stay idle" in said[0]


def test_processes_n_gives_each_rank_its_share_of_the_cores():
    slots = widen(plan_slots("none", workers=2, cores=2), Resources(processes=2), cores=2)
    assert [(s.device, s.ranks, s.threads) for s in slots] == [("cpu", 2, 1)] * 2
    slots = widen(plan_slots("none", workers=2, cores=16), Resources(processes=2), cores=16)
    assert {s.threads for s in slots} == {4}  # 16 cores / (2 trials x 2 ranks)
    assert widen(slots, Resources(), cores=16) == slots  # width 1: as planned


@pytest.mark.parametrize(("resources", "options", "message"), [
    (Resources(gpus=4), {}, "resources.gpus: 4 GPUs a trial, and this machine has 2 visible "
                            "(0, 1)"),
    (Resources(processes=8), {}, "resources.processes: 8 processes a trial, and this machine "
                                 "has 2 cores"),
    (Resources(gpus=2), {"trials_per_gpu": 2},
     "--trials-per-gpu 2: a trial of 2 GPUs (resources) takes its devices whole"),
    (Resources(processes=2), {"pack": 8}, "--pack 8: a trial of 2 processes (resources) runs "
                                          "alone"),
])
def test_a_width_the_machine_cannot_hold_is_refused(resources, options, message):
    slots = [Slot(0, "cuda", "0", 1), Slot(1, "cuda", "1", 1)]
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        widen(slots, resources, cores=2, **options)


def _mlp_study(**changes):
    study = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    study.update(changes)
    return study


@pytest.mark.parametrize(("resources", "extra", "where", "message"), [
    ({"gpus": 0}, {}, "resources.gpus", "expected a whole number 1 or more, got 0"),
    ({"processes": 0}, {}, "resources.processes", "expected a whole number 1 or more, got 0"),
    ({"gpus": -2}, {}, "resources.gpus", "got -2"),
    ({"processes": 1.5}, {}, "resources.processes", "got 1.5"),
    ({"gpus": "2"}, {}, "resources.gpus", "got '2'"),
    ({"gpus": 2, "processes": 2}, {}, "resources", "not both"),
    ({"processes": 2}, {"run": {"pack": 4}}, "run.pack", "use one or the other"),
    ({"processes": 3}, {}, "space.batch_size", "expected batch sizes 3 divides, got 32, 64, 128"),
    ({"gpus": 4}, {"enqueue": [{"batch_size": 32}, {"batch_size": 50}]}, "enqueue[1].batch_size",
     "got 50"),
])
def test_bad_widths_are_refused_with_the_key(resources, extra, where, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(_mlp_study(resources=resources, **extra))
    assert f"{where}: " in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("name", ["fashion_cnn", "fashion_finetune", "fashion_mlp"])
def test_the_shipped_studies_validate_two_gpus_a_trial(name):
    study = yaml.safe_load((ROOT / "studies" / f"{name}.yaml").read_text())
    # A wide trial is not packed (refused together: test_bad_study_values): the quick start's
    # `run.pack` goes where its trials span two GPUs.
    study.get("run", {}).pop("pack", None)
    spec = parse_spec({**study, "resources": {"gpus": 2}})
    assert spec.resources.width == 2 and spec.resources.label == "2 GPUs"


def test_validate_and_run_refuse_before_the_storage(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_mlp_study(resources={"gpus": 0})))
    done = hp("validate", "bad.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "resources.gpus: expected a whole number 1 or more, got 0" in done.stderr
    wide = _mlp_study(resources={"processes": 64})
    wide["space"]["batch_size"] = {"pow2": [64, 128]}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(wide))
    done = hp("run", "wide.yaml", "--storage", f"sqlite:///{tmp_path / 'x.db'}",
              "--gpus", "none", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "64 processes" in line]
    assert len(lines) == 1 and f"has {len(os.sched_getaffinity(0))} cores" in lines[0], done.stderr
    assert not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- data parallelism

CONFIG = {"data": {"dataset": "synthetic", "size": 1200, "val_fraction": 0.2},
          "model": {"type": "mlp", "hidden": [32], "dropout": 0.0}, "epochs": 3,
          "batch_size": 64, "lr": 0.05, "seed": 3, "threads": 1}

# A hand-written DDP script for `torchrun --nproc-per-node 2`, as a user would write it around
# the same model and data: one shuffled order, each rank its half of every global batch.
BY_HAND = '''
import json, os, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
import trainers
from trainers._setup import prepare_run

config = trainers.config_from_dict(json.loads(sys.argv[1]))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
run = prepare_run(config)
model = DistributedDataParallel(run.model)
losses = []
for epoch in range(config.epochs):
    model.train()
    order = torch.randperm(len(run.data.train), generator=run.order)
    total = torch.zeros(1, dtype=torch.float64)
    for i, (xb, yb) in enumerate(run.data.train.batches(order, config.batch_size)):
        n = len(yb)
        half = slice(rank * n // world, (rank + 1) * n // world)
        loss = F.cross_entropy(model(xb[half]), yb[half], reduction="sum") * world / n
        run.optimizer.zero_grad()
        loss.backward()
        for group in run.optimizer.param_groups:
            group["lr"] = run.plan.base_lr * run.plan.schedule.factor(
                epoch * run.plan.steps_per_epoch + i) * group["lr_mult"]
        run.optimizer.step()
        total += loss.detach().double() * n / world
    dist.all_reduce(total)
    losses.append(total.item() / len(run.data.train))
if rank == 0:
    print(json.dumps(losses))
dist.destroy_process_group()
# DDP keeps gloo's group alive past destroy: exiting through the interpreter's teardown can
# abort (SIGABRT, pytorch#190489), as hpsearch's own ranks would without their os._exit.
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.serial
def test_two_ranks_train_as_one_process_and_as_a_torchrun_script(tmp_path):
    one = [m.to_dict() for m in trainers.train(CONFIG).history]
    reported: list[trainers.EpochMetrics] = []  # rank 0's reports, as the worker gets them
    job = _ranks.TrainJob(trainers.config_from_dict(CONFIG).to_dict(), None)
    result = _ranks.run_ranks(_ranks.train_rank, job, _ranks.Placement(("cpu", "cpu"), 1),
                              on_report=lambda m: reported.append(m) or None)
    ddp = [m.to_dict() for m in result.history]
    assert [m.to_dict() for m in reported] == ddp
    (tmp_path / "by_hand.py").write_text(BY_HAND)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--master-port", str(_ranks.free_port()), "by_hand.py",
                           json.dumps(CONFIG)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    by_hand = json.loads(done.stdout.strip().splitlines()[-1])
    # The same batches, the same gradients up to the order of float additions (the all-reduce
    # sums two halves where one process sums the whole): float32 rounding, ~1e-7 relative
    # per step, compounded over 45 steps; 1e-5 is far below any change of a batch or an lr.
    for a, b, hand in zip(one, ddp, by_hand, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1 / 240)
        assert hand == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.serial
def test_a_port_clash_is_retried_on_another_port(monkeypatch, caplog):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = _ranks.free_port
    monkeypatch.setattr(_ranks, "free_port", lambda: next(ports, None) or real())
    placement = _ranks.Placement(("cpu", "cpu"), threads=1)
    try:
        with caplog.at_level(logging.INFO, logger="hpsearch"):
            world = _ranks.run_ranks(_world_size, None, placement, on_report=lambda r: None)
    finally:
        taken.close()
    assert world == 2
    assert "was taken as the ranks started; trying another" in caplog.text


def _world_size(rank: _ranks.Rank, payload: object) -> int:
    import torch
    import torch.distributed as dist

    one = torch.ones(1)
    dist.all_reduce(one)
    return int(one.item())


# --------------------------------------------------------------------------- studies, end to end

FIT = '''
import json, os, signal, time
import torch, torch.distributed as dist


def fit(params, trial):
    one = torch.ones(1)
    dist.all_reduce(one)
    assert int(one.item()) == trial.world_size == int(os.environ["WORLD_SIZE"]) == 2
    assert trial.rank == dist.get_rank() == int(os.environ["RANK"])
    mode, state = params["mode"], trial.load_checkpoint() or {"epoch": 0}
    record = {"trial": trial.number, "rank": trial.rank, "pid": os.getpid(),
              "start": time.time(), "resumed": state["epoch"], "mode": mode}
    epoch = state["epoch"]
    try:
        for epoch in range(state["epoch"] + 1, trial.epochs + 1):
            time.sleep(0.4)
            if mode == "raise" and trial.rank == 1:
                raise ValueError("bad shard on rank 1")
            marker = os.path.join(os.environ["MARKS"], f"killed-{trial.number}")
            if mode == "kill" and trial.rank == 1 and epoch == 3 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9, mid-epoch
            loss = 1.0 / epoch + (100.0 if mode == "prune" else params["lr"]) + 10 * trial.rank
            trial.save_checkpoint({"epoch": epoch})
            trial.report(epoch, score=loss)
    finally:
        record.update(end=time.time(), last_epoch=epoch)
        with open(os.path.join(os.environ["MARKS"], "ranks.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\\n")
    return loss
'''


def _at_once(records: list[dict]) -> int:
    """The most rank processes that were running at one moment."""
    moments = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    most = running = 0
    for _, change in moments:
        running += change
        most = max(most, running)
    return most


@pytest.mark.serial
def test_a_function_trainer_of_two_ranks_prunes_fails_and_resumes_as_one(tmp_path):
    (tmp_path / "widefit.py").write_text(FIT)
    token = f"HPSEARCH_TEST_{os.getpid()}_{time.monotonic_ns()}"
    study = {
        "name": "widefit", "trainer": "widefit:fit", "objective": {"metric": "score"},
        "budget": {"trials": 5, "epochs": 4}, "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "percentile", "options": {"percentile": 50.0, "n_startup_trials": 1,
                                                      "n_warmup_steps": 1}},
        "resources": {"processes": 2}, "run": {"checkpoint_dir": str(tmp_path / "ck")},
        "space": {"lr": {"low": 0.01, "high": 0.1, "log": True},
                  "mode": {"choices": ["ok", "raise", "kill", "prune"]}},
        # The killed trial is the best, so its retry is never pruned.
        "enqueue": [{"mode": "ok", "lr": 0.09}, {"mode": "raise", "lr": 0.08},
                    {"mode": "kill", "lr": 0.01}, {"mode": "prune", "lr": 0.04},
                    {"mode": "ok", "lr": 0.02}, {"mode": "ok", "lr": 0.03}],
    }
    (tmp_path / "widefit.yaml").write_text(yaml.safe_dump(study))
    done = hp("run", "widefit.yaml", "--storage", f"sqlite:///{tmp_path / 'hpsearch.db'}",
              "--workers", "2", cwd=tmp_path,
              env={"PYTHONPATH": str(tmp_path), "MARKS": str(tmp_path), token: "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert processes_with(token) == []  # no rank left behind
    trials = {t.number: t for t in trials_of(tmp_path, "widefit")}
    states = [t.state.name for t in trials.values()]
    assert states.count("COMPLETE") + states.count("PRUNED") == 5  # the exact budget
    raised = trials[1]
    assert raised.state.name == "FAIL"
    assert raised.user_attrs["ended"] == "error: rank 1: ValueError: bad shard on rank 1"
    assert "bad shard" in raised.user_attrs["traceback"]
    assert not [t for t in trials.values() if t.system_attrs.get("failed_trial") == 1]
    lost = trials[2]  # rank 1 killed mid-epoch 3: lost, its retry resumes from epoch 2
    assert lost.state.name == "FAIL"
    assert lost.user_attrs["rank_lost"] == "rank 1 of 2 died (killed by signal SIGKILL)"
    assert lost.user_attrs["seconds"] < 15
    retry = next(t for t in trials.values() if t.system_attrs.get("failed_trial") == 2)
    assert retry.state.name == "COMPLETE" and retry.user_attrs["resumed_from_epoch"] >= 1
    assert [r["epoch"] for r in retry.user_attrs["history"]] == [1, 2, 3, 4]
    records = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["trial"] == retry.number]
    # (rank 0 may have saved epoch 3 before rank 1 died in it)
    assert len(resumed) == 2 and resumed[0]["resumed"] == resumed[1]["resumed"] >= 2
    pruned = trials[3]
    assert pruned.state.name == "PRUNED"
    stops = [r for r in records if r["trial"] == 3]
    assert len(stops) == 2 and len({r["last_epoch"] for r in stops}) == 1  # the same epoch
    assert abs(stops[0]["end"] - stops[1]["end"]) < 2.0
    for t in trials.values():  # rank 0's reports are the stored ones (rank 1 adds 10)
        assert all(r["score"] < 5 or t.number == 3 for r in t.user_attrs.get("history", []))
    assert _at_once(records) == 4  # 2 trials at once, 2 ranks each
    assert len({r["pid"] for r in records}) == len(records)  # fresh processes a trial


NET = '''
import json, os, time
import torch, torch.distributed as dist
from torch import nn


class Logged(nn.Sequential):
    def forward(self, x):
        if self.training and time.time() - self.last > 0.2:
            self.last = time.time()
            with open(os.environ["RANKS_LOG"], "a") as f:
                f.write(json.dumps([os.getpid(), self.born, self.last]) + "\\n")
        return super().forward(x)


def build(input_shape, num_classes):
    if dist.is_initialized():  # in a rank (validation builds it once in the worker too)
        one = torch.ones(1)
        dist.all_reduce(one)
        assert int(one.item()) == dist.get_world_size() == 2
    net = Logged(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
    net.born = net.last = time.time()
    return net
'''


@pytest.mark.serial
def test_the_built_in_trainer_runs_two_trials_of_two_ranks_at_once(tmp_path):
    (tmp_path / "widenet.py").write_text(NET)
    study = _mlp_study(name="widemlp", resources={"processes": 2},
                       budget={"trials": 4, "epochs": 3}, pruner={"type": "none"},
                       data={"dataset": "synthetic", "size": 4096},
                       model={"type": "widenet:build"},
                       space={"lr": {"low": 0.001, "high": 0.01, "log": True},
                              "batch_size": {"pow2": [32, 128]}})
    (tmp_path / "widemlp.yaml").write_text(yaml.safe_dump(study))
    done = hp("run", "widemlp.yaml", "--storage", f"sqlite:///{tmp_path / 'hpsearch.db'}",
              "--workers", "2", cwd=tmp_path,
              env={"PYTHONPATH": str(tmp_path), "RANKS_LOG": str(tmp_path / "ranks.log")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = trials_of(tmp_path, "widemlp")
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4
    assert all(len(t.user_attrs["history"]) == 3 for t in trials)
    spans: dict[int, list[float]] = {}
    for line in (tmp_path / "ranks.log").read_text().splitlines():
        pid, born, last = json.loads(line)
        spans[pid] = [born, max(last, spans.get(pid, [0, 0])[1])]
    assert len(spans) == 8  # 4 trials of 2 ranks
    records = [{"start": a, "end": b} for a, b in spans.values()]
    assert _at_once(records) == 4


PLACED = '''
import json, os
import torch, torch.distributed as dist


def fit(params, trial):
    with open(os.path.join(os.environ["MARKS"], "placed.jsonl"), "a") as f:
        f.write(json.dumps([trial.number, trial.rank, os.environ["CUDA_VISIBLE_DEVICES"],
                            os.environ["LOCAL_RANK"], dist.get_backend()]) + "\\n")
    trial.report(1, score=params["lr"])
'''


@pytest.mark.serial
def test_gpus_two_on_five_simulated_gpus_runs_two_trials_on_their_own_pairs(tmp_path):
    """The dispatch of `gpus: 2` on a machine of 5 (simulated: their workers train on the
    CPU): two workers, each pinned to its pair, the fifth GPU idle, said once."""
    (tmp_path / "placed.py").write_text(PLACED)
    study = {"name": "pairs", "trainer": "placed:fit", "objective": {"metric": "score"},
             "budget": {"trials": 4, "epochs": 1}, "pruner": {"type": "none"},
             "resources": {"gpus": 2}, "space": {"lr": {"low": 0.01, "high": 0.1}}}
    (tmp_path / "pairs.yaml").write_text(yaml.safe_dump(study))
    done = hp("run", "pairs.yaml", "--storage", f"sqlite:///{tmp_path / 'hpsearch.db'}",
              cwd=tmp_path, env={
                  "PYTHONPATH": str(tmp_path), "MARKS": str(tmp_path),
                  "HPSEARCH_FAKE_GPU_COUNT": "5",
                  "HPSEARCH_FAKE_GPU_MEMORY": json.dumps({"total_mb": 1000, "per_worker_mb": 100,
                                                          "util_per_worker": 10})})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("GPU 4 stay idle: 5 GPUs make 2 trial slot(s) of 2") == 1, out
    assert "#0 cuda GPU 0,1 2 ranks" in out and "#1 cuda GPU 2,3 2 ranks" in out, out
    placed = [json.loads(line) for line in (tmp_path / "placed.jsonl").read_text().splitlines()]
    assert {visible for _, _, visible, _, _ in placed} == {"0,1", "2,3"}
    assert all(str(rank) == local and backend == "gloo" for _, rank, _, local, backend in placed)
    assert sorted(t.state.name for t in trials_of(tmp_path, "pairs")) == ["COMPLETE"] * 4
