"""Every schedule's lr (and one-cycle's momentum) follows its closed form at chosen steps."""

from __future__ import annotations

import math

import pytest

from trainers import LR_SCHEDULES, ScheduleConfig, train
from trainers._errors import ConfigError
from trainers._schedules import Schedule

EPOCHS, SPE = 10, 10  # 100 steps in all
T = EPOCHS * SPE


def sched(name: str, **kw) -> Schedule:
    return Schedule(ScheduleConfig(name=name, **kw), epochs=EPOCHS, steps_per_epoch=SPE)


# (schedule, settings, step, expected factor of the base lr)
CLOSED_FORMS = [
    ("constant", {}, 0, 1.0),
    ("constant", {}, 99, 1.0),
    ("step", {"step_size": 3}, 29, 1.0),  # epoch 2: no decay yet
    ("step", {"step_size": 3}, 30, 0.1 ** 1),  # epoch 3: one decay
    ("step", {"step_size": 3, "gamma": 0.5}, 65, 0.5 ** 2),
    ("multistep", {"milestones": (2, 5)}, 19, 1.0),
    ("multistep", {"milestones": (2, 5)}, 20, 0.5),
    ("multistep", {"milestones": (2, 5)}, 55, 0.25),
    ("exponential", {}, 35, 0.9 ** 3),
    ("exponential", {"gamma": 0.1, "floor": 0.01}, 95, 0.01),  # floored
    ("polynomial", {"power": 2.0}, 50, 0.25),
    ("linear", {}, 25, 0.75),
    ("linear", {"final_lr_factor": 0.1}, 50, 0.1 + 0.9 * 0.5),
    ("cosine", {}, 0, 1.0),
    ("cosine", {}, 50, 0.5),
    ("cosine", {}, 100, 0.0),
    ("cosine", {"final_lr_factor": 0.2}, 50, 0.6),
    ("onecycle", {}, 0, 1 / 25),
    ("onecycle", {}, 45, 1.0),  # pct_start 0.45 of 100 steps
    ("onecycle", {}, 90, 1 / 25),  # back down after as many steps again
    ("onecycle", {}, 100, 1 / 25 / 1e4),  # the tail ends far below the start
    ("cyclic", {"cycle_epochs": 1.0}, 0, 0.25),  # half cycle 10 steps, base lr/4
    ("cyclic", {"cycle_epochs": 1.0}, 10, 1.0),
    ("cyclic", {"cycle_epochs": 1.0}, 20, 0.25),
    ("cyclic", {"cycle_epochs": 1.0}, 5, 0.625),
    ("cyclic", {"cycle_epochs": 1.0, "mode": "triangular2"}, 30, 0.25 + 0.75 * 0.5),
    ("plateau", {}, 57, 1.0),
]


@pytest.mark.parametrize(("name", "settings", "step", "expected"), CLOSED_FORMS)
def test_lr_factor_matches_closed_form(name, settings, step, expected):
    assert sched(name, **settings).factor(step) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_every_registered_schedule_has_a_closed_form_case():
    assert {c[0] for c in CLOSED_FORMS} | {"warmup_cosine"} == set(LR_SCHEDULES)


def test_warmup_is_linear_then_hands_over():
    s = sched("cosine", warmup_epochs=2.0)  # 20 warmup steps, then cosine over 80
    assert s.factor(0) == pytest.approx(1 / 20)
    assert s.factor(9) == pytest.approx(10 / 20)
    assert s.factor(19) == pytest.approx(1.0)
    assert s.factor(20 + 40) == pytest.approx(0.5)  # cosine midpoint of its own 80 steps


def test_warmup_cosine_defaults_to_a_tenth_of_the_run():
    s = sched("warmup_cosine")
    assert s.warmup == 10
    assert s.factor(4) == pytest.approx(0.5)
    assert s.factor(10 + 45) == pytest.approx(0.5)


def test_warmup_in_front_of_step_schedule_counts_epochs_after_warmup():
    s = sched("step", warmup_epochs=1.0, step_size=2)
    assert s.factor(10 + 19) == pytest.approx(1.0)
    assert s.factor(10 + 20) == pytest.approx(0.1)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.95), (45, 0.85), (90, 0.95), (99, 0.95),
                                                (22, 0.95 - 0.1 * 22 / 45)])
def test_onecycle_momentum_moves_opposite_to_lr(step, expected):
    assert sched("onecycle").momentum(step) == pytest.approx(expected)


def test_only_onecycle_cycles_momentum():
    for name in LR_SCHEDULES:
        assert (sched(name).momentum(10) is not None) == (name == "onecycle")


def test_plateau_cuts_after_patience():
    s = sched("plateau", factor=0.5, patience=1)
    for loss in (1.0, 0.9, 0.95, 0.95):  # two epochs without improvement > patience 1
        s.end_epoch(loss, base_lr=0.1)
    assert s.factor(50) == pytest.approx(0.5)
    state = s.state_dict()
    again = sched("plateau", factor=0.5, patience=1)
    again.load_state_dict(state)
    assert again.factor(50) == pytest.approx(0.5)


def test_plateau_respects_min_lr():
    s = sched("plateau", factor=0.1, patience=0, min_lr=0.05)
    for loss in (1.0, 1.0, 1.0, 1.0):
        s.end_epoch(loss, base_lr=0.1)
    assert s.factor(0) * 0.1 == pytest.approx(0.05)


def test_bad_cyclic_mode_is_named():
    with pytest.raises(ConfigError, match="triangular3"):
        sched("cyclic", mode="triangular3")


def test_trainer_follows_schedule_per_iteration():
    """The lr the optimizer used in the last step equals the closed form (set before the step)."""
    seen = []
    result = train({"dataset": "synthetic", "hidden": [16], "epochs": 4, "batch_size": 256,
                    "lr": 0.2, "scheduler": "cosine"}, seen.append)
    spe = math.ceil(2048 * 0.8 / 256)
    last = 4 * spe - 1
    expected = 0.2 * 0.5 * (1 + math.cos(math.pi * last / (4 * spe)))
    assert result.history[-1].lr == pytest.approx(expected)


def test_trainer_cycles_momentum_for_onecycle_with_adam():
    seen = []
    train({"dataset": "synthetic", "hidden": [16], "epochs": 2, "optimizer": "adam",
           "lr": 0.01, "scheduler": "onecycle"}, seen.append)
    assert seen[-1].momentum == pytest.approx(0.95)  # in the tail
    assert all(0.85 - 1e-9 <= m.momentum <= 0.95 + 1e-9 for m in seen)
