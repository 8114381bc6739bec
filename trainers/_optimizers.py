"""Optimizers: one registry of frozen entries (timm's OptimInfo habit) and one factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainers._config import OptimizerConfig
from trainers._errors import ConfigError
from trainers._registry import Registry


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: Callable[[OptimizerConfig], dict[str, Any]]
    momentum_key: str | None = None  # where cycled momentum goes: "momentum", "betas" or None


OPTIMIZERS: Registry[OptimInfo] = Registry("optimizer")


def _betas(c: OptimizerConfig) -> dict[str, Any]:
    return {"betas": (c.beta1, c.beta2), "eps": c.eps}


for _info in (
    OptimInfo("sgd", torch.optim.SGD,
              lambda c: {"momentum": c.momentum, "nesterov": c.nesterov and c.momentum > 0},
              momentum_key="momentum"),
    # SGD+Nesterov as its own name, so a search space can choose it like any optimizer.
    OptimInfo("nesterov", torch.optim.SGD,
              lambda c: {"momentum": c.momentum, "nesterov": c.momentum > 0},
              momentum_key="momentum"),
    OptimInfo("adam", torch.optim.Adam, lambda c: {**_betas(c), "amsgrad": c.amsgrad},
              momentum_key="betas"),
    OptimInfo("amsgrad", torch.optim.Adam, lambda c: {**_betas(c), "amsgrad": True},
              momentum_key="betas"),
    # AdamW decouples weight decay from the gradient step (Loshchilov & Hutter): not L2-in-Adam.
    OptimInfo("adamw", torch.optim.AdamW, lambda c: {**_betas(c), "amsgrad": c.amsgrad},
              momentum_key="betas"),
    OptimInfo("rmsprop", torch.optim.RMSprop,
              lambda c: {"alpha": c.alpha, "eps": c.eps, "momentum": 0.0}),
    OptimInfo("adagrad", torch.optim.Adagrad, lambda c: {"eps": 1e-10}),
    OptimInfo("adadelta", torch.optim.Adadelta, lambda c: {"rho": c.rho, "eps": 1e-6}),
):
    OPTIMIZERS.register(_info.name, _info)


def param_groups(model: nn.Module, weight_decay: float, *, decay_all: bool = False
                 ) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels only: biases and norm scales are 1-D (nanoGPT's rule)."""
    return _split_decay([p for p in model.parameters() if p.requires_grad], weight_decay,
                        decay_all=decay_all)


def _split_decay(params: list[nn.Parameter], weight_decay: float, *, decay_all: bool
                 ) -> list[dict[str, Any]]:
    if decay_all or weight_decay == 0:  # one group: one fused update per step, not two
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


ROLES = ("all", "body", "head", "unfrozen")


def role_groups(model: nn.Module, config: OptimizerConfig, *,
                head: frozenset[str] = frozenset(), frozen: frozenset[str] = frozenset(),
                unfreezes: bool = False) -> list[dict[str, Any]]:
    """Parameter groups by role, each with its lr multiplier (``lr_mult``) and weight decay.

    ``head``: the classifier, at ``head_lr_mult`` and ``head_weight_decay`` (merged into the
    body when both equal the body's). ``unfrozen``: the frozen parameters, present only when
    they will train later (``unfreezes``), at ``unfrozen_lr_mult``; until then they have no
    gradients, so the optimizer skips them. The rest is ``body`` (``all`` with no head group).
    """
    head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    split_head = config.head_lr_mult != 1 or head_wd != config.weight_decay
    settings = {"all": (1.0, config.weight_decay), "body": (1.0, config.weight_decay),
                "head": (config.head_lr_mult, head_wd),
                "unfrozen": (config.unfrozen_lr_mult, config.weight_decay)}
    members: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():
        if name in frozen:
            if unfreezes:
                members["unfrozen"].append(p)
        elif name in head and split_head:
            members["head"].append(p)
        else:
            members["body" if split_head else "all"].append(p)
    groups = []
    for role, params in members.items():
        if params:
            mult, wd = settings[role]
            for group in _split_decay(params, wd, decay_all=config.decay_all):
                groups.append({**group, "lr_mult": mult, "role": role})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig, *, lr: float,
                    head: frozenset[str] = frozenset(), frozen: frozenset[str] = frozenset(),
                    unfreezes: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameters by role (`role_groups`) at `lr`."""
    info = OPTIMIZERS.get(config.name)
    groups = role_groups(model, config, head=head, frozen=frozen, unfreezes=unfreezes)
    if not groups:
        raise ConfigError("model.freeze: every parameter is frozen and none unfreezes: nothing "
                          "would train (freeze fewer blocks, or set model.unfreeze_after)")
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    kwargs = info.kwargs(config)
    if all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]):
        # On CUDA a small model's step is bound by kernel launches: the fused update is one
        # launch for all parameters where the default (foreach) is several.
        try:
            return info.cls(groups, lr=lr, fused=True, **kwargs)
        except (TypeError, RuntimeError, ValueError):  # no fused form of this one
            pass
    return info.cls(groups, lr=lr, **kwargs)


def keep_implementation(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)` keeping this optimizer's fused/foreach choice: a
    checkpoint written on a GPU may resume on a CPU, where the fused update may not exist."""
    chosen = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen, strict=True):
        group.update(flags)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each role (the decay/no-decay halves of a role share it)."""
    return {g.get("role", "all"): float(g["lr"]) for g in optimizer.param_groups}


def set_momentum(optimizer: torch.optim.Optimizer, info: OptimInfo, value: float) -> None:
    """Write a cycled momentum into every group (beta1 for the Adam family)."""
    for group in optimizer.param_groups:
        if info.momentum_key == "momentum":
            group["momentum"] = value
        elif info.momentum_key == "betas":
            group["betas"] = (value, group["betas"][1])


def current_momentum(optimizer: torch.optim.Optimizer, info: OptimInfo) -> float | None:
    group = optimizer.param_groups[0]
    if info.momentum_key == "momentum":
        return float(group["momentum"])
    if info.momentum_key == "betas":
        return float(group["betas"][0])
    return None
