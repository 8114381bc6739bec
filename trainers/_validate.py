"""Name checks against the registries, run whenever a `TrainConfig` is created (outside
`names_trusted`), before any work."""

from __future__ import annotations

from trainers._config import TrainConfig
from trainers._data import check_data_config
from trainers._errors import ConfigError
from trainers._inits import check_init_config
from trainers._models import check_model_config
from trainers._optimizers import OPTIMIZERS
from trainers._registry import unknown_choice_message
from trainers._schedules import CYCLIC_MODES, LR_SCHEDULES


def check_names(config: TrainConfig) -> None:
    """Raise ConfigError naming the value and the choices for any unknown registry name."""
    check_data_config(config.data)
    check_model_config(config.model)
    OPTIMIZERS.get(config.optimizer.name)
    LR_SCHEDULES.get(config.schedule.name)
    if config.schedule.mode not in CYCLIC_MODES:
        raise ConfigError(
            unknown_choice_message("schedule.mode", config.schedule.mode, list(CYCLIC_MODES))
        )
    check_init_config(config.init)

