"""hpsearch's training engine: datasets, models, inits, optimizers, LR schedules, the loop.

It knows nothing of Optuna or of studies: `search` builds a `TrainConfig` from a trial and
watches progress through `on_epoch`.

Names load on first use: the configuration (`TrainConfig`, `config_from_dict`, the knob names)
imports no torch, so a command that only reads a study's settings starts fast.
"""

# ruff: noqa: F401 - the names under TYPE_CHECKING are this package's, loaded on first use

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainers import _config

# Public name → (the private module that defines it, its name there).
_EXPORTS = {
    "Args": ("_plugins", "Args"),
    "CONFIG_SECTIONS": ("_config", "SECTIONS"),
    "CheckpointStore": ("_checkpoint", "CheckpointStore"),
    "ConfigError": ("_errors", "ConfigError"),
    "DATASETS": ("_data", "DATASETS"),
    "DATASET_GROUP": ("_plugins", "DATASET_GROUP"),
    "Data": ("_data", "Data"),
    "DataConfig": ("_config", "DataConfig"),
    "DataNotFoundError": ("_errors", "DataNotFoundError"),
    "EpochMetrics": ("_results", "EpochMetrics"),
    "INITS": ("_inits", "INITS"),
    "InitConfig": ("_config", "InitConfig"),
    "KNOB_ALIASES": ("_config", "ALIASES"),
    "LRFindResult": ("_lr_find", "LRFindResult"),
    "LRPlan": ("_lr_plan", "LRPlan"),
    "LR_SCHEDULES": ("_schedules", "LR_SCHEDULES"),
    "MODELS": ("_models", "MODELS"),
    "MODEL_GROUP": ("_plugins", "MODEL_GROUP"),
    "ModelConfig": ("_config", "ModelConfig"),
    "OPTIMIZERS": ("_optimizers", "OPTIMIZERS"),
    "OptimizerConfig": ("_config", "OptimizerConfig"),
    "Pack": ("_packed", "Pack"),
    "Schedule": ("_schedules", "Schedule"),
    "Shard": ("_distributed", "Shard"),
    "ScheduleConfig": ("_config", "ScheduleConfig"),
    "StopTraining": ("_results", "StopTraining"),
    "TrainConfig": ("_config", "TrainConfig"),
    "TrainResult": ("_results", "TrainResult"),
    "TrainerError": ("_errors", "TrainerError"),
    "build_optimizer": ("_optimizers", "build_optimizer"),
    "check_names": ("_validate", "check_names"),
    "closest": ("_registry", "closest"),
    "config_from_dict": ("_config", "config_from_dict"),
    "data_for": ("_loop", "data_for"),
    "effective_lr": ("_lr_plan", "effective_lr"),
    "installed_plugins": ("_plugins", "installed"),
    "is_plugin_argument": ("_config", "is_plugin_argument"),
    "knob_names": ("_config", "knob_names"),
    "names_trusted": ("_config", "names_trusted"),
    "load_data": ("_data", "load_data"),
    "load_plugin": ("_plugins", "load_plugin"),
    "lr_plan": ("_lr_plan", "lr_plan"),
    "lr_range_test": ("_lr_find", "lr_range_test"),
    "pack_key": ("_packed", "pack_key"),
    "network_key": ("_packed", "network_key"),
    "pack_refusal": ("_packed", "pack_refusal"),
    "plugin_sections": ("_config", "plugin_sections"),
    "prepare_model": ("_finetune", "prepare_model"),
    "resolve_device": ("_setup", "resolve_device"),
    "scale_lr": ("_lr_plan", "scale_lr"),
    "steps_per_epoch": ("_lr_plan", "steps_per_epoch"),
    "train": ("_loop", "train"),
    "unscale_lr": ("_lr_plan", "unscale_lr"),
}

__all__ = sorted(_EXPORTS)


def _check_names(config: _config.TrainConfig) -> None:
    """The registries' name checks, loaded (with torch) when the first config is built."""
    from trainers._validate import check_names

    check_names(config)


_config.NAME_CHECKS.append(_check_names)


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = where
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # the names above, for type checkers and readers
    from trainers._checkpoint import CheckpointStore
    from trainers._config import ALIASES as KNOB_ALIASES
    from trainers._config import SECTIONS as CONFIG_SECTIONS
    from trainers._config import (
        DataConfig,
        InitConfig,
        ModelConfig,
        OptimizerConfig,
        ScheduleConfig,
        TrainConfig,
        config_from_dict,
        is_plugin_argument,
        knob_names,
        names_trusted,
        plugin_sections,
    )
    from trainers._data import DATASETS, Data, load_data
    from trainers._distributed import Shard
    from trainers._errors import ConfigError, DataNotFoundError, TrainerError
    from trainers._finetune import prepare_model
    from trainers._inits import INITS
    from trainers._loop import data_for, train
    from trainers._lr_find import LRFindResult, lr_range_test
    from trainers._lr_plan import (
        LRPlan,
        effective_lr,
        lr_plan,
        scale_lr,
        steps_per_epoch,
        unscale_lr,
    )
    from trainers._models import MODELS
    from trainers._optimizers import OPTIMIZERS, build_optimizer
    from trainers._packed import Pack, network_key, pack_key, pack_refusal
    from trainers._plugins import DATASET_GROUP, MODEL_GROUP, Args, load_plugin
    from trainers._plugins import installed as installed_plugins
    from trainers._registry import closest
    from trainers._results import EpochMetrics, StopTraining, TrainResult
    from trainers._schedules import LR_SCHEDULES, Schedule
    from trainers._setup import resolve_device
    from trainers._validate import check_names
