"""Weight-init schemes, applied once to every Linear and Conv layer (nanoGPT's `apply` habit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from trainers._config import InitConfig
from trainers._errors import ConfigError
from trainers._registry import Registry, unknown_choice_message

WeightFn = Callable[[nn.Parameter, InitConfig], None]


@dataclass(frozen=True)
class InitInfo:
    name: str
    weight: WeightFn | None  # None: keep PyTorch's default (Kaiming-uniform, a=sqrt(5))


INITS: Registry[InitInfo] = Registry("init")

KAIMING_MODES = ("fan_in", "fan_out")
NONLINEARITIES = ("relu", "leaky_relu", "tanh", "sigmoid", "linear")

for _info in (
    InitInfo("default", None),
    InitInfo("normal", lambda w, c: nn.init.normal_(w, 0.0, c.std)),
    InitInfo("xavier_uniform", lambda w, c: nn.init.xavier_uniform_(w, gain=c.gain)),
    InitInfo("xavier_normal", lambda w, c: nn.init.xavier_normal_(w, gain=c.gain)),
    InitInfo("kaiming_uniform",
             lambda w, c: nn.init.kaiming_uniform_(w, mode=c.mode, nonlinearity=c.nonlinearity)),
    InitInfo("kaiming_normal",
             lambda w, c: nn.init.kaiming_normal_(w, mode=c.mode, nonlinearity=c.nonlinearity)),
    InitInfo("orthogonal", lambda w, c: nn.init.orthogonal_(w, gain=c.gain)),
):
    INITS.register(_info.name, _info)


def check_init_config(config: InitConfig) -> None:
    INITS.get(config.name)
    if config.mode not in KAIMING_MODES:
        raise ConfigError(unknown_choice_message("init.mode", config.mode, list(KAIMING_MODES)))
    if config.nonlinearity not in NONLINEARITIES:
        raise ConfigError(
            unknown_choice_message("init.nonlinearity", config.nonlinearity, list(NONLINEARITIES))
        )


def apply_init(model: nn.Module, config: InitConfig) -> None:
    """Re-initialize Linear/Conv weights with the scheme and zero their biases."""
    info = INITS.get(config.name)
    if info.weight is None:
        return
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            info.weight(module.weight, config)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
