"""The lr plan: linear scaling and its inverse, steps per epoch, and the lr `train` applies."""

from __future__ import annotations

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from trainers import (
    LR_SCHEDULES,
    config_from_dict,
    effective_lr,
    lr_plan,
    scale_lr,
    steps_per_epoch,
    train,
    unscale_lr,
)

N_TRAIN = 1638  # the synthetic dataset's training split (2048, less a fifth for validation)


@pytest.mark.parametrize("batch_size", [1, 32, 100, 256, 1024])
@pytest.mark.parametrize("per_batch", [None, 0, 64, 256])
@pytest.mark.parametrize("lr", [1e-4, 0.1, 0.4, 3.0])
def test_unscale_lr_inverts_scale_lr(lr, batch_size, per_batch):
    scaled = scale_lr(lr, batch_size, per_batch)
    assert unscale_lr(scaled, batch_size, per_batch) == pytest.approx(lr, rel=1e-12)
    assert scale_lr(unscale_lr(lr, batch_size, per_batch), batch_size, per_batch) == (
        pytest.approx(lr, rel=1e-12))


def test_linear_scaling_is_proportional_to_the_batch():
    assert scale_lr(0.2, 128, 256) == pytest.approx(0.1)  # lore: 0.2 per 256 is 0.1 at 128
    assert scale_lr(0.2, 512, 256) == pytest.approx(0.4)
    assert unscale_lr(0.1, 128, 256) == pytest.approx(0.2)
    assert scale_lr(0.2, 128, None) == unscale_lr(0.2, 128, None) == 0.2  # no rule: unchanged


def test_effective_lr_is_the_rule_on_the_config():
    config = config_from_dict({"lr": 0.2, "optimizer.lr_per_batch": 256, "batch_size": 64})
    assert effective_lr(config.optimizer, 64) == scale_lr(0.2, 64, 256) == pytest.approx(0.05)
    assert effective_lr(config_from_dict({"lr": 0.2}).optimizer, 64) == 0.2


@pytest.mark.parametrize(("n", "batch", "expected"), [
    (1638, 256, 7), (1536, 256, 6), (1537, 256, 7), (10, 256, 1), (0, 64, 1), (5, 1, 5)])
def test_steps_per_epoch_counts_the_last_partial_batch(n, batch, expected):
    assert steps_per_epoch(n, batch) == expected


def test_plan_holds_the_scaled_lr_and_the_steps():
    config = config_from_dict({"lr": 0.2, "optimizer.lr_per_batch": 256, "batch_size": 100,
                               "epochs": 3, "scheduler": "cosine"})
    plan = lr_plan(config, N_TRAIN)
    assert plan.steps_per_epoch == 17 and plan.base_lr == effective_lr(config.optimizer, 100)
    assert plan.schedule.horizon.total_steps == 3 * 17
    assert plan.lr(0) == pytest.approx(plan.base_lr)


# Every registered schedule but plateau (its cuts follow validation losses), one with warmup.
SCHEDULES = [{"scheduler": name} for name in LR_SCHEDULES if name != "plateau"] + [
    {"scheduler": "cosine", "schedule.warmup_epochs": 1.0}]


@pytest.mark.parametrize("settings", SCHEDULES, ids=lambda s: "-".join(map(str, s.values())))
def test_train_applies_the_plan_at_every_step(settings):
    """The lr (and cycled momentum) of each optimizer step `train` takes is the plan's."""
    config = config_from_dict({"dataset": "synthetic", "hidden": [8], "epochs": 3,
                               "batch_size": 100, "lr": 0.2, "optimizer": "nesterov",
                               "optimizer.lr_per_batch": 256, **settings})
    seen: list[tuple[float, float]] = []

    def record(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        seen.append((group["lr"], group["momentum"]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        result = train(config)
    finally:
        handle.remove()
    plan = lr_plan(config, N_TRAIN)
    assert len(seen) == config.epochs * plan.steps_per_epoch == 3 * 17
    assert [lr for lr, _ in seen] == [plan.lr(t) for t in range(len(seen))]
    if plan.schedule.cycles_momentum:
        assert [m for _, m in seen] == [plan.schedule.momentum(t) for t in range(len(seen))]
    assert [m.lr for m in result.history] == [plan.lr((e + 1) * 17 - 1) for e in range(3)]
