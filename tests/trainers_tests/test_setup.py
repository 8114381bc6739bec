"""A run's setup: one `prepare_run` for `train` and a pack member, fresh or resumed."""

from __future__ import annotations

import pytest
import torch

from trainers import CheckpointStore, ConfigError, StopTraining, config_from_dict, lr_plan, train
from trainers._setup import prepare_run

CONFIG = config_from_dict({"dataset": "synthetic", "hidden": [16], "epochs": 3,
                           "batch_size": 100, "lr": 0.2, "optimizer.lr_per_batch": 256,
                           "scheduler": "cosine", "dropout": 0.1})


def _stopped_after_one_epoch(store: CheckpointStore) -> None:
    def stop(metrics):
        raise StopTraining("interrupted")

    train(CONFIG, stop, store)


def test_a_fresh_setup_is_seeded_and_leaves_the_rng_after_the_init():
    first = prepare_run(CONFIG)
    assert torch.equal(first.rng_cpu, torch.get_rng_state())
    second = prepare_run(CONFIG)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first.order.get_state(), second.order.get_state())
    assert (first.start_epoch, first.history, first.first_loss) == (0, [], None)


def test_the_setup_follows_the_lr_plan():
    run = prepare_run(CONFIG)
    plan = lr_plan(CONFIG, len(run.data.train))
    assert (run.plan.base_lr, run.plan.steps_per_epoch) == (plan.base_lr, plan.steps_per_epoch)
    assert [g["lr"] for g in run.optimizer.param_groups] == [plan.base_lr] * len(
        run.optimizer.param_groups)


def test_a_resumed_setup_continues_where_the_checkpoint_left_off(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    _stopped_after_one_epoch(store)
    state = store.load()
    torch.manual_seed(12345)  # whatever the process drew since: the run's own state wins
    run = prepare_run(CONFIG, store)
    assert run.start_epoch == 1 and len(run.history) == 1
    assert run.first_loss == state["first_loss"]
    assert torch.equal(torch.get_rng_state(), state["rng_cpu"])
    assert torch.equal(run.rng_cpu, state["rng_cpu"])
    assert torch.equal(run.order.get_state(), state["rng_order"])
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, state["model"][name])


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    _stopped_after_one_epoch(store)
    with pytest.raises(ConfigError, match="written by another configuration"):
        prepare_run(CONFIG.replace(lr=0.1), store)
