"""hpsearch's training engine: datasets, models, inits, optimizers, LR schedules, the loop.

It knows nothing of Optuna or of studies: `search` builds a `TrainConfig` from a trial and
watches progress through `on_epoch`.
"""

from __future__ import annotations

from trainers._checkpoint import CheckpointStore
from trainers._config import (
    DataConfig,
    InitConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    knob_names,
)
from trainers._data import DATASETS, Data, load_data
from trainers._errors import ConfigError, DataNotFoundError, TrainerError
from trainers._inits import INITS
from trainers._loop import EpochMetrics, StopTraining, TrainResult, resolve_device, train
from trainers._lr_find import LRFindResult, lr_range_test
from trainers._models import MODELS
from trainers._optimizers import OPTIMIZERS
from trainers._schedules import LR_SCHEDULES

__all__ = [
    "DATASETS",
    "INITS",
    "LR_SCHEDULES",
    "MODELS",
    "OPTIMIZERS",
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
    "ScheduleConfig",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "TrainerError",
    "config_from_dict",
    "knob_names",
    "load_data",
    "lr_range_test",
    "resolve_device",
    "train",
]
