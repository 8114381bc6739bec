"""hpsearch's training engine: datasets, models, inits, optimizers, LR schedules, the loop.

It knows nothing of Optuna or of studies: `search` builds a `TrainConfig` from a trial and
watches progress through `on_epoch`.
"""

from __future__ import annotations

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
    plugin_sections,
)
from trainers._data import DATASETS, Data, load_data
from trainers._errors import ConfigError, DataNotFoundError, TrainerError
from trainers._finetune import prepare_model
from trainers._inits import INITS
from trainers._loop import (
    EpochMetrics,
    StopTraining,
    TrainResult,
    data_for,
    resolve_device,
    train,
)
from trainers._lr_find import LRFindResult, lr_range_test
from trainers._models import MODELS
from trainers._optimizers import OPTIMIZERS, build_optimizer, effective_lr
from trainers._packed import Pack, pack_key, pack_refusal
from trainers._plugins import DATASET_GROUP, MODEL_GROUP, Args, load_plugin
from trainers._plugins import installed as installed_plugins
from trainers._registry import closest
from trainers._schedules import LR_SCHEDULES, Schedule
from trainers._validate import check_names

__all__ = [
    "CONFIG_SECTIONS",
    "DATASETS",
    "DATASET_GROUP",
    "INITS",
    "KNOB_ALIASES",
    "LR_SCHEDULES",
    "MODEL_GROUP",
    "MODELS",
    "OPTIMIZERS",
    "Args",
    "CheckpointStore",
    "ConfigError",
    "Data",
    "DataConfig",
    "DataNotFoundError",
    "EpochMetrics",
    "InitConfig",
    "LRFindResult",
    "ModelConfig",
    "OptimizerConfig",
    "Pack",
    "Schedule",
    "ScheduleConfig",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "TrainerError",
    "build_optimizer",
    "check_names",
    "closest",
    "config_from_dict",
    "data_for",
    "effective_lr",
    "installed_plugins",
    "is_plugin_argument",
    "knob_names",
    "load_data",
    "load_plugin",
    "lr_range_test",
    "pack_key",
    "pack_refusal",
    "plugin_sections",
    "prepare_model",
    "resolve_device",
    "train",
]
