"""LR schedules as pure functions of the optimizer step (nanoGPT's habit), plus plateau.

Each schedule returns a multiplier of the base lr for step ``t`` (0-based, the step about to be
taken), so the training loop sets ``lr = base_lr * factor(t)`` before each ``optimizer.step()``.
That keeps PyTorch's ordering rule (the scheduler advances *after* the optimizer step) true by
construction, and makes every trajectory checkable against its closed form. Epoch-wise policies
(step, multistep, exponential) change at epoch boundaries; the rest move every iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from trainers._config import ScheduleConfig
from trainers._errors import ConfigError
from trainers._registry import Registry


@dataclass(frozen=True)
class Horizon:
    """Where a schedule runs: its own step count and length, after any warmup."""

    total_steps: int
    steps_per_epoch: int


FactorFn = Callable[[ScheduleConfig, int, Horizon], float]


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    factor: FactorFn
    default_gamma: float | None = None
    default_warmup_fraction: float = 0.0  # warmup_cosine: share of the run spent warming up
    cycles_momentum: bool = False  # onecycle: momentum moves opposite to lr


LR_SCHEDULES: Registry[ScheduleInfo] = Registry("LR schedule")


def _gamma(cfg: ScheduleConfig) -> float:
    gamma = cfg.gamma if cfg.gamma is not None else LR_SCHEDULES.get(cfg.name).default_gamma
    assert gamma is not None  # every schedule that reads gamma registers a default
    return gamma


def _constant(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    return 1.0


def _step(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    return _gamma(cfg) ** ((t // h.steps_per_epoch) // cfg.step_size)


def _multistep(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    epoch = t // h.steps_per_epoch
    return _gamma(cfg) ** sum(1 for m in cfg.milestones if epoch >= m)


def _exponential(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    # d2l's FactorScheduler: decay per epoch, never below the floor.
    return max(_gamma(cfg) ** (t // h.steps_per_epoch), cfg.floor)


def _polynomial(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    end = cfg.final_lr_factor
    return end + (1.0 - end) * (1.0 - min(t, h.total_steps) / h.total_steps) ** cfg.power


def _linear(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    end = cfg.final_lr_factor
    return end + (1.0 - end) * (1.0 - min(t, h.total_steps) / h.total_steps)


def _cosine(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    end = cfg.final_lr_factor
    progress = min(t, h.total_steps) / h.total_steps
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _onecycle_phases(cfg: ScheduleConfig, h: Horizon) -> tuple[float, float]:
    up = max(1.0, cfg.pct_start * h.total_steps)
    return up, min(2.0 * up, float(h.total_steps))


def _onecycle(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    # Smith: linear up from lr/div to lr, linear back down over as many steps, then a short
    # tail annealing far below the start.
    start = 1.0 / cfg.div_factor
    end = start / cfg.final_div_factor
    up, down = _onecycle_phases(cfg, h)
    if t <= up:
        return start + (1.0 - start) * t / up
    if t <= down:
        return 1.0 - (1.0 - start) * (t - up) / (down - up)
    tail = max(1.0, h.total_steps - down)
    return start - (start - end) * min(1.0, (t - down) / tail)


def onecycle_momentum(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    """Momentum cycled opposite to lr: max → base while lr rises, back to max as it falls."""
    hi, lo = cfg.max_momentum, cfg.base_momentum
    up, down = _onecycle_phases(cfg, h)
    if t <= up:
        return hi - (hi - lo) * t / up
    if t <= down:
        return lo + (hi - lo) * (t - up) / (down - up)
    return hi


def _cyclic(cfg: ScheduleConfig, t: int, h: Horizon) -> float:
    # Smith's triangular policy between lr/cycle_div and lr; triangular2 halves each cycle.
    half = max(1.0, cfg.cycle_epochs * h.steps_per_epoch)
    cycle = math.floor(1 + t / (2 * half))
    x = abs(t / half - 2 * cycle + 1)
    scale = 1.0 if cfg.mode == "triangular" else 0.5 ** (cycle - 1)
    base = 1.0 / cfg.cycle_div
    return base + (1.0 - base) * max(0.0, 1.0 - x) * scale


for _info in (
    ScheduleInfo("constant", _constant),
    ScheduleInfo("step", _step, default_gamma=0.1),
    ScheduleInfo("multistep", _multistep, default_gamma=0.5),
    ScheduleInfo("exponential", _exponential, default_gamma=0.9),
    ScheduleInfo("polynomial", _polynomial),
    ScheduleInfo("linear", _linear),
    ScheduleInfo("cosine", _cosine),
    ScheduleInfo("warmup_cosine", _cosine, default_warmup_fraction=0.1),
    ScheduleInfo("onecycle", _onecycle, cycles_momentum=True),
    ScheduleInfo("cyclic", _cyclic),
    # plateau's factor comes from validation loss at epoch ends (see Plateau); per step it is 1.
    ScheduleInfo("plateau", _constant, default_gamma=None),
):
    LR_SCHEDULES.register(_info.name, _info)

CYCLIC_MODES = ("triangular", "triangular2")


def warmup_steps(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> int:
    """Warmup length in steps: the configured epochs, or the schedule's default share."""
    info = LR_SCHEDULES.get(cfg.name)
    warm = cfg.warmup_epochs or info.default_warmup_fraction * epochs
    return min(round(warm * steps_per_epoch), max(0, epochs * steps_per_epoch - 1))


class Schedule:
    """The lr multiplier (and momentum) for every step of one run; plateau keeps a little state."""

    def __init__(self, cfg: ScheduleConfig, *, epochs: int, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.info = LR_SCHEDULES.get(cfg.name)
        if cfg.name == "cyclic" and cfg.mode not in CYCLIC_MODES:
            raise ConfigError(
                f"schedule.mode: expected one of {', '.join(CYCLIC_MODES)}, got {cfg.mode!r}"
            )
        self.warmup = warmup_steps(cfg, epochs, steps_per_epoch)
        self.horizon = Horizon(
            total_steps=max(1, epochs * steps_per_epoch - self.warmup),
            steps_per_epoch=steps_per_epoch,
        )
        self.plateau_scale = 1.0
        self._best = math.inf
        self._bad_epochs = 0

    @property
    def cycles_momentum(self) -> bool:
        return self.info.cycles_momentum

    def factor(self, t: int) -> float:
        """Multiplier of the base lr for step ``t`` (0-based)."""
        if t < self.warmup:
            # Linear warmup (Goyal et al.): reaches the schedule's starting value at the end.
            return (t + 1) / self.warmup * self.info.factor(self.cfg, 0, self.horizon)
        return self.info.factor(self.cfg, t - self.warmup, self.horizon) * self.plateau_scale

    def momentum(self, t: int) -> float | None:
        """The cycled momentum for step ``t``, or None when this schedule leaves it alone."""
        if not self.info.cycles_momentum:
            return None
        return onecycle_momentum(self.cfg, max(0, t - self.warmup), self.horizon)

    def end_epoch(self, val_loss: float, base_lr: float) -> None:
        """Plateau: cut the lr by `factor` after `patience` epochs without a better val loss."""
        if self.cfg.name != "plateau" or math.isnan(val_loss):
            return
        if val_loss < self._best * (1 - 1e-4):  # PyTorch's default relative threshold
            self._best, self._bad_epochs = val_loss, 0
            return
        self._bad_epochs += 1
        if self._bad_epochs > self.cfg.patience:
            floor = self.cfg.min_lr / base_lr if base_lr > 0 else 0.0
            self.plateau_scale = max(self.plateau_scale * self.cfg.factor, floor)
            self._bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.plateau_scale, "best": self._best, "bad": float(self._bad_epochs)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale = float(state["scale"])
        self._best = float(state["best"])
        self._bad_epochs = int(state["bad"])
