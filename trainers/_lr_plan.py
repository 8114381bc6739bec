"""The lr of every step of a run: the base lr under linear scaling, times the schedule's factor.

One home for the rules every consumer of a run's lr needs (the loop, a pack, the lr charts, the
search's conversions between lr units): the linear-scaling rule and its inverse, the number of
optimizer steps in an epoch, and the schedule built from them (`lr_plan`). Light to import (no
torch), so the search side can convert lrs without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainers._config import OptimizerConfig, TrainConfig
from trainers._schedules import Schedule


def scale_lr(lr: float, batch_size: int, per_batch: int | None) -> float:
    """The optimizer's lr at `batch_size` for an `lr` given per `per_batch` examples: the
    linear-scaling rule (Goyal et al. 2017, arXiv:1706.02677); `per_batch` None (or 0) leaves
    `lr` as it is. `unscale_lr` inverts it."""
    if per_batch:
        return lr * batch_size / per_batch
    return lr


def unscale_lr(lr: float, batch_size: int, per_batch: int | None) -> float:
    """The inverse of `scale_lr`: an optimizer's lr at `batch_size` as an lr per `per_batch`
    examples (the units a search space samples it in); `per_batch` None (or 0) leaves it."""
    if per_batch:
        return lr * per_batch / batch_size
    return lr


def effective_lr(config: OptimizerConfig, batch_size: int) -> float:
    """The lr the optimizer uses; with `lr_per_batch` set, scaled linearly by the batch size."""
    return scale_lr(config.lr, batch_size, config.lr_per_batch)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over `n_train` examples: the last batch holds the rest."""
    return max(1, math.ceil(n_train / batch_size))


@dataclass(frozen=True)
class LRPlan:
    """A run's lr at step ``t`` (0-based, over the whole run): ``base_lr * schedule.factor(t)``.

    Plateau's cuts are the one part not known in advance: `schedule` keeps them as the run
    reports validation losses (`Schedule.end_epoch`)."""

    base_lr: float  # the optimizer's lr before the schedule (`effective_lr`)
    steps_per_epoch: int
    schedule: Schedule

    def lr(self, t: int) -> float:
        """The lr of step ``t``, as the loop sets it before that step."""
        return self.base_lr * self.schedule.factor(t)


def lr_plan(config: TrainConfig, n_train: int) -> LRPlan:
    """The lr plan of `config` training on `n_train` examples: what `train` and a pack follow,
    and what a chart of the run's lr redraws (a fresh schedule: no plateau cuts yet)."""
    steps = steps_per_epoch(n_train, config.batch_size)
    return LRPlan(
        base_lr=effective_lr(config.optimizer, config.batch_size),
        steps_per_epoch=steps,
        schedule=Schedule(config.schedule, epochs=config.epochs, steps_per_epoch=steps),
    )
