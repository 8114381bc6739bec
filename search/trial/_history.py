"""A trial's per-epoch history as stored: the `history` user attribute and `metrics.json`."""

from __future__ import annotations

import math
from typing import Any

import trainers

# Fields of EpochMetrics kept on the trial (user attr "history") for curves and reports.
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "momentum", "grad_norms", "epoch_seconds", "train_seconds",
                  "samples_per_second", "group_lrs", "trained_parameters")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def history_record(m: trainers.EpochMetrics) -> dict[str, Any]:
    """One epoch's metrics as stored in a trial's `history` attr (rounded; NaN as null)."""
    out = {}
    for field in HISTORY_FIELDS:
        value = _rounded(getattr(m, field))
        # JSON (the storage's format for attrs) has no NaN: a missing split reads as null.
        out[field] = None if isinstance(value, float) and math.isnan(value) else value
    return out
