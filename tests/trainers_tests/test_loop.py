"""The training loop: reproducibility, resume, divergence, stopping, metrics."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from trainers import CheckpointStore, StopTraining, config_from_dict, train

BASE = {"dataset": "synthetic", "hidden": [32], "epochs": 4, "batch_size": 64, "lr": 0.05,
        "dropout": 0.1, "scheduler": "cosine"}


def _curve(result):
    return [(m.train_loss, m.val_loss, m.val_accuracy, m.lr) for m in result.history]


def test_seeded_runs_are_reproducible_on_cpu():
    assert _curve(train(BASE)) == _curve(train(BASE))
    assert _curve(train(BASE)) != _curve(train({**BASE, "seed": 1}))


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    full = train(BASE)

    store = CheckpointStore(tmp_path / "ckpt")

    def stop_after_two(m):
        if m.epoch == 2:
            raise StopTraining("simulated interruption")

    first = train(BASE, stop_after_two, store)
    assert first.status == "stopped" and first.epochs_run == 2
    resumed = train(BASE, None, store)
    assert resumed.resumed_from_epoch == 2
    assert _curve(resumed) == _curve(full)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    train({**BASE, "epochs": 1}, None, store)
    with pytest.raises(ValueError, match="another configuration"):
        train({**BASE, "lr": 0.5}, None, store)


def test_checkpoint_is_weights_only_loadable(tmp_path):
    import torch

    store = CheckpointStore(tmp_path / "ckpt")
    train({**BASE, "epochs": 1}, None, store)
    state = torch.load(store.path, weights_only=True)
    assert state["epoch"] == 1
    store.clear()
    assert store.load() is None


def test_divergence_is_reported_not_raised():
    result = train({**BASE, "lr": 1e3, "optimizer": "sgd", "dropout": 0.0, "scheduler": "constant"})
    assert result.status == "diverged"
    assert result.reason.startswith("diverged")
    assert result.epochs_run < 4


def test_stop_from_on_epoch_ends_after_that_epoch():
    seen = []

    def on_epoch(m):
        seen.append(m.epoch)
        if m.epoch == 2:
            raise StopTraining("enough")

    result = train(BASE, on_epoch)
    assert seen == [1, 2]
    assert result.status == "stopped" and result.reason == "enough"
    assert result.epochs_run == 2


def test_other_errors_from_on_epoch_propagate():
    def boom(m):
        raise RuntimeError("bug in a callback")

    with pytest.raises(RuntimeError, match="bug in a callback"):
        train(BASE, boom)


def test_epoch_metrics_are_complete():
    result = train({**BASE, "epochs": 2, "scheduler": "onecycle"})
    m = result.history[-1]
    assert set(m.grad_norms) == {"linear1", "linear2"}
    assert all(v > 0 for v in m.grad_norms.values())
    assert 0 <= m.train_accuracy <= 1 and 0 <= m.val_accuracy <= 1
    assert m.epoch_seconds > 0 and m.samples_per_second > 0
    assert m.momentum is not None
    assert result.final is m


def test_synthetic_learns():
    result = train({**BASE, "epochs": 5, "lr": 0.1, "dropout": 0.0})
    assert result.history[-1].val_accuracy > 0.8


def test_merge_val_and_test_evaluation():
    result = train({**BASE, "epochs": 2}, evaluate_test=True, merge_val=True)
    assert math.isnan(result.history[-1].val_loss)
    assert result.test_accuracy is not None and 0 <= result.test_accuracy <= 1


def test_augmentation_trains():
    result = train({**BASE, "epochs": 1, "data.augment": ["crop", "flip"]})
    assert result.status == "completed"


def test_config_object_accepted():
    cfg = config_from_dict(BASE)
    assert train(cfg.replace(epochs=1)).epochs_run == 1


def test_trainers_never_import_optuna_or_search():
    """The dependency direction: search imports trainers, never the reverse."""
    root = Path(__file__).resolve().parents[2] / "trainers"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in ("optuna", "search"), f"{path.name} imports {name}"


@pytest.mark.slow
def test_fashion_mnist_seed_network_reaches_080_in_two_epochs():
    """The everyday 784-128-56-10 FashionMNIST MLP (docs/lore.md), SGD lr 0.1, batch 256:
    validation accuracy >= 0.80 in 2 epochs."""
    result = train({"dataset": "fashion_mnist", "hidden": [128, 56], "optimizer": "sgd",
                    "lr": 0.1, "momentum": 0.0, "batch_size": 256, "epochs": 2})
    assert result.history[-1].val_accuracy >= 0.80


def test_resume_may_change_where_it_runs_but_not_what_it_trains(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")

    def stop_first(m):
        raise StopTraining("interrupted")

    train({**BASE, "threads": 1}, stop_first, store)
    resumed = train({**BASE, "threads": 2, "eval_batch_size": 512}, None, store)
    assert resumed.resumed_from_epoch == 1


def test_denormals_are_flushed_on_cpu_unless_turned_off():
    def tiny() -> float:
        return float(torch.tensor([1e-39]) * 1.0)  # below float32's smallest normal number

    train({"dataset": "synthetic", "hidden": [8], "epochs": 1, "device": "cpu"})
    assert tiny() == 0.0
    train({"dataset": "synthetic", "hidden": [8], "epochs": 1, "device": "cpu",
           "flush_denormal": False})
    assert tiny() > 0.0


def test_a_checkpoint_from_a_fused_gpu_optimizer_resumes_with_the_cpus_update():
    """A CUDA run steps with the fused update; its checkpoint says so, and a resume on a CPU
    keeps the CPU's own implementation (the saved flag would ask for a fused CPU step)."""
    from trainers._optimizers import keep_implementation

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["param_groups"][0]["fused"] = True  # as written by a CUDA run
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    keep_implementation(fresh, state)
    assert not fresh.param_groups[0]["fused"]
    assert fresh.state_dict()["state"][0]["step"] == 1  # the state itself is loaded
    fresh.step()  # and the CPU step runs
