"""The study file: every bad file gets one line naming the key path; good files round-trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from search._errors import SearchError, SpecError
from search.spec import (
    SPEC_VERSION,
    base_train_config,
    load_spec,
    parse_spec,
    spec_from_json,
    spec_to_json,
    train_config_for,
)

STUDIES = Path(__file__).resolve().parents[2] / "studies"

GOOD: dict[str, Any] = {
    "name": "test-study",
    "data": {"dataset": "synthetic", "size": 256},
    "model": {"type": "mlp", "hidden": [32]},
    "space": {
        "optimizer": {"choices": ["sgd", "adam"]},
        "lr": {"low": 1.0e-4, "high": 1.0, "log": True},
        "batch_size": {"pow2": [32, 256]},
        "momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
        "weight_decay": {"grid": [0, 1.0e-5, 1.0e-4]},
    },
}

# (id, changes to GOOD's top level, expected key path, fragment of the message)
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("log-low-negative", {"space": {"lr": {"low": -1, "high": 1, "log": True}}},
     "space.lr.low", "expected a positive number for a log range, got -1"),
    ("log-bounds-as-exponents", {"space": {"lr": {"low": -4, "high": -1, "log": True}}},
     "space.lr.low", "did you mean 1.0e-4?"),
    ("low-not-below-high", {"space": {"lr": {"low": 1, "high": 0.1}}},
     "space.lr.high", "expected a number greater than low (1), got 0.1"),
    ("step-does-not-divide", {"space": {"dropout": {"low": 0.0, "high": 0.5, "step": 0.2}}},
     "space.dropout.high", "such as 0.4, got 0.5"),
    ("pow2-not-power", {"space": {"batch_size": {"pow2": [32, 1000]}}},
     "space.batch_size.pow2[1]", "expected a power of two (nearest: 512 or 1024), got 1000"),
    ("pow2-descending", {"space": {"batch_size": {"pow2": [256, 32]}}},
     "space.batch_size.pow2[1]", "greater than 256, got 32"),
    ("unknown-top-level-key", {"smapler": {"type": "tpe"}},
     "smapler", "unknown key, did you mean 'sampler'?"),
    ("unknown-key-in-section", {"budget": {"trails": 5}},
     "budget.trails", "did you mean 'trials'?"),
    ("unknown-key-in-entry", {"space": {"lr": {"low": 0.1, "high": 1, "logg": True}}},
     "space.lr.logg", "did you mean 'log'?"),
    ("mixed-entry-forms", {"space": {"lr": {"low": 0.1, "high": 1, "choices": [0.1]}}},
     "space.lr", "expected a search-space entry"),
    ("constant-in-space", {"space": {"lr": 0.1}},
     "space.lr", "(a constant belongs under fixed), got 0.1"),
    ("unknown-knob-in-space", {"space": {"lrr": {"low": 0.1, "high": 1}}},
     "space.lrr", "unknown trainer setting, did you mean 'lr'?"),
    ("epochs-in-space", {"space": {"epochs": {"low": 1, "high": 5}}},
     "space.epochs", "budget.epochs"),
    ("unknown-optimizer-choice", {"space": {"optimizer": {"choices": ["sgd", "adamm"]}}},
     "space.optimizer.choices[1]", "'adamm'"),
    ("wrong-type-choice",
     {"model": {"type": "mlp"}, "space": {"hidden": {"choices": [[32], [64, "wide"]]}}},
     "space.hidden.choices[1][1]", "expected an integer, got 'wide'"),
    ("float-bound-for-int-knob", {"space": {"batch_size": {"low": 16.5, "high": 64}}},
     "space.batch_size.low", "expected an integer (batch_size is one), got 16.5"),
    ("range-on-list-knob", {"model": {"type": "mlp"}, "space": {"hidden": {"low": 16, "high": 64}}},
     "space.hidden", "use choices"),
    ("budget-trials-wrong-type", {"budget": {"trials": "ten"}},
     "budget.trials", "expected an integer, got 'ten'"),
    ("budget-trials-bool", {"budget": {"trials": True}},
     "budget.trials", "expected an integer, got true"),
    ("budget-trials-zero", {"budget": {"trials": 0}},
     "budget.trials", "expected at least 1, got 0"),
    ("budget-timeout-negative", {"budget": {"timeout_s": -5}},
     "budget.timeout_s", "got -5"),
    ("unknown-sampler", {"sampler": {"type": "tpee"}},
     "sampler.type", "tpe, random, cmaes, gp, qmc, grid, nsga2, or a class by import path "
     "(pkg.module:Class); got 'tpee', did you mean 'tpe'?"),
    ("unknown-sampler-option", {"sampler": {"type": "tpe", "options": {"n_startup_trial": 5}}},
     "sampler.options.n_startup_trial", "did you mean 'n_startup_trials'?"),
    ("unknown-pruner", {"pruner": {"type": "asah"}},
     "pruner.type", "did you mean 'asha'?"),
    ("grid-sampler-float-range", {"sampler": {"type": "grid"}},
     "space.lr", "the grid sampler needs discrete parameters"),
    ("multi-objective-hyperband",
     {"objective": {"metrics": ["val_loss", "epoch_seconds"]}, "pruner": {"type": "hyperband"}},
     "pruner.type", "Optuna cannot prune multi-objective studies; set pruner: {type: none}"),
    ("multi-objective-cmaes",
     {"objective": {"metrics": ["val_loss", "epoch_seconds"]}, "sampler": {"type": "cmaes"}},
     "sampler.type", "CMA-ES"),
    ("unknown-metric", {"objective": {"metric": "val_los"}},
     "objective.metric", "did you mean 'val_loss'?"),
    ("accuracy-minimized", {"objective": {"metric": "val_accuracy", "direction": "minimize"}},
     "objective.direction", "expected maximize for val_accuracy, got 'minimize'"),
    ("directions-length",
     {"objective": {"metrics": ["val_loss", "epoch_seconds"], "directions": ["minimize"]}},
     "objective.directions", "one direction per metric"),
    ("when-unknown-param",
     {"space": {**GOOD["space"], "momentum": {"low": 0.8, "high": 0.9,
                                               "when": {"optimzer": "sgd"}}}},
     "space.momentum.when.optimzer", "did you mean 'optimizer'?"),
    ("when-value-outside-choices",
     {"space": {**GOOD["space"], "momentum": {"low": 0.8, "high": 0.9,
                                               "when": {"optimizer": "nesterov"}}}},
     "space.momentum.when.optimizer", "got 'nesterov'"),
    ("when-on-float-range",
     {"space": {**GOOD["space"], "momentum": {"low": 0.8, "high": 0.9, "when": {"lr": 0.1}}}},
     "space.momentum.when.lr", "a condition needs a discrete parameter"),
    ("when-never-true-on-fixed",
     {"space": {"lr": {"low": 0.1, "high": 1}, "momentum": {"low": 0.8, "high": 0.9,
                                                             "when": {"optimizer": "sgd"}}},
      "fixed": {"optimizer": "adam"}},
     "space.momentum.when.optimizer", "never true: fixed.optimizer is 'adam'"),
    ("when-cycle",
     {"space": {"optimizer": {"choices": ["sgd", "adam"], "when": {"init": "normal"}},
                "init": {"choices": ["normal", "default"], "when": {"optimizer": "sgd"}}}},
     "space.optimizer.when", "optimizer → init → optimizer"),
    ("searched-and-in-model", {"space": {"hidden": {"choices": [[16], [32]]}}},
     "model.hidden", "also searched as space.hidden"),
    ("key-in-space-and-fixed", {"fixed": {"lr": 0.1}},
     "fixed.lr", "also searched as space.lr"),
    ("alias-in-space-and-fixed", {"fixed": {"optimizer.lr": 0.1}},
     "fixed.optimizer.lr", "also searched as space.lr"),
    ("fixed-unknown-knob", {"fixed": {"weight_decy": 0.1}},
     "fixed.weight_decy", "did you mean 'weight_decay'?"),
    ("fixed-bad-value", {"fixed": {"dropout": 1.5}},
     "fixed.dropout", "expected in [0, 1), got 1.5"),
    ("fixed-combination", {"fixed": {"warmup_epochs": 20}, "budget": {"epochs": 5}},
     "fixed.warmup_epochs", "expected fewer than epochs (5), got 20"),
    ("data-unknown-key", {"data": {"datset": "synthetic"}},
     "data.datset", "did you mean 'dataset'?"),
    ("data-bad-value", {"data": {"dataset": "synthetic", "val_fraction": "a fifth"}},
     "data.val_fraction", "expected a number, got 'a fifth'"),
    ("enqueue-unknown-key", {"enqueue": [{"lrr": 0.1}]},
     "enqueue[0].lrr", "did you mean 'lr'?"),
    ("enqueue-out-of-range", {"enqueue": [{"lr": 0.1}, {"lr": 2.0}]},
     "enqueue[1].lr", "expected a number from 0.0001 to 1.0, got 2.0"),
    ("enqueue-not-pow2", {"enqueue": [{"batch_size": 100}]},
     "enqueue[0].batch_size", "expected a power of two from 32 to 256 (nearest: 64 or 128)"),
    ("enqueue-not-a-choice", {"enqueue": [{"optimizer": "adamw"}]},
     "enqueue[0].optimizer", "got 'adamw'"),
    ("enqueue-when-false", {"enqueue": [{"optimizer": "adam", "momentum": 0.9}]},
     "enqueue[0].momentum", "not searched unless optimizer is ['sgd']"),
    ("enqueue-when-undecided", {"enqueue": [{"momentum": 0.9}]},
     "enqueue[0].momentum", "give optimizer too"),
    ("missing-name", {"name": None},
     "name", "required key is missing"),
    ("missing-space", {"space": None},
     "space", "required key is missing"),
    ("empty-space", {"space": {}},
     "space", "expected at least one parameter to search, got {}"),
    ("bad-name-characters", {"name": "my study!"},
     "name", "expected a study name of letters, digits, '-', '_' and '.', got 'my study!'"),
    ("grace-not-above-heartbeat", {"run": {"heartbeat_interval": 10, "grace_period": 10}},
     "run.grace_period", "expected more than heartbeat_interval (10), got 10"),
    ("run-interval-zero", {"run": {"heartbeat_interval": 0}},
     "run.heartbeat_interval", "expected a number greater than 0, got 0"),
    ("within-unknown-key", {"pruner": {"type": "hyperband", "within": ["optimzer"]}},
     "pruner.within[0]", "did you mean 'optimizer'?"),
    ("within-float-range", {"pruner": {"type": "median", "within": ["lr"]}},
     "pruner.within[0]", "a group needs a discrete parameter"),
    ("within-twice", {"pruner": {"type": "median", "within": ["optimizer", "optimizer"]}},
     "pruner.within[1]", "'optimizer' is listed twice"),
    ("within-no-pruner", {"pruner": {"type": "none", "within": ["optimizer"]}},
     "pruner.within", "pruner.type is none"),
    ("section-not-a-mapping", {"budget": [60, 10]},
     "budget", "expected a mapping, got [60, 10]"),
]

def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path

def _with(changes: dict[str, Any]) -> dict[str, Any]:
    data = {**GOOD, **changes}
    return {k: v for k, v in data.items() if v is not None}

def test_bad_cases_are_distinct() -> None:
    assert len(BAD) >= 22
    assert len({case[0] for case in BAD}) == len(BAD)

@pytest.mark.parametrize(("changes", "path", "fragment"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_study_file(tmp_path: Path, changes: dict[str, Any], path: str, fragment: str) -> None:
    file = _write(tmp_path, _with(changes))
    with pytest.raises(SpecError) as caught:
        load_spec(file)
    message = str(caught.value)
    assert caught.value.path == path
    assert message.startswith(f"{file}: {path}: ")
    assert fragment in message
    assert "\n" not in message and "pydantic" not in message.lower()

def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text("name: x\nspace:\n  lr: {low: 0.1, high: 1\n  optimizer: [sgd\n")
    with pytest.raises(SpecError, match=rf"^{file}:\d+:\d+: invalid YAML: "):
        load_spec(file)

def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "dup.yaml"
    file.write_text(yaml.safe_dump(GOOD, sort_keys=False) + "name: again\n")
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        load_spec(file)

def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such study file"):
        load_spec(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(SpecError, match="empty"):
        load_spec(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping of study settings"):
        load_spec(tmp_path / "list.yaml")

def test_errors_form_a_hierarchy() -> None:
    assert issubclass(SpecError, SearchError)
    with pytest.raises(SpecError, match=r"^<spec>: name: "):
        parse_spec(_with({"name": 3}))

def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML reads 1e-4 as a string; a study file means the number.
    text = yaml.safe_dump(GOOD, sort_keys=False).replace("0.0001", "1e-4")
    assert "1e-4" in text
    spec = load_spec(_write_text(tmp_path, text))
    assert spec.space["lr"].low == 1e-4

def _write_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path

def test_defaults_are_filled() -> None:
    spec = parse_spec(GOOD)
    dump = spec.model_dump()
    assert dump["objective"]["metric"] == "val_loss"
    assert dump["objective"]["direction"] == "minimize"
    assert dump["budget"] == {"trials": 60, "epochs": 10, "timeout_s": None}
    assert dump["sampler"] == {"type": "tpe", "seed": 0, "options": {}}
    assert dump["pruner"] == {"type": "hyperband", "options": {}, "within": [], "wrapped": None}
    assert dump["fixed"] == {} and dump["enqueue"] == []
    assert dump["run"] == {"checkpoint_dir": None, "keep_checkpoints": False,
                           "heartbeat_interval": 10, "grace_period": 30,
                           "max_failures_in_row": 5, "pack": None}
    # batch_size is an integer setting, so a plain range on it is an integer range
    spec = parse_spec(_with({"space": {"batch_size": {"low": 16, "high": 512}}}))
    assert spec.space["batch_size"].is_int is True
    assert spec.model_dump()["space"]["batch_size"]["int"] is True

@pytest.mark.parametrize(("metric", "direction"),
                         [("val_loss", "minimize"), ("val_accuracy", "maximize"),
                          ("train_accuracy", "maximize"), ("epoch_seconds", "minimize")])
def test_direction_follows_metric(metric: str, direction: str) -> None:
    spec = parse_spec(_with({"objective": {"metric": metric}}))
    assert spec.objective.direction_names == [direction]
    assert not spec.objective.is_multi

def test_multi_objective_defaults() -> None:
    spec = parse_spec(_with({"objective": {"metrics": ["val_accuracy", "epoch_seconds"]}}))
    assert spec.objective.is_multi
    assert spec.objective.metric_names == ["val_accuracy", "epoch_seconds"]
    assert spec.objective.direction_names == ["maximize", "minimize"]
    assert spec.pruner.type == "none"  # Optuna cannot prune several objectives

def test_json_round_trip_is_stable() -> None:
    data = _with({
        "objective": {"metrics": ["val_loss", "epoch_seconds"]},
        "budget": {"trials": 5, "epochs": 3, "timeout_s": 60},
        "sampler": {"type": "random", "seed": None},
        "fixed": {"init": "xavier_uniform", "schedule.gamma": 0.5},
        "enqueue": [{"optimizer": "sgd", "momentum": 0.9, "batch_size": 64}],
        "run": {"checkpoint_dir": "ckpt", "keep_checkpoints": True},
        "model": {"type": "mlp"},
    })
    data["space"] = {**data["space"], "hidden": {"choices": [[32], [64, 32]]},
                     "dropout": {"low": 0.0, "high": 0.5, "step": 0.1}}
    spec = parse_spec(data)
    text = spec_to_json(spec)
    again = spec_from_json(text)
    assert again == spec
    assert spec_to_json(again) == text
    assert json.loads(text)["version"] == SPEC_VERSION
    assert again.model_dump() == spec.model_dump()

def test_stored_spec_of_another_version_is_refused() -> None:
    stored = json.loads(spec_to_json(parse_spec(GOOD)))
    stored["version"] = SPEC_VERSION + 1
    with pytest.raises(SpecError, match="expected spec version"):
        spec_from_json(json.dumps(stored))
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_from_json("{")

def test_base_train_config_applies_data_model_fixed_and_epochs() -> None:
    spec = parse_spec(_with({
        "fixed": {"init": "xavier_uniform", "schedule.gamma": 0.5, "optimizer": {"eps": 1e-6}},
        "budget": {"epochs": 4},
    }))
    config = base_train_config(spec)
    assert config.data.dataset == "synthetic" and config.data.size == 256
    assert config.model.hidden == (32,)
    assert config.init.name == "xavier_uniform"
    assert config.schedule.gamma == 0.5
    assert config.optimizer.eps == 1e-6
    assert config.epochs == 4
    trial = train_config_for(spec, {"lr": 0.01, "batch_size": 64, "optimizer": "adam"})
    assert (trial.optimizer.lr, trial.batch_size, trial.optimizer.name) == (0.01, 64, "adam")
    assert trial.init.name == "xavier_uniform"

@pytest.mark.parametrize("name", ["fashion_mlp", "fashion_cnn", "smoke"])
def test_shipped_studies_validate(name: str) -> None:
    spec = load_spec(STUDIES / f"{name}.yaml")
    assert spec.name == name.replace("_", "-")
    assert spec_from_json(spec_to_json(spec)) == spec
    base_train_config(spec)


def test_a_joining_workers_seed_salt_wraps_into_numpys_range():
    from search.spec import build_sampler

    spec = parse_spec({"name": "x", "data": {"dataset": "synthetic"}, "model": {},
                       "sampler": {"type": "tpe", "seed": 2**32 - 1},
                       "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}})
    # A pid of 4,000,000 (pid_max on newer Linux) salts by 7919 * pid, far past 2**32.
    build_sampler(spec, salt=7919 * 4_000_000)
