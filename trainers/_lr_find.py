"""Leslie Smith's LR range test: one short run with the lr growing exponentially each step.

The loss first falls slowly, then fast, then explodes. The run keeps fastai's bias-corrected
exponential moving average of the loss and stops once it exceeds `stop_factor` times its minimum
(Lightning's `early_stop_threshold=4.0`).

That running average lags: at the default 0.98 it averages ~50 steps, 1.3 decades of lr on a
300-step ramp over 8 decades, so its minimum sits far right of the real one. The suggestion is
therefore read off a zero-lag curve (the same kind of average run forwards and then backwards,
over about a tenth of a decade of lr):

- rule "minimum" (the default): max lr = the lr at that curve's minimum, the largest lr at which
  the loss still falls, just before it turns up (Smith's max lr for one-cycle); min lr = max/10,
  one order of magnitude below (Smith: max/10-20 for one-cycle).
- rule "steepest": max lr = where the curve falls fastest against log10(lr), looked for only
  before its minimum (Lightning's suggestion; more conservative); min lr = max/10.

On the everyday 784-128-56-10 FashionMNIST MLP (docs/lore.md) the two are about an order of
magnitude apart, and the hand-tuned lrs (SGD with Nesterov one-cycle to 0.1, Adam 3e-3) sit at
the "minimum" suggestion.

Only the training split is used: the test split is never loaded here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers._config import TrainConfig, config_from_dict
from trainers._errors import ConfigError
from trainers._finetune import FrozenParts
from trainers._optimizers import build_optimizer
from trainers._setup import network_and_data

Batch = tuple[torch.Tensor, torch.Tensor]

RULES = ("minimum", "steepest")
MIN_DIVISOR = 10.0  # min lr = max lr / this: one order of magnitude
CENTERED_DECADES = 0.1  # time constant of the zero-lag curve, in decades of lr


@dataclass(frozen=True)
class LRFindResult:
    """The curve of one range test and what it suggests (lrs are the optimizer's own lr)."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]  # raw per-batch training loss
    smoothed: tuple[float, ...]  # bias-corrected running average (the stop rule's)
    centered: tuple[float, ...]  # the zero-lag curve the suggestion is read from
    suggested_max: float
    suggested_min: float
    steepest_lr: float  # where the centered curve falls fastest (before its minimum)
    min_loss_lr: float  # where the centered curve is lowest
    rule: str  # "minimum" or "steepest"
    rule_text: str  # the rule in words, for output
    stopped: str  # why the run ended
    optimizer: str
    batch_size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_range_test(
    config: TrainConfig | dict[str, Any],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    iterations: int = 300,
    smoothing: float = 0.98,
    stop_factor: float = 4.0,
    rule: str = "minimum",
    on_step: Callable[[int, float, float], None] | None = None,
) -> LRFindResult:
    """Run the LR range test for `config` (model, data, optimizer, batch size, init, seed).

    The lr goes from `start_lr` to `end_lr` exponentially over `iterations` optimizer steps
    (the config's schedule and lr are ignored; momentum, weight decay and betas are the
    config's). `rule` picks the suggestion (see the module docstring). `on_step(i, lr,
    smoothed_loss)` sees every step.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    _check(start_lr, end_lr, iterations, smoothing, stop_factor, rule)
    started = time.perf_counter()
    model, optimizer, batches, batch = _start(config, start_lr)
    ratio = (end_lr / start_lr) ** (1.0 / (iterations - 1))
    lrs, losses, smoothed, stopped = _ramp(
        model, optimizer, batches, [start_lr * ratio**i for i in range(iterations)],
        max_grad_norm=config.max_grad_norm, smoothing=smoothing, stop_factor=stop_factor,
        on_step=on_step)
    stopped = stopped or f"reached end_lr {end_lr:g} after {iterations} steps"
    if len(lrs) < 10:
        raise ConfigError(f"lr range test: the loss exploded within {len(lrs)} steps "
                          f"(start_lr {start_lr:g}); lower start_lr")
    steps_per_decade = 1.0 / math.log10(ratio)
    centered = zero_lag(losses, tau=CENTERED_DECADES * steps_per_decade)
    steepest, lowest = suggest(lrs, centered)
    if lowest == lrs[-1]:
        stopped += " (the loss was still falling: raise end_lr)"
    top = lowest if rule == "minimum" else steepest
    return LRFindResult(
        lrs=tuple(lrs),
        losses=tuple(losses),
        smoothed=tuple(smoothed),
        centered=tuple(centered),
        suggested_max=top,
        suggested_min=top / MIN_DIVISOR,
        steepest_lr=steepest,
        min_loss_lr=lowest,
        rule=rule,
        rule_text=f"{rule}: max lr {_WHERE[rule]}; min lr = max/{MIN_DIVISOR:g}",
        stopped=stopped,
        optimizer=config.optimizer.name,
        batch_size=batch,
        seconds=time.perf_counter() - started,
    )


# Where each rule reads the max lr off the curve, in words (`LRFindResult.rule_text`).
_WHERE = {
    "minimum": "at the minimum of the smoothed loss (zero-lag), just before it turns up",
    "steepest": "where the smoothed loss (zero-lag) falls fastest against log10(lr), before "
                "its minimum",
}


def _start(config: TrainConfig, start_lr: float
           ) -> tuple[nn.Module, torch.optim.Optimizer, Iterator[Batch], int]:
    """The network as training starts it (weights loaded, frozen parts frozen: the range test
    of a fine-tune is the range test of what trains in its first epochs), its optimizer at
    `start_lr`, an endless stream of full batches and their size."""
    device, data, prepared = network_and_data(config)  # train/val only: never the test split
    model = prepared.model
    model.to(device).train()
    FrozenParts(model, prepared.frozen, config.model).start_epoch(0)
    optimizer = build_optimizer(model, config.optimizer, lr=start_lr, head=prepared.head,
                                frozen=prepared.frozen)
    order = torch.Generator().manual_seed(config.seed)
    n = len(data.train)
    batch = min(config.batch_size, n)

    def batches() -> Iterator[Batch]:
        while True:  # full batches only; each pass over the data reshuffles, as training would
            perm = torch.randperm(n, generator=order)
            yield from data.train.batches(perm[: n - n % batch], batch)

    return model, optimizer, batches(), batch


def _ramp(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
          schedule: list[float], *, max_grad_norm: float | None, smoothing: float,
          stop_factor: float, on_step: Callable[[int, float, float], None] | None
          ) -> tuple[list[float], list[float], list[float], str]:
    """One optimizer step at each lr of `schedule` until the loss explodes: (lrs, raw losses,
    bias-corrected running averages, why it stopped early or "")."""
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best = 0.0, math.inf
    for i, lr in enumerate(schedule):
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            return lrs, losses, smoothed, f"loss became {value} at lr {lr:.3g}"
        avg = smoothing * avg + (1 - smoothing) * value
        smooth = avg / (1 - smoothing ** (i + 1))  # bias correction: early values not ~0
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        if on_step is not None:
            on_step(i, lr, smooth)
        best = min(best, smooth)
        if smooth > stop_factor * best:
            return lrs, losses, smoothed, (f"smoothed loss {smooth:.3g} exceeded "
                                           f"{stop_factor:g}x its minimum {best:.3g} at lr "
                                           f"{lr:.3g}")
    return lrs, losses, smoothed, ""


def zero_lag(values: list[float], *, tau: float) -> list[float]:
    """A bias-corrected running average with time constant `tau` steps, run forwards and then
    backwards over the result: the noise of one, without its lag (scipy's filtfilt idea)."""
    beta = tau / (1.0 + tau)

    def run(xs: list[float]) -> list[float]:
        out, avg = [], 0.0
        for i, x in enumerate(xs):
            avg = beta * avg + (1 - beta) * x
            out.append(avg / (1 - beta ** (i + 1)))
        return out

    return run(run(values)[::-1])[::-1]


def suggest(lrs: list[float], curve: list[float]) -> tuple[float, float]:
    """(lr of the steepest fall before the minimum, lr at the minimum) of a smoothed curve."""
    low = min(range(len(curve)), key=curve.__getitem__)
    best_i, best_slope = low, math.inf
    for i in range(1, low + 1):
        # Slope against log10(lr) over one step (the lr grid is even in log space).
        slope = (curve[i] - curve[i - 1]) / math.log10(lrs[i] / lrs[i - 1])
        if slope < best_slope:
            best_i, best_slope = i, slope
    return lrs[best_i], lrs[low]


def _check(start_lr: float, end_lr: float, iterations: int, smoothing: float,
           stop_factor: float, rule: str) -> None:
    checks = [
        ("start_lr", start_lr, start_lr > 0, "a positive number"),
        ("end_lr", end_lr, end_lr > start_lr, f"greater than start_lr ({start_lr:g})"),
        ("iterations", iterations, iterations >= 20, "at least 20"),
        ("smoothing", smoothing, 0 <= smoothing < 1, "in [0, 1)"),
        ("stop_factor", stop_factor, stop_factor > 1, "greater than 1"),
        ("rule", rule, rule in RULES, f"one of {', '.join(RULES)}"),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"lr range test {key}: expected {expected}, got {value!r}")
