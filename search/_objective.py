"""The objective: a trial's sampled params → a trainer config → `trainers.train` → a value.

Optuna stays on this side: the trainer reports through `on_epoch`, and this module turns the
pruner's verdict into `StopTraining` (inside the trainer) and then `TrialPruned` (for Optuna),
the way the Lightning pruning callback keeps Optuna out of training code.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    import trainers
    from search._spec import StudySpec

# Fields of EpochMetrics kept on the trial (user attr "history") for curves and reports.
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "momentum", "grad_norms", "epoch_seconds", "train_seconds",
                  "samples_per_second")


def metric_value(metric: str, history: list[trainers.EpochMetrics]) -> float:
    """An objective metric of a run: the last epoch's value, or the mean of epoch_seconds."""
    if metric == "epoch_seconds":
        return sum(m.epoch_seconds for m in history) / len(history)
    return float(getattr(history[-1], metric))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def history_record(m: trainers.EpochMetrics) -> dict[str, Any]:
    out = {}
    for field in HISTORY_FIELDS:
        value = _rounded(getattr(m, field))
        # JSON (the storage's format for attrs) has no NaN: a missing split reads as null.
        out[field] = None if isinstance(value, float) and math.isnan(value) else value
    return out


class Objective:
    """Callable for `study.optimize`: trains one trial and returns its objective value(s)."""

    def __init__(
        self,
        spec: StudySpec,
        *,
        device: str | None = None,
        threads: int | None = None,
        checkpoint_root: str | os.PathLike[str] | None = None,
        on_epoch: Callable[[int, trainers.EpochMetrics], None] | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.threads = threads
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.on_epoch = on_epoch
        self.metrics = spec.objective.metric_names
        self.host = socket.gethostname()

    def checkpoint_dir(self, number: int) -> Path | None:
        if self.checkpoint_root is None:
            return None
        return self.checkpoint_root / self.spec.name / f"trial-{number}"

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        import trainers
        from search._space import suggest
        from search._spec import train_config_for

        params = suggest(trial, self.spec)
        config = train_config_for(self.spec, params)
        overrides: dict[str, Any] = {}
        if self.device:
            overrides["device"] = self.device
        if self.threads:
            overrides["threads"] = self.threads
        config = config.replace(**overrides) if overrides else config
        device = str(trainers.resolve_device(config.device))
        for key, value in (("host", self.host), ("pid", os.getpid()), ("device", device)):
            trial.set_user_attr(key, value)

        # A retry of a trial whose worker died resumes from that trial's last checkpoint.
        # (Optuna keeps the link in system attrs, which only the frozen trial exposes.)
        frozen = trial.storage.get_trial(trial._trial_id)
        retried_from = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        store = None
        directory = self.checkpoint_dir(trial.number)
        if directory is not None:
            if retried_from is not None:
                trial.set_user_attr("retried_from", retried_from)
                dead = self.checkpoint_dir(retried_from)
                if dead is not None and dead.exists() and not directory.exists():
                    shutil.copytree(dead, directory)
            store = trainers.CheckpointStore(directory)

        single = len(self.metrics) == 1

        def report(m: trainers.EpochMetrics) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial.number, m)
            if single:
                value = getattr(m, self.metrics[0])
                if math.isfinite(value):
                    trial.report(float(value), m.epoch)
                if trial.should_prune():
                    raise trainers.StopTraining(f"pruned at epoch {m.epoch}")

        started = time.perf_counter()
        try:
            result = trainers.train(config, report, store)
        except Exception as e:
            trial.set_user_attr("ended", f"error: {type(e).__name__}: {e}"[:500])
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
            raise
        finally:
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

        if retried_from is not None:
            trial.set_user_attr("resumed_from_epoch", result.resumed_from_epoch)
        trial.set_user_attr("history", [history_record(m) for m in result.history])
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("seconds", round(result.seconds, 3))
        trial.set_user_attr("ended", result.reason if result.status != "completed" else "completed")
        if store is not None and not self.spec.run.keep_checkpoints:
            store.clear()
            self._clear_dead(retried_from)
        if result.status == "stopped":
            raise optuna.TrialPruned(result.reason)
        if result.status == "diverged":
            # A diverged run is a bad region, not a bug: pruned, so the budget counts it and
            # the sampler learns from its last reported value.
            raise optuna.TrialPruned(result.reason)
        values = [metric_value(metric, list(result.history)) for metric in self.metrics]
        return values[0] if single else values

    def _clear_dead(self, retried_from: int | None) -> None:
        dead = self.checkpoint_dir(retried_from) if retried_from is not None else None
        if dead is not None:
            shutil.rmtree(dead, ignore_errors=True)
