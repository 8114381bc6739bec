"""Packed trials in a worker (`--pack K`, `run.pack`): budget, per-trial records, pruning and
refill, the fallback for models that cannot be packed, retries that resume, and Ctrl-C.

Real SQLite storages and the `hpsearch` command line; the engine's own equality with `train`
is tested in tests/trainers_tests/test_packed.py.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess

import optuna
import pytest
from optuna.trial import TrialState

import trainers
from search.cli import build_parser
from search.run import load
from search.storage import count_trials, open_storage
from search.trial._packing import PackRunner
from search.workers import Slot, worker_command
from tests.search_tests.studies import LR, study_data
from tests.search_tests.test_workers import (
    HPSEARCH,
    _study_if_created,
    create,
    slow,
    start_worker,
    wait_for,
    write_spec,
)

SPACE = {**LR, "batch_size": {"pow2": [32, 64]}}
PRUNER = {"type": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 1}}


def _run(path, url, cwd, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([HPSEARCH, "run", str(path), "--storage", url, "--gpus", "none",
                             *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _most_at_once(trials: list[optuna.trial.FrozenTrial]) -> int:
    """How many of `trials` ran at the same time at most (from their start and end)."""
    events = sorted([(t.datetime_start, 1) for t in trials]
                    + [(t.datetime_complete, -1) for t in trials])
    live = most = 0
    for _, step in events:
        live += step
        most = max(most, live)
    return most


def test_packed_study_meets_its_budget_with_each_trial_recorded_as_alone(tmp_path,
                                                                         study_name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = study_data(study_name, trials=12, epochs=4, space=SPACE, pruner=PRUNER,
                      checkpoints=tmp_path / "ckpt", heartbeat=True)
    _run(write_spec(tmp_path, data), url, tmp_path, "--pack", "4")
    alone = {**data, "name": f"{study_name}-alone", "budget": {"trials": 1, "epochs": 4}}
    _run(write_spec(tmp_path, alone), url, tmp_path)
    study, _ = load(study_name, open_storage(url))
    trials = study.get_trials()
    assert count_trials(study).finished == 12 == len(trials)  # the exact budget
    assert _most_at_once(trials) == 4  # packed: four at a time, never more
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # A pruned member's slot is refilled while the others of its pack train on.
    first = min(pruned, key=lambda t: t.datetime_complete)
    assert any(first.datetime_complete <= t.datetime_start < other.datetime_complete
               for t in trials for other in trials
               if other.datetime_start < first.datetime_complete and other is not first)
    for t in trials:  # each its own epochs, history and artifacts
        epochs = t.user_attrs["epochs_run"]
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1)), t.number
        assert len(t.user_attrs["history"]) == epochs
        assert [h["val_loss"] for h in t.user_attrs["history"]] == pytest.approx(
            [t.intermediate_values[e] for e in range(1, epochs + 1)], rel=1e-4)
        assert any(k.startswith("artifacts:") for k in t.system_attrs), t.number
    # The same first trial (same sampler seed, same params) trained alone: the same record.
    single = load(f"{study_name}-alone", open_storage(url))[0].get_trials()[0]
    packed = trials[0]
    assert packed.params == single.params
    assert set(packed.user_attrs) == set(single.user_attrs)
    assert {k.split(":")[0] for k in packed.system_attrs} == {
        k.split(":")[0] for k in single.system_attrs}
    for epoch, value in single.intermediate_values.items():
        assert abs(packed.intermediate_values[epoch] - value) < 1e-4 * max(1.0, abs(value))
    assert not (tmp_path / "ckpt" / study_name).exists() or not any(
        (tmp_path / "ckpt" / study_name).iterdir())  # told trials' checkpoints removed


def test_pack_on_the_command_line_reaches_every_child_worker():
    for pack in (4, "auto"):
        argv, _ = worker_command(Slot(1, "cpu", "", 1), "s", "sqlite:///x.db", timeout_s=None,
                                 base_env={}, pack=pack)
        args = build_parser().parse_args(argv[3:])  # what the child's command line reads
        assert args.pack == pack
    argv, _ = worker_command(Slot(1, "cpu", "", 1), "s", "u", timeout_s=None, base_env={})
    assert build_parser().parse_args(argv[3:]).pack is None  # the study file's run.pack


def test_a_model_that_cannot_be_packed_runs_alone_and_says_so_once(tmp_path, study_name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = study_data(study_name, trials=3, epochs=1, space=SPACE, size=256,
                      model={"type": "mlp", "hidden": [16], "norm": "batchnorm"})
    result = _run(write_spec(tmp_path, data), url, tmp_path, "--pack", "4")
    out = result.stdout + result.stderr
    assert out.count("cannot be packed") == 1, out
    assert "model.norm batchnorm" in out
    study, _ = load(study_name, open_storage(url))
    trials = study.get_trials()
    assert count_trials(study).finished == 3 == len(trials)
    assert _most_at_once(trials) == 1


def test_every_built_in_optimizer_trains_in_the_pack(tmp_path, study_name):
    # A space over the whole registry: each trial is packed, none runs alone.
    names = trainers.OPTIMIZERS.names()
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = study_data(study_name, trials=len(names), epochs=1, size=256,
                      space={"optimizer": {"choices": names}, **SPACE},
                      enqueue=[{"optimizer": n, "lr": 0.01, "batch_size": 32} for n in names])
    result = _run(write_spec(tmp_path, data), url, tmp_path, "--pack", str(len(names)))
    out = result.stdout + result.stderr
    assert "cannot be packed" not in out, out
    trials = load(study_name, open_storage(url))[0].get_trials()
    assert sorted(t.params["optimizer"] for t in trials) == sorted(names)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert _most_at_once(trials) == len(names)  # all of them in one pack


def test_a_space_over_hidden_layers_packs_every_network(tmp_path, study_name):
    # Three networks in one pack, each in stacks of its own: none runs alone.
    shapes = [[16], [24, 8], [8, 8, 8]]
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = study_data(study_name, trials=6, epochs=2, size=256,
                      space={**SPACE, "hidden": {"choices": shapes}},
                      enqueue=[{"hidden": shapes[k % 3], "lr": 0.05, "batch_size": 32}
                               for k in range(6)])
    del data["model"]["hidden"]
    result = _run(write_spec(tmp_path, data), url, tmp_path, "--pack", "6")
    out = result.stdout + result.stderr
    assert "cannot be packed" not in out, out
    trials = load(study_name, open_storage(url))[0].get_trials()
    assert sorted(t.params["hidden"] for t in trials) == sorted(["16", "24,8", "8,8,8"] * 2)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert _most_at_once(trials) == 6


def test_under_auto_a_large_network_runs_alone_and_the_small_ones_pack(tmp_path, study_name):
    # 64 inputs, [1024, 1024]: 1.12M parameters, over auto's 1M.
    url = f"sqlite:///{tmp_path / 's.db'}"
    shapes = [[16], [1024, 1024]]
    data = study_data(study_name, trials=5, epochs=1, size=256,
                      space={**SPACE, "hidden": {"choices": shapes}},
                      enqueue=[{"hidden": h, "lr": 0.05, "batch_size": 32}
                               for h in ([16], [1024, 1024], [16], [16], [16])])
    del data["model"]["hidden"]
    result = _run(write_spec(tmp_path, data), url, tmp_path, "--pack", "auto")
    out = result.stdout + result.stderr
    assert re.search(r"--pack auto: [\d,]+ parameters, 8 trials at once", out), out
    assert re.search(r"--pack auto: 1,1\d\d,\d+ parameters \(at least 1,000,000\): one "
                     r"trial at a time", out), out
    assert out.count("cannot be packed") == 1, out
    trials = load(study_name, open_storage(url))[0].get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    small = [t for t in trials if t.params["hidden"] == "16"]
    assert len(small) == 4 and _most_at_once(small) == 4  # one pack, around the large one


def test_killed_packed_worker_trials_resume_from_their_checkpoints(tmp_path, study_name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = slow(study_name, tmp_path, trials=3, epochs=6)
    # From the study file this time, as auto: a small model, 8 at once on a CPU (all three
    # trials).
    data["run"]["pack"] = "auto"
    study, _ = create(url, data)
    first = start_worker(study_name, url, tmp_path)
    try:
        victims = wait_for(lambda: _running(study, 3, epochs=2), timeout=120,
                           what="three packed trials two epochs in")
    finally:
        first.kill()
        first.wait()
    second = start_worker(study_name, url, tmp_path)
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out
    assert re.search(r"--pack auto: [\d,]+ parameters, 8 trials at once", out), out
    assert count_trials(study).finished == 3  # the exact budget
    retries = [t for t in study.get_trials(states=(TrialState.COMPLETE,))
               if t.user_attrs.get("retried_from") is not None]
    assert sorted(t.user_attrs["retried_from"] for t in retries) == sorted(
        t.number for t in victims)
    assert all(t.user_attrs["resumed_from_epoch"] >= 2 for t in retries)
    assert _most_at_once(retries) == 3  # resumed in one pack


def test_ctrl_c_queues_every_member_again(tmp_path, study_name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_spec(tmp_path, slow(study_name, tmp_path, trials=6, epochs=20))
    run = subprocess.Popen([HPSEARCH, "run", str(path), "--storage", url, "--gpus", "none",
                            "--pack", "3"], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        study = wait_for(lambda: _study_if_created(url, study_name), timeout=60,
                         what="the study")
        members = wait_for(lambda: _running(study, 3, epochs=1), timeout=120,
                           what="three packed trials an epoch in")
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, out
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert sorted(t.number for t in failed) == sorted(t.number for t in members), out
    assert all(t.user_attrs["ended"] == "interrupted" for t in failed)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history
    assert sorted(retry_of(t)[-1] for t in waiting) == sorted(
        t.number for t in members)  # each queued again, to resume
    assert not study.get_trials(states=(TrialState.RUNNING,))


def _running(study, n: int, *, epochs: int) -> list | None:
    """The running trials once `n` run, each `epochs` in."""
    running = study.get_trials(states=(TrialState.RUNNING,))
    ready = len(running) == n and all(len(t.intermediate_values) >= epochs for t in running)
    return running if ready else None


def test_near_the_timeout_a_pack_drains_instead_of_refilling(monkeypatch):
    """A slot frees: it is refilled only if a new trial, at the pack's pace, would end by the
    worker's timeout (a pack refilled to the end would overrun it by K trials)."""
    import search.trial._packing as packing
    import trainers

    pack = trainers.Pack(4)
    config = {"dataset": "synthetic", "data.size": 256, "hidden": [16], "epochs": 5,
              "batch_size": 32, "lr": 0.01, "device": "cpu"}
    pack.add(config)
    pack.add({**config, "epochs": 10, "lr": 0.02})
    assert pack.trial_seconds() == 0  # no epoch yet: nothing to judge by
    (ended, _), = pack.run_until_free()  # the 5-epoch member ends; the other goes on
    assert pack.epoch_seconds > 0 and len(pack) == 1
    assert pack.trial_seconds() == pytest.approx(10 * pack.epoch_seconds)  # a whole new run

    packed = PackRunner(None, None, None, None, None, 0, 4)  # the rule needs no storage
    now = 1000.0
    monkeypatch.setattr(packing.time, "monotonic", lambda: now)
    assert packed._time_for_one_more(now + 1e-3)  # an empty pack fills before the timeout
    assert not packed._time_for_one_more(now)  # ... and not after it
    packed.pack, packed.members = pack, {0: None}
    assert packed._time_for_one_more(now + 1.01 * pack.trial_seconds())
    assert not packed._time_for_one_more(now + 0.99 * pack.trial_seconds())


def test_a_pack_out_of_memory_queues_its_trials_again_in_a_smaller_pack(tmp_path, study_name,
                                                                      monkeypatch, caplog):
    """Injected where no GPU is present: a pack of more than two members runs out of memory.
    Its members are queued again unchanged and resume in packs of half the size; no trial is
    lost and the study meets its budget."""
    import torch

    import trainers
    from search.storage import INTERRUPTED
    from search.workers import run_worker

    study, spec = create(f"sqlite:///{tmp_path / 's.db'}", study_data(
        study_name, trials=6, epochs=2, size=256, space=SPACE, checkpoints=tmp_path / "ckpt"))
    real = trainers.Pack.run_until_free
    sizes = []

    def oom_when_big(self):
        sizes.append(len(self))
        if len(self) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(self)

    monkeypatch.setattr(trainers.Pack, "run_until_free", oom_when_big)
    with caplog.at_level(logging.INFO, logger="hpsearch"):
        run_worker(study, spec, device="cpu", artifacts=False, pack=4)
    assert sizes[0] == 4 and max(sizes[1:]) <= 2  # halved once, never grown back
    trials = study.get_trials()
    oom = [t for t in trials if t.state == TrialState.FAIL]
    assert len(oom) == 4 and all("oom_pack" in t.user_attrs
                                 and t.user_attrs["ended"] == INTERRUPTED for t in oom)
    assert oom[0].user_attrs["oom_pack"].startswith("out of memory in a pack of 4 on cpu: CUDA")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 6  # the exact budget
    retried = {t.user_attrs.get("retried_from"): t for t in finished}
    for t in oom:  # each queued again unchanged, and run
        assert retried[t.number].params == t.params
        assert "oom_pack" not in retried[t.number].user_attrs  # the retry's record is its own
    assert ("its 4 trials are queued again and this worker goes on with packs of 2"
            in caplog.text)


def test_an_auto_pack_grows_while_the_device_has_room(tmp_path, study_name, monkeypatch,
                                                     caplog):
    """`--pack auto` on a simulated GPU (1000 MiB, 100 MiB a member): the pack doubles after
    each full pack while twice it fits under 85% (2 → 4 → 8), then settles at 8 and says why."""
    import search.trial._packing as packing
    from search.workers import run_worker

    monkeypatch.setattr(packing, "AUTO_PACK", 2)  # where a GPU pack starts (32 for a small MLP)
    monkeypatch.setenv("HPSEARCH_FAKE_GPU_MEMORY",
                       '{"total_mb": 1000, "per_worker_mb": 100, "util_per_worker": 1}')
    study, spec = create(f"sqlite:///{tmp_path / 's.db'}", study_data(
        study_name, trials=14, epochs=2, size=256, space=SPACE))
    with caplog.at_level(logging.INFO, logger="hpsearch"):
        run_worker(study, spec, device="cpu", artifacts=False, pack="auto")
    err = caplog.text
    assert ("a pack of 2 peaked at 200 MiB, others hold 0 of 1,000 MiB, GPU 2% busy: packs of "
            "4 now") in err, err
    assert "a pack of 4 peaked at 400 MiB" in err and "packs of 8 now" in err, err
    assert "the pack stays at 8 (16 would need 1,600 MiB, over 85%)" in err, err
    trials = study.get_trials()
    assert len(trials) == 14 and all(t.state == TrialState.COMPLETE for t in trials)
    assert _most_at_once(trials) == 8  # 2, then 4, then the last 8 together


def test_an_auto_pack_widens_as_the_study_finishes_trials(tmp_path, study_name, monkeypatch):
    """`--pack auto` on a young study holds twice its finished trials (at least RAMP_START):
    the first pack is RAMP_START trials, none of the next starts before one of those ended, and
    the pack then widens to K."""
    import search.trial._packing as packing
    from search.workers import run_worker

    monkeypatch.setattr(packing, "AUTO_PACK_CPU", 8)
    monkeypatch.setattr(packing, "RAMP_START", 2)
    study, spec = create(f"sqlite:///{tmp_path / 's.db'}", study_data(
        study_name, trials=14, epochs=2, size=256, space=SPACE))
    run_worker(study, spec, device="cpu", artifacts=False, pack="auto")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert len(trials) == 14 and all(t.state == TrialState.COMPLETE for t in trials)
    first, rest = trials[:2], trials[2:]
    assert min(t.datetime_start for t in rest) >= min(t.datetime_complete for t in first)
    assert _most_at_once(trials) == 8  # then K


def test_how_an_auto_pack_grows():
    from search.trial._packing import PACK_MAX, PackReading, grown_capacity

    def reading(members, own, others=0.0, total=1000.0, util=None):
        return PackReading(members, own, others, total, util)

    assert grown_capacity(32, reading(32, 320))[0] == 64  # 640 MiB fits under 850
    assert grown_capacity(32, reading(32, 320, others=300))[0] == 32  # 940 does not
    assert grown_capacity(32, reading(20, 200))[0] == 32  # not full: nothing learned
    size, why = grown_capacity(32, reading(32, 64, util=95.0))
    assert size == 32 and why.endswith("the pack stays at 32 (GPU busy)")
    assert grown_capacity(32, reading(32, 64, util=50.0))[0] == 64
    assert grown_capacity(PACK_MAX // 2 + 1, reading(PACK_MAX // 2 + 1, 1))[0] == PACK_MAX
    assert grown_capacity(PACK_MAX, reading(PACK_MAX, 1)) == (PACK_MAX, "")


def test_the_gpu_fill_benchmark_runs_its_arms_dry_on_the_cpu(tmp_path):
    """benchmarks/gpu_fill.py waits for a lent GPU's few minutes: it must not fail there for a
    reason the CPU could have shown (its CPU dry run: synthetic data, 4 trials of 1 epoch)."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_fill.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--trials", "4",
                             "--epochs", "1", "--dataset", "synthetic", "--arms", "tpg1,pack",
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["trials_tpg1"] == lines["trials_pack"] == "4"
    assert float(lines["pack_speedup_vs_tpg1"]) > 0 and lines["gpu_busy_pack"] == "n/a"
