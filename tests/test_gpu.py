"""GPU smoke tests: run only where CUDA is present (a lent GPU machine); skipped elsewhere.

    .venv/bin/python -m pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

def test_trainer_runs_on_cuda_with_amp_and_compile():
    import trainers

    for extra in ({}, {"amp": True}, {"compile": True}):
        result = trainers.train({"dataset": "synthetic", "hidden": [64], "epochs": 2,
                                 "device": "cuda", **extra})
        assert result.status == "completed" and result.device.startswith("cuda")
        assert result.history[-1].val_accuracy > 0.5

def test_an_image_folder_streams_to_cuda_with_pinned_memory(tmp_path):
    import numpy as np
    from PIL import Image

    import trainers

    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(64):
            pixels = np.full((12, 12), 50 + 70 * c, np.uint8) + np.uint8(i % 20)
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.png")
    config = trainers.config_from_dict({
        "data": {"dataset": "image_folder", "root": str(tmp_path), "num_workers": 2},
        "model": {"type": "cnn", "widths": [8, 16]}, "epochs": 2, "batch_size": 32,
        "device": "cuda", "channels_last": True, "amp": True})
    data = trainers.load_data(config.data, device=trainers.resolve_device("cuda"))
    x, y = next(data.train.batches(None, 32))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    result = trainers.train(config)
    assert result.status == "completed" and result.final.val_accuracy > 0.5

def test_a_users_function_trainer_gets_the_gpu(tmp_path):
    (tmp_path / "gpufit.py").write_text(
        "import torch\n"
        "def fit(params, trial):\n"
        "    x = torch.ones(8, device=trial.device) * params['lr']\n"
        "    trial.report(1, loss=float(x.sum()), on_cuda=float(x.is_cuda))\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "gpufit", "trainer": "gpufit:fit", "objective": {"metric": "loss"},
        "budget": {"trials": 2, "epochs": 1}, "pruner": {"type": "none"},
        "space": {"lr": {"low": 0.1, "high": 1.0}}}))
    out = subprocess.run([HPSEARCH, "run", "s.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    import optuna

    study = optuna.load_study(study_name="gpufit", storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    assert all(t.user_attrs["history"][0]["on_cuda"] == 1.0 for t in study.trials)
    assert all(t.user_attrs["device"].startswith("cuda") for t in study.trials)

def test_fine_tuned_conv_nets_train_on_cuda_with_channels_last_and_amp(tmp_path):
    import trainers

    for model in ("resnet18", "mobilenet_v3_small", "vgg11_bn"):
        for extra in ({}, {"channels_last": True}, {"amp": True, "channels_last": True}):
            result = trainers.train({"dataset": "synthetic", "model": model, "epochs": 1,
                                     "freeze_blocks": 1, "head_lr_mult": 10.0, "lr": 0.01,
                                     "device": "cuda", **extra})
            assert result.status == "completed", (model, extra, result.reason)
            assert result.trained_parameters < result.parameters

def test_two_gpu_workers_share_a_study(tmp_path):
    from optuna.trial import TrialState

    from search.run import load
    from search.storage import open_storage

    spec = {
        "name": "gpu-smoke", "budget": {"trials": 6, "epochs": 2},
        "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
        "data": {"dataset": "synthetic", "size": 4096}, "model": {"hidden": [64]},
        "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}},
        "run": {"checkpoint_dir": str(tmp_path / "ckpt")},
    }
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    result = subprocess.run([HPSEARCH, "run", str(path), "--storage", url, "--gpus", "0",
                             "--trials-per-gpu", "2"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    study, _ = load("gpu-smoke", open_storage(url))
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 6
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    assert len({t.user_attrs["pid"] for t in trials}) == 2

def test_the_cuda_step_is_fused_and_its_checkpoint_resumes_on_the_cpu(tmp_path):
    import trainers
    from trainers._optimizers import build_optimizer

    for name in ("sgd", "nesterov", "adam", "adamw"):
        config = trainers.config_from_dict({"optimizer": name, "device": "cuda"})
        model = torch.nn.Linear(4, 2).cuda()
        optimizer = build_optimizer(model, config.optimizer, lr=0.1)
        assert optimizer.param_groups[0].get("fused") is True, name
    # Two epochs on CUDA (stopped there), then the third on the CPU from the CUDA checkpoint.
    base = {"dataset": "synthetic", "hidden": [32], "optimizer": "adam", "lr": 1e-3,
            "epochs": 3}

    def stop_at_two(m):
        if m.epoch == 2:
            raise trainers.StopTraining("moved to the CPU")

    store = trainers.CheckpointStore(tmp_path / "ckpt")
    cuda = trainers.train({**base, "device": "cuda"}, stop_at_two, store)
    assert cuda.status == "stopped" and cuda.epochs_run == 2
    cpu = trainers.train({**base, "device": "cpu"}, checkpoint=store)
    assert cpu.status == "completed" and cpu.resumed_from_epoch == 2


def test_auto_trials_per_gpu_adds_workers_while_they_fit(tmp_path):
    """The default `--trials-per-gpu auto` on a real GPU: one worker, then more by nvidia-smi."""
    from search.run import load
    from search.storage import count_trials, open_storage

    spec = {
        "name": "gpu-auto", "budget": {"trials": 24, "epochs": 3},
        "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
        "data": {"dataset": "synthetic", "size": 8192}, "model": {"hidden": [64]},
        "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}},
    }
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    env = {k: v for k, v in os.environ.items() if k != "HPSEARCH_FAKE_GPU_MEMORY"}
    result = subprocess.run([HPSEARCH, "run", "auto.yaml", "--storage", url, "--gpus", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    print(out)
    study, _ = load("gpu-auto", open_storage(url))
    assert count_trials(study).finished == 24
    assert "started worker #1 there" in out, out  # a small MLP leaves room for more

def test_packed_trials_train_on_cuda_as_they_would_alone():
    import trainers

    base = {"dataset": "synthetic", "data.size": 1024, "hidden": [64, 32], "epochs": 3,
            "device": "cuda"}
    configs = [trainers.config_from_dict({**base, **c}) for c in (
        {"optimizer": "sgd", "batch_size": 32, "lr": 0.02, "scheduler": "cosine"},
        {"optimizer": "adam", "batch_size": 64, "lr": 0.003, "weight_decay": 1e-3},
        {"optimizer": "nesterov", "batch_size": 128, "lr": 0.05, "scheduler": "onecycle"},
        {"optimizer": "adamw", "batch_size": 256, "lr": 0.003, "init": "xavier_uniform"},
        {"optimizer": "rmsprop", "batch_size": 32, "lr": 0.003, "weight_decay": 1e-3},
        {"optimizer": "adagrad", "batch_size": 64, "lr": 0.02, "scheduler": "cosine"},
        {"optimizer": "adadelta", "batch_size": 128, "lr": 1.0},
    )]
    pack = trainers.Pack(7, spread=8)  # one band: 32 … 256 accumulate shared micro-batches
    ids = [pack.add(c) for c in configs]
    out: dict[int, trainers.TrainResult] = {}
    while len(pack):
        out.update(dict(pack.run_until_free()))
    for member, config in zip(ids, configs, strict=True):
        packed, alone = out[member], trainers.train(config)
        assert packed.status == alone.status == "completed"
        assert packed.device.startswith("cuda")
        for p, a in zip(packed.history, alone.history, strict=True):
            assert p.train_loss == pytest.approx(a.train_loss, rel=2e-3)
            assert p.val_loss == pytest.approx(a.val_loss, rel=2e-3)


def _syncs(run) -> list[str]:
    """What `run()` did that waits for the GPU: each synchronizing call warns under sync debug
    mode."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


# A loop reads its loss every DIVERGENCE_CHECK_EVERY steps, and a handful of times an epoch (the
# data order, the epoch's totals, validation, the results); nothing else may wait for the GPU,
# or the host stops queueing kernels while it waits: 205 steps here, so at most 13 + 30.
STEPS = -(-int(8192 * 0.8) // 32)


def test_a_cuda_epoch_waits_for_the_gpu_only_at_its_loss_checks():
    import trainers
    from trainers._loop import DIVERGENCE_CHECK_EVERY

    for optimizer, lr in (("sgd", 0.02), ("adam", 0.003)):
        config = {"dataset": "synthetic", "data.size": 8192, "hidden": [64, 32], "epochs": 1,
                  "device": "cuda", "batch_size": 32, "optimizer": optimizer, "lr": lr,
                  "scheduler": "onecycle"}
        trainers.train(config)  # warm: the data cache, cuBLAS
        syncs = _syncs(lambda c=config: trainers.train(c))
        assert len(syncs) <= STEPS // DIVERGENCE_CHECK_EVERY + 30, (optimizer, syncs)


def test_a_packed_epoch_on_cuda_waits_for_the_gpu_only_at_its_loss_checks():
    import trainers
    from trainers._loop import DIVERGENCE_CHECK_EVERY

    base = {"dataset": "synthetic", "data.size": 8192, "hidden": [64, 32], "epochs": 1,
            "device": "cuda", "batch_size": 32}
    configs = [trainers.config_from_dict({**base, **c}) for c in (
        {"optimizer": "adam", "lr": 0.003}, {"optimizer": "adamw", "lr": 0.003, "seed": 1},
        {"optimizer": "sgd", "lr": 0.02}, {"optimizer": "rmsprop", "lr": 0.003})]
    pack = trainers.Pack(len(configs))
    for c in configs:
        pack.add(c)
    syncs = _syncs(pack.run_until_free)
    assert len(syncs) <= STEPS // DIVERGENCE_CHECK_EVERY + 30, syncs


def test_an_auto_pack_on_cuda_reads_its_memory_and_grows_where_it_fits(tmp_path, monkeypatch,
                                                                       caplog):
    """`--pack auto` on a real GPU: CUDA's own counters are read after each full pack, and a
    pack of tiny MLPs on a large GPU doubles (2 → 4) unless NVML says it is busy."""
    import search.trial._packing as packing
    from search.trial._packing import CudaMeter
    from search.workers import run_worker
    from tests.search_tests.studies import LR, study_data
    from tests.search_tests.test_workers import create

    monkeypatch.setattr(packing, "AUTO_PACK", 2)
    monkeypatch.delenv("HPSEARCH_FAKE_GPU_MEMORY", raising=False)
    study, spec = create(f"sqlite:///{tmp_path / 's.db'}", study_data(
        "cuda-pack-grows", trials=8, epochs=2, size=1024, space=LR))
    with caplog.at_level(logging.INFO, logger="hpsearch"):
        run_worker(study, spec, device="cuda", artifacts=False, pack="auto")
    err = caplog.text
    assert "--pack auto: a pack of 2 peaked at" in err, err
    assert "packs of 4 now" in err or "(GPU busy)" in err, err
    assert len(study.get_trials()) == 8
    reading = CudaMeter("cuda").read(1)
    assert 0 <= reading.own_mb < reading.total_mb and reading.others_mb < reading.total_mb


def _train_ranks(devices: tuple[str, ...]) -> list[float]:
    """A data-parallel run of the synthetic MLP over ranks on `devices`; rank 0's val losses."""
    from search.trial._ranks import Placement, TrainJob, run_ranks, train_rank

    config = {"dataset": "synthetic", "hidden": [64], "dropout": 0.0, "epochs": 2,
              "batch_size": 64, "seed": 1}
    import trainers

    job = TrainJob(trainers.config_from_dict(config).to_dict(), None)
    result = run_ranks(train_rank, job, Placement(devices, threads=1), on_report=lambda m: None)
    one = trainers.train({**config, "device": "cuda"})
    for ours, alone in zip(result.history, one.history, strict=True):
        assert ours.val_loss == pytest.approx(alone.val_loss, rel=1e-3)
    return [m.val_loss for m in result.history]


def test_a_trial_of_one_gpu_trains_as_a_rank_on_nccl():
    from search.trial._ranks import Placement

    assert Placement(("cuda:0",)).backend == "nccl"
    assert len(_train_ranks(("cuda:0",))) == 2


def test_two_gloo_ranks_share_the_one_gpu():
    from search.trial._ranks import Placement

    assert Placement(("cuda:0", "cuda:0")).backend == "gloo"
    assert len(_train_ranks(("cuda:0", "cuda:0"))) == 2


def test_a_study_of_gpus_one_runs_through_run(tmp_path):
    study = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())
    study.update(name="gpus-one", resources={"gpus": 1}, budget={"trials": 2, "epochs": 2})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    done = subprocess.run([HPSEARCH, "run", "s.yaml", "--storage",
                           f"sqlite:///{tmp_path / 's.db'}", "--trials-per-gpu", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2/2 trials finished" in done.stdout
