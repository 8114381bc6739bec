"""A finished trial as every tracker logs it (`TrialRecord`), read from the trial as stored.

The record is built from what the study storage holds once the trial is told, so every kind of
trial (built-in, packed, function, command, several ranks) is logged the same way: its params
(sampled and fixed), every metric it reported per epoch (step = epoch; the built-in trainer's
per-layer gradient norms as ``grad_norms.<layer>``), its state, final value(s), the epoch it
was pruned at, the dead trial it retries and its reason for failing.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from search.spec import StudySpec


@dataclass(frozen=True)
class TrialRecord:
    """One trial (or one `hpsearch retrain` run, `kind` "retrain") as the trackers log it."""

    study: str
    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    # The objective value(s) by metric name (a pruned trial: none, its curve is in `epochs`).
    values: dict[str, float] = field(default_factory=dict)
    epochs: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    pruned_at: int | None = None  # the epoch a pruned trial stopped after
    retry_of: int | None = None  # the dead (or interrupted) trial this one resumes
    reason: str | None = None  # why it failed (or was pruned), as stored
    start: datetime.datetime | None = None
    end: datetime.datetime | None = None
    kind: str = "trial"

    @property
    def run_name(self) -> str:
        if self.kind == "retrain":
            return f"retrain of trial {self.number}"
        return f"trial {self.number}" + (f" (retry of {self.retry_of})"
                                         if self.retry_of is not None else "")

    @property
    def last_metrics(self) -> dict[str, float]:
        """Each metric's last reported value, with the final values over them."""
        out: dict[str, float] = {}
        for _, metrics in self.epochs:
            out.update(metrics)
        return {**out, **self.values}

    def millis(self, moment: datetime.datetime | None) -> int | None:
        """`moment` as milliseconds since the epoch (Optuna's naive times are local)."""
        return None if moment is None else int(moment.timestamp() * 1000)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of one report; a mapping of numbers (gradient norms by layer) as
    ``name.key``; anything else (None for a split not measured, text) left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "epoch":
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _numbers(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[key] = float(value)
    return out


def epochs_of(trial: FrozenTrial, metric: str) -> list[tuple[int, dict[str, float]]]:
    """Every reported epoch of `trial` with its metrics: the stored history, or for a trial
    that stored none (failed before its end), its intermediate values as `metric`."""
    history = trial.user_attrs.get("history")
    if isinstance(history, list) and history:
        return [(int(r["epoch"]), _numbers(r)) for r in history
                if isinstance(r, dict) and isinstance(r.get("epoch"), (int, float))]
    return [(int(step), {metric: float(v)}) for step, v in sorted(trial.intermediate_values.items())
            if math.isfinite(v)]


def record_of(trial: FrozenTrial, spec: StudySpec, *, retry_of: int | None = None
              ) -> TrialRecord:
    """How `trial`, told, is logged: `spec` names its objective metrics and fixed params."""
    names = spec.objective.metric_names
    epochs = epochs_of(trial, names[0])
    values = {}
    if trial.state.name == "COMPLETE" and trial.values:
        values = {name: float(v) for name, v in zip(names, trial.values, strict=False)
                  if math.isfinite(v)}
    pruned_at = None
    if trial.state.name == "PRUNED":
        steps = [e for e, _ in epochs] or list(trial.intermediate_values)
        pruned_at = max(steps) if steps else None
    reason = trial.user_attrs.get("ended")  # why it failed or was pruned, in words
    return TrialRecord(
        study=spec.name, number=trial.number, state=trial.state.name,
        params={**spec.fixed, **trial.params}, values=values, epochs=epochs,
        pruned_at=pruned_at, retry_of=retry_of, reason=str(reason) if reason else None,
        start=trial.datetime_start, end=trial.datetime_complete)


def retrain_record(spec: StudySpec, summary: dict[str, Any]) -> TrialRecord:
    """`hpsearch retrain`'s summary as a record: each seed's test metrics as a step (step =
    seed index), their means as its values."""
    per_seed: dict[int, dict[str, float]] = {}
    values: dict[str, float] = {}
    for key, spread in summary.items():
        if isinstance(spread, dict) and "per_seed" in spread:
            values[key] = float(spread["mean"])
            for i, value in enumerate(spread["per_seed"]):
                per_seed.setdefault(i, {})[key] = float(value)
    now = datetime.datetime.now()  # naive local, as Optuna's times
    return TrialRecord(study=spec.name, number=int(summary["trial"]), state="COMPLETE",
                       params={**spec.fixed, **summary.get("params", {})}, values=values,
                       epochs=sorted(per_seed.items()), start=now, end=now, kind="retrain")
