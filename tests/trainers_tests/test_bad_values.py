"""Every numeric setting has a range, checked when the config is made, not in every trial.

One bad value per setting must be a `ConfigError` whose one-line message starts with the key
(`model.hidden[0]: expected …`), which the study-file layer re-addresses to the study's key; one
good value per setting must pass. A new numeric field without a case here fails
`test_every_numeric_setting_has_cases`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

import pytest

from trainers import DATASETS, ConfigError, DataConfig, TrainConfig, config_from_dict
from trainers._config import SECTIONS
from trainers._data import check_data_config

IMAGES = {"data.dataset": "image_folder", "data.root": "images"}  # not read when checking

# (setting, a bad value, the key its message starts with, other settings the case needs)
BAD: list[tuple[str, Any, str, dict[str, Any]]] = [
    ("batch_size", 0, "batch_size", {}),
    ("epochs", 0, "epochs", {}),
    ("eval_batch_size", 0, "eval_batch_size", {}),
    ("seed", 2 ** 64, "seed", {}),  # past torch.manual_seed's range
    ("threads", 0, "threads", {}),
    ("divergence_factor", 1.0, "divergence_factor", {}),
    ("max_grad_norm", -1.0, "max_grad_norm", {}),
    ("max_grad_norm", 0.0, "max_grad_norm", {}),
    ("data.val_fraction", 1.0, "data.val_fraction", {}),
    ("data.seed", -(2 ** 63) - 1, "data.seed", {}),
    ("data.classes", [3, 12], "data.classes[1]", {}),  # the built-in datasets have 10
    ("data.classes", [-1, 2], "data.classes[0]", {}),
    ("data.classes", [3, 12], "data.classes[1]", {"data.dataset": "synthetic"}),
    ("data.classes", [-1, 2], "data.classes[0]", IMAGES),  # its classes are known only later
    ("data.classes", [3, 5, 3], "data.classes[2]", {}),
    ("data.classes", [3], "data.classes", {}),
    ("data.train_subset", 0, "data.train_subset", {}),
    ("data.size", 0, "data.size", {"data.dataset": "synthetic"}),
    ("data.resize", [0], "data.resize", IMAGES),
    ("data.channels", 2, "data.channels", IMAGES),
    ("data.num_workers", -1, "data.num_workers", {}),
    ("model.hidden", [-5], "model.hidden[0]", {}),
    ("model.hidden", [64, 0], "model.hidden[1]", {}),
    ("model.dropout", 1.0, "model.dropout", {}),
    ("model.widths", [16, 0], "model.widths[1]", {"model.type": "cnn"}),
    ("model.widths", [], "model.widths", {"model.type": "cnn"}),
    ("model.blocks", 0, "model.blocks", {"model.type": "cnn"}),
    ("model.freeze_blocks", -1, "model.freeze_blocks", {}),
    ("model.unfreeze_after", 0, "model.unfreeze_after", {}),
    ("optimizer.lr", 0.0, "optimizer.lr", {}),
    ("optimizer.momentum", 1.0, "optimizer.momentum", {}),
    ("optimizer.momentum", -0.1, "optimizer.momentum", {}),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay", {}),
    ("optimizer.beta1", 1.0, "optimizer.beta1", {}),
    ("optimizer.beta2", -0.5, "optimizer.beta2", {}),
    ("optimizer.eps", 0.0, "optimizer.eps", {}),
    ("optimizer.alpha", 1.0, "optimizer.alpha", {}),
    ("optimizer.rho", 1.5, "optimizer.rho", {}),
    ("optimizer.lr_per_batch", 0, "optimizer.lr_per_batch", {}),
    ("optimizer.head_lr_mult", 0.0, "optimizer.head_lr_mult", {}),
    ("optimizer.head_weight_decay", -0.1, "optimizer.head_weight_decay", {}),
    ("optimizer.unfrozen_lr_mult", -1.0, "optimizer.unfrozen_lr_mult", {}),
    ("schedule.warmup_epochs", -1.0, "schedule.warmup_epochs", {}),
    ("schedule.warmup_epochs", 10.0, "schedule.warmup_epochs", {"epochs": 10}),
    ("schedule.step_size", 0, "schedule.step_size", {}),
    ("schedule.milestones", [0, 10], "schedule.milestones[0]", {}),
    ("schedule.milestones", [30, 15], "schedule.milestones[1]", {}),
    ("schedule.milestones", [15, 15], "schedule.milestones[1]", {}),
    ("schedule.gamma", 0.0, "schedule.gamma", {}),
    ("schedule.gamma", 1.5, "schedule.gamma", {}),
    ("schedule.floor", 1.5, "schedule.floor", {}),
    ("schedule.power", 0.0, "schedule.power", {}),
    ("schedule.final_lr_factor", -0.1, "schedule.final_lr_factor", {}),
    ("schedule.pct_start", 0.0, "schedule.pct_start", {}),
    ("schedule.pct_start", 1.0, "schedule.pct_start", {}),
    ("schedule.div_factor", 0.5, "schedule.div_factor", {}),
    ("schedule.final_div_factor", 0.0, "schedule.final_div_factor", {}),
    ("schedule.max_momentum", 1.0, "schedule.max_momentum", {}),
    ("schedule.base_momentum", -0.1, "schedule.base_momentum", {}),
    ("schedule.base_momentum", 0.97, "schedule.base_momentum", {}),  # above max_momentum 0.95
    ("schedule.cycle_epochs", 0.0, "schedule.cycle_epochs", {}),
    ("schedule.cycle_div", 0.5, "schedule.cycle_div", {}),
    ("schedule.factor", 1.0, "schedule.factor", {}),
    ("schedule.factor", 0.0, "schedule.factor", {}),
    ("schedule.patience", -1, "schedule.patience", {}),
    ("schedule.min_lr", -1e-6, "schedule.min_lr", {}),
    ("init.std", 0.0, "init.std", {}),
    ("init.gain", -1.0, "init.gain", {}),
]

# (setting, a good value, other settings it needs): typical values, and the edges that must
# stay valid (no weight decay, no warmup, no momentum, a gamma of 1, …).
GOOD: list[tuple[str, Any, dict[str, Any]]] = [
    ("batch_size", 1, {}),
    ("epochs", 1, {}),
    ("eval_batch_size", 512, {}),
    ("seed", 0, {}),
    ("seed", -1, {}),  # torch remaps negative seeds
    ("threads", 1, {}),
    ("divergence_factor", 1e9, {}),
    ("max_grad_norm", 1.0, {}),
    ("data.val_fraction", 0.0, {}),
    ("data.seed", 2 ** 64 - 1, {}),
    ("data.classes", [0, 9], {}),
    ("data.classes", [7, 3, 0], {"data.dataset": "synthetic"}),
    ("data.classes", [3, 12], IMAGES),  # checked against the folders when they are read
    ("data.train_subset", 1, {}),
    ("data.size", 100, {"data.dataset": "synthetic"}),
    ("data.resize", [32, 24], IMAGES),
    ("data.channels", 3, IMAGES),
    ("data.num_workers", 0, {}),
    ("model.hidden", [512, 256], {}),
    ("model.hidden", [], {}),  # a linear classifier
    ("model.dropout", 0.5, {}),
    ("model.widths", [16, 32, 64], {"model.type": "cnn"}),
    ("model.widths", [], {}),  # an mlp does not read it
    ("model.blocks", 2, {"model.type": "cnn"}),
    ("model.freeze_blocks", 0, {}),
    ("model.unfreeze_after", 1, {}),
    ("optimizer.lr", 1e-5, {}),
    ("optimizer.momentum", 0.0, {}),
    ("optimizer.weight_decay", 0.0, {}),
    ("optimizer.beta1", 0.0, {}),
    ("optimizer.beta2", 0.98, {}),
    ("optimizer.eps", 1e-6, {}),
    ("optimizer.alpha", 0.9, {}),
    ("optimizer.rho", 0.95, {}),
    ("optimizer.lr_per_batch", 256, {}),
    ("optimizer.head_lr_mult", 10.0, {}),
    ("optimizer.head_weight_decay", 0.0, {}),
    ("optimizer.unfrozen_lr_mult", 0.1, {}),
    ("schedule.warmup_epochs", 0.0, {}),
    ("schedule.warmup_epochs", 0.5, {"epochs": 1}),
    ("schedule.step_size", 1, {}),
    ("schedule.milestones", [1, 2, 40], {}),  # past the last epoch: no effect, no harm
    ("schedule.milestones", [], {}),
    ("schedule.gamma", 1.0, {}),
    ("schedule.floor", 0.0, {}),
    ("schedule.power", 0.5, {}),
    ("schedule.final_lr_factor", 1.0, {}),
    ("schedule.pct_start", 0.3, {}),
    ("schedule.div_factor", 1.0, {}),
    ("schedule.final_div_factor", 1.0, {}),
    ("schedule.max_momentum", 0.85, {"schedule.base_momentum": 0.85}),
    ("schedule.base_momentum", 0.0, {}),
    ("schedule.cycle_epochs", 0.5, {}),
    ("schedule.cycle_div", 1.0, {}),
    ("schedule.factor", 0.1, {}),
    ("schedule.patience", 0, {}),
    ("schedule.min_lr", 0.0, {}),
    ("init.std", 0.02, {}),
    ("init.gain", 2.0, {}),
]

# Numeric settings whose every value of the right type is valid: none so far (even a seed has
# torch's range). A setting goes here only when no value can fail a trial.
ANY_VALUE: frozenset[str] = frozenset()


def _numeric_settings() -> list[str]:
    """Dotted names of every int, float or tuple-of-int field (optional or not)."""
    def numeric(hint: Any) -> bool:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if args and typing.get_origin(hint) is not tuple:  # an Optional: look inside
            return len(args) == 1 and numeric(args[0])
        if typing.get_origin(hint) is tuple:
            return typing.get_args(hint)[0] is int
        return hint in (int, float)

    names = []
    for section, prefix in [(TrainConfig, ""), *[(cls, f"{n}.") for n, cls in SECTIONS.items()]]:
        hints = typing.get_type_hints(section)
        names += [prefix + f.name for f in dataclasses.fields(section) if numeric(hints[f.name])]
    return names


def _case_id(setting: str, value: Any, *_: Any) -> str:
    return f"{setting}={value!r}"


@pytest.mark.parametrize(("setting", "value", "where", "others"),
                         [pytest.param(*c, id=_case_id(*c)) for c in BAD])
def test_a_bad_value_fails_at_construction_naming_its_key(setting: str, value: Any, where: str,
                                                          others: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: expected ") as err:
        config_from_dict({**others, setting: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("setting", "value", "others"),
                         [pytest.param(*c, id=_case_id(*c)) for c in GOOD])
def test_a_good_value_is_accepted(setting: str, value: Any, others: dict[str, Any]) -> None:
    config = config_from_dict({**others, setting: value})
    got: Any = config
    for part in setting.split("."):
        got = getattr(got, part)
    assert got == (tuple(value) if isinstance(value, list) else value)


def test_every_numeric_setting_has_cases() -> None:
    numeric = set(_numeric_settings())
    assert {"model.hidden", "optimizer.beta1", "data.classes", "max_grad_norm"} <= numeric
    bad, good = {c[0] for c in BAD}, {c[0] for c in GOOD}
    assert sorted(numeric - ANY_VALUE - bad) == [], "a numeric setting without a bad value"
    assert sorted(numeric - good) == [], "a numeric setting without a good value"
    assert (bad | good | ANY_VALUE) <= numeric  # no case for a setting that is gone


@pytest.mark.parametrize("name", [n for n in DATASETS.names()
                                  if DATASETS.get(n).num_classes is not None])
def test_classes_of_a_builtin_dataset_are_checked_without_its_files(
        name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    k = DATASETS.get(name).num_classes
    monkeypatch.setenv("HPSEARCH_DATA", str(tmp_path))  # nothing there: it must not be needed
    check_data_config(DataConfig(dataset=name, classes=(0, k - 1)))
    expected = rf"^data\.classes\[1\]: expected a label in 0\.\.{k - 1}, got {k}$"
    with pytest.raises(ConfigError, match=expected):
        check_data_config(DataConfig(dataset=name, classes=(0, k)))


def test_a_known_number_of_classes_is_what_loading_finds() -> None:
    info = DATASETS.get("synthetic")
    assert info.load(DataConfig(dataset="synthetic")).num_classes == info.num_classes
