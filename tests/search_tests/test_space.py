"""The search space, sampled by real Optuna studies (in memory, seeded): bounds, mappings, when."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search._errors import SpecError
from search.spec import (
    StudySpec,
    distributions,
    enqueue_params,
    grid_search_space,
    params_from_optuna,
    parse_spec,
    suggest,
    train_config_for,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE: dict[str, Any] = {
    "optimizer": {"choices": ["sgd", "nesterov", "adam"]},
    "lr": {"low": 1.0e-4, "high": 1.0, "log": True},
    "batch_size": {"pow2": [32, 1024]},
    "momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
    "weight_decay": {"grid": [1.0e-3, 0, 1.0e-5, 1.0e-4, 0.0]},
    "hidden": {"choices": [[32], [64, 32]]},
    "dropout": {"low": 0.0, "high": 0.5, "step": 0.1},
    "schedule.gamma": {"low": 0.1, "high": 0.9, "when": {"scheduler": ["step", "exponential"]}},
}
FIXED: dict[str, Any] = {"scheduler": "step", "init": "xavier_uniform", "eval_batch_size": 512}
N = 200

def _spec(space: dict[str, Any] | None = None, **changes: Any) -> StudySpec:
    return parse_spec({
        "name": "space-test",
        "data": {"dataset": "synthetic"},
        "model": {"type": "mlp"},
        "space": space or SPACE,
        "fixed": FIXED,
        **changes,
    })

@pytest.fixture(scope="module")
def sampled() -> list[tuple[optuna.trial.FrozenTrial, dict[str, Any]]]:
    """N trials of a random search: each finished trial with the params `suggest` returned."""
    spec = _spec()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(N):
        trial = study.ask()
        params = suggest(trial, spec)
        frozen = study.tell(trial, 0.0)
        out.append((frozen, params))
    return out

def test_distributions_map_one_to_one() -> None:
    dists = distributions(_spec())
    assert list(dists) == ["optimizer", "lr", "log2_batch_size", "momentum", "weight_decay",
                           "hidden", "dropout", "schedule.gamma"]
    assert dists["lr"] == FloatDistribution(1e-4, 1.0, log=True)
    assert dists["log2_batch_size"] == IntDistribution(5, 10)
    assert dists["weight_decay"] == CategoricalDistribution([0, 1e-5, 1e-4, 1e-3])
    assert dists["hidden"] == CategoricalDistribution(["32", "64,32"])
    assert dists["dropout"] == FloatDistribution(0.0, 0.5, step=0.1)

def test_recorded_distributions_are_the_declared_ones(sampled: list) -> None:
    dists = distributions(_spec())
    for frozen, _ in sampled:
        for name, dist in frozen.distributions.items():
            assert dists[name] == dist

def test_log_range_stays_in_bounds_and_covers_decades(sampled: list) -> None:
    lrs = [params["lr"] for _, params in sampled]
    assert all(1e-4 <= lr <= 1.0 for lr in lrs)
    decades = Counter(math.floor(math.log10(lr)) for lr in lrs if lr < 1.0)
    assert set(decades) == {-4, -3, -2, -1}
    assert min(decades.values()) > N / 10  # log-uniform: about N/4 each

def test_pow2_gives_powers_of_two_and_records_the_real_value(sampled: list) -> None:
    seen = set()
    for frozen, params in sampled:
        size = params["batch_size"]
        assert size == 2 ** frozen.params["log2_batch_size"]
        assert frozen.user_attrs["batch_size"] == size
        assert "batch_size" not in frozen.params
        seen.add(size)
    assert seen == {32, 64, 128, 256, 512, 1024}

def test_grid_and_step_values_only(sampled: list) -> None:
    decays = Counter(params["weight_decay"] for _, params in sampled)
    assert set(decays) == {0, 1e-5, 1e-4, 1e-3}
    dropouts = {round(params["dropout"], 10) for _, params in sampled}
    assert dropouts == {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}

def test_list_choices_come_back_as_lists(sampled: list) -> None:
    spec = _spec()
    hidden = {tuple(params["hidden"]) for _, params in sampled}
    assert hidden == {(32,), (64, 32)}
    _, params = sampled[0]
    assert train_config_for(spec, params).model.hidden == tuple(params["hidden"])

def test_conditional_momentum_only_with_sgd(sampled: list) -> None:
    with_sgd = 0
    for frozen, params in sampled:
        is_sgd = params["optimizer"] == "sgd"
        assert ("momentum" in params) == is_sgd == ("momentum" in frozen.params)
        with_sgd += is_sgd
        if is_sgd:
            assert 0.8 <= params["momentum"] <= 0.99
    assert 0 < with_sgd < N

def test_condition_on_a_fixed_setting(sampled: list) -> None:
    # fixed scheduler: step satisfies schedule.gamma's `when`, so it is always sampled
    assert all("schedule.gamma" in params for _, params in sampled)

def test_fixed_values_land_in_the_trial_config(sampled: list) -> None:
    spec = _spec()
    for _, params in sampled[:20]:
        config = train_config_for(spec, params)
        assert config.init.name == "xavier_uniform"
        assert config.schedule.name == "step"
        assert config.eval_batch_size == 512
        assert config.batch_size == params["batch_size"]
        assert config.optimizer.lr == params["lr"]
        assert config.optimizer.name == params["optimizer"]

def test_params_from_optuna_inverts_the_trial(sampled: list) -> None:
    spec = _spec()
    for frozen, params in sampled:
        assert params_from_optuna(spec, frozen.params) == params

@pytest.mark.parametrize("flat", [
    {"optimizer": "sgd", "lr": 0.1, "batch_size": 128, "momentum": 0.9},
    {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0, "hidden": [64, 32], "dropout": 0.2},
    {"batch_size": 1024, "schedule.gamma": 0.5, "weight_decay": 1e-4},
])
def test_enqueue_params_and_params_from_optuna_invert_each_other(flat: dict[str, Any]) -> None:
    spec = _spec()
    optuna_params = enqueue_params(spec, flat)
    assert "batch_size" not in optuna_params
    assert params_from_optuna(spec, optuna_params) == flat
    assert enqueue_params(spec, params_from_optuna(spec, optuna_params)) == optuna_params

def test_enqueued_trial_is_sampled_as_given() -> None:
    spec = _spec()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    flat = {"optimizer": "sgd", "lr": 0.05, "batch_size": 64, "momentum": 0.95,
            "hidden": [64, 32]}
    study.enqueue_trial(enqueue_params(spec, flat))
    trial = study.ask()
    params = suggest(trial, spec)
    assert {k: params[k] for k in flat} == flat
    assert trial.user_attrs["batch_size"] == 64

def test_enqueue_errors_name_the_key() -> None:
    spec = _spec()
    with pytest.raises(SpecError, match=r"^enqueue\.init: held constant by fixed\.init"):
        enqueue_params(spec, {"init": "normal"})
    with pytest.raises(SpecError, match=r"^retry\.batch_size: expected a power of two"):
        enqueue_params(spec, {"batch_size": 48}, path="retry")
    with pytest.raises(SpecError, match=r"dropout: expected a number from 0.0 to 0.5 in steps"):
        enqueue_params(spec, {"dropout": 0.25})
    with pytest.raises(SpecError, match="not in study 'space-test'"):
        params_from_optuna(spec, {"batch_size": 64})

def test_int_range_for_an_integer_setting() -> None:
    spec = _spec({"batch_size": {"low": 16, "high": 512, "step": 16}, "lr": SPACE["lr"]})
    assert distributions(spec)["batch_size"] == IntDistribution(16, 512, step=16)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = suggest(study.ask(), spec)
        assert isinstance(params["batch_size"], int) and params["batch_size"] % 16 == 0

def test_explicit_int_range_on_a_float_setting() -> None:
    spec = _spec({"warmup_epochs": {"low": 0, "high": 3, "int": True}})
    assert distributions(spec)["warmup_epochs"] == IntDistribution(0, 3)

def test_grid_sampler_walks_the_whole_grid() -> None:
    space = {"optimizer": {"choices": ["sgd", "adam"]}, "batch_size": {"pow2": [32, 128]},
             "weight_decay": {"grid": [0, 1e-4]}}
    spec = _spec(space, sampler={"type": "grid"})
    grid = grid_search_space(spec)
    assert grid == {"optimizer": ["sgd", "adam"], "log2_batch_size": [5, 6, 7],
                    "weight_decay": [0, 1e-4]}
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = set()

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec)
        seen.add((params["optimizer"], params["batch_size"], params["weight_decay"]))
        return 0.0

    study.optimize(objective, n_trials=20)  # the grid sampler stops the study when done
    assert len(study.trials) == len(seen) == 12

def test_tpe_handles_the_conditional_space() -> None:
    spec = _spec()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    for i in range(15):
        trial = study.ask()
        params = suggest(trial, spec)
        study.tell(trial, params["lr"] + i * 1e-3)
    assert ("momentum" in study.best_trial.params) == (study.best_params["optimizer"] == "sgd")

def test_chained_conditions_are_sampled_in_order() -> None:
    # declared before the parameters they depend on; inactive parents switch children off
    space = {
        "schedule.gamma": {"low": 0.1, "high": 0.9, "when": {"scheduler": "step"}},
        "scheduler": {"choices": ["step", "cosine"], "when": {"optimizer": "sgd"}},
        "optimizer": {"choices": ["sgd", "adam"]},
    }
    spec = parse_spec({"name": "chain", "data": {"dataset": "synthetic"}, "model": {},
                       "space": space})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    kinds = Counter()
    for _ in range(60):
        params = suggest(study.ask(), spec)
        assert list(params) == [k for k in space if k in params]  # space order
        if params["optimizer"] == "adam":
            assert set(params) == {"optimizer"}
        elif params["scheduler"] == "cosine":
            assert "schedule.gamma" not in params
        kinds[tuple(params)] += 1
    assert len(kinds) == 3
