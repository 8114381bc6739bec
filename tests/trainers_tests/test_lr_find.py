"""The LR range test: the ramp, the smoothing, the stop rule and the suggestion rules."""

from __future__ import annotations

import math
import re

import pytest

from trainers import ConfigError, DataNotFoundError, config_from_dict, lr_range_test
from trainers._lr_find import suggest, zero_lag

SYNTH = {"dataset": "synthetic", "hidden": [32], "batch_size": 64, "optimizer": "sgd"}


@pytest.fixture(scope="module")
def sgd_test():
    return lr_range_test(SYNTH, iterations=200)


def test_lr_grows_exponentially_from_start_lr(sgd_test):
    lrs = sgd_test.lrs
    assert lrs[0] == pytest.approx(1e-7)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))
    assert ratios[0] == pytest.approx((10 / 1e-7) ** (1 / 199))


def test_smoothed_is_the_bias_corrected_running_average(sgd_test):
    losses, smoothed = sgd_test.losses, sgd_test.smoothed
    assert smoothed[0] == pytest.approx(losses[0])  # bias-corrected: not 0.02 x the first loss
    avg = 0.0
    for i, value in enumerate(losses):
        avg = 0.98 * avg + 0.02 * value
        assert smoothed[i] == pytest.approx(avg / (1 - 0.98 ** (i + 1)))


def test_stops_once_smoothed_loss_exceeds_four_times_its_minimum(sgd_test):
    assert len(sgd_test.lrs) < 200  # SGD at lr 10 explodes long before the ramp ends
    assert "exceeded 4x its minimum" in sgd_test.stopped
    assert sgd_test.smoothed[-1] > 4 * min(sgd_test.smoothed)
    assert all(s <= 4 * min(sgd_test.smoothed[:i + 1])
               for i, s in enumerate(sgd_test.smoothed[:-1]))


def test_suggestion_follows_the_rule(sgd_test):
    r = sgd_test
    assert r.rule == "minimum" and "max/10" in r.rule_text
    assert r.suggested_max == r.min_loss_lr
    assert r.suggested_min == pytest.approx(r.suggested_max / 10)
    assert r.steepest_lr <= r.min_loss_lr
    assert r.centered[r.lrs.index(r.min_loss_lr)] == min(r.centered)
    steep = lr_range_test(SYNTH, iterations=200, rule="steepest")
    assert steep.suggested_max == steep.steepest_lr == r.steepest_lr  # same seeded run
    assert "falls fastest" in steep.rule_text


def test_zero_lag_curve_has_no_lag():
    step = [2.0] * 100 + [1.0] * 100
    curve = zero_lag(step, tau=5)
    # A step smoothed without lag crosses its midpoint at the step, not tau steps later.
    assert curve[99] == pytest.approx(1.5, abs=0.05) and curve[100] == pytest.approx(1.5, abs=0.05)
    assert zero_lag([3.0] * 50, tau=5) == pytest.approx([3.0] * 50)


def test_suggest_finds_the_steepest_fall_before_the_minimum():
    lrs = [10 ** (-6 + i * 0.05) for i in range(121)]  # 1e-6 .. 1
    # Falls fastest at 1e-3 (a tanh step in log-lr), lowest at 1e-2, then explodes.
    curve = [2 - math.tanh(4 * (math.log10(x) + 3)) + max(0.0, math.log10(x) + 2) ** 2 * 20
             for x in lrs]
    steepest, lowest = suggest(lrs, curve)
    assert steepest == pytest.approx(1e-3, rel=0.13)
    assert lowest == pytest.approx(1e-2, rel=0.13)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"start_lr": 0}, "start_lr: expected a positive number, got 0"),
    ({"end_lr": 1e-8}, "end_lr: expected greater than start_lr"),
    ({"iterations": 5}, "iterations: expected at least 20, got 5"),
    ({"smoothing": 1.0}, "smoothing: expected in [0, 1), got 1.0"),
    ({"stop_factor": 1}, "stop_factor: expected greater than 1, got 1"),
    ({"rule": "valley"}, "rule: expected one of minimum, steepest, got 'valley'"),
])
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        lr_range_test(SYNTH, **kwargs)


def test_adam_range_sits_below_sgd():
    adam = lr_range_test({**SYNTH, "optimizer": "adam"}, iterations=200)
    sgd = lr_range_test(SYNTH, iterations=200)
    assert adam.suggested_max < sgd.suggested_max
    assert adam.optimizer == "adam" and adam.batch_size == 64


@pytest.mark.slow
def test_fashion_mnist_suggestion_brackets_the_hand_tuned_lr():
    """The 784-128-56-10 FashionMNIST MLP with SGD+Nesterov: one-cycle to 0.1 is the known good
    setting (docs/lore.md; one-cycle: Smith 2018, arXiv:1803.09820)."""
    try:
        result = lr_range_test(config_from_dict({"optimizer": "nesterov", "batch_size": 128}))
    except DataNotFoundError:
        pytest.skip("FashionMNIST is not installed here")
    assert result.suggested_min < 0.1 <= result.suggested_max * 2
    assert 0.005 < result.steepest_lr < 0.05
    assert result.seconds > 0  # its duration is shown, not judged: this machine is noisy
