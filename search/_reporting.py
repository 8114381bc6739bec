"""What a training script run by `trainer: {command: [...]}` uses: its params and its reports.

Importable without torch or Optuna (a script may be in any framework). The worker starts the
script with its trial's parameters as JSON in ``HPSEARCH_PARAMS`` (and substituted into the
command's arguments) and reads its standard output: a line

    @hpsearch {"epoch": 3, "val_loss": 0.2512, "val_accuracy": 0.91}

reports the metrics of an epoch. `report` prints one; any language can print the same line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PREFIX = "@hpsearch "
PARAMS_ENV = "HPSEARCH_PARAMS"
# The rest of what the worker tells a script, by environment variable.
ENV = {
    "trial_number": "HPSEARCH_TRIAL_NUMBER",
    "study_name": "HPSEARCH_STUDY",
    "checkpoint_dir": "HPSEARCH_CHECKPOINT_DIR",
    "device": "HPSEARCH_DEVICE",
    "epochs": "HPSEARCH_EPOCHS",
    "final": "HPSEARCH_FINAL",
    "seed": "HPSEARCH_SEED",
}


def report(epoch: int, **metrics: float) -> None:
    """Report an epoch's metrics to the worker running this script (a line on stdout)."""
    values = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"epoch": int(epoch), **values}, allow_nan=True)
    print(PREFIX + line, flush=True)


def params() -> dict[str, Any]:
    """This trial's parameters (real values: ``batch_size: 128``), from ``HPSEARCH_PARAMS``."""
    text = os.environ.get(PARAMS_ENV)
    if text is None:
        raise RuntimeError(f"{PARAMS_ENV} is not set: this script was not started by an "
                           "hpsearch worker")
    return dict(json.loads(text))


def checkpoint_dir() -> Path | None:
    """Where this trial keeps its checkpoints (the retry of a dead trial finds them here)."""
    value = os.environ.get(ENV["checkpoint_dir"])
    return Path(value) if value else None


def is_final() -> bool:
    """True under `hpsearch retrain`: train on train+validation and report the test metrics."""
    return os.environ.get(ENV["final"]) == "1"


def parse_line(line: str) -> tuple[int, dict[str, float]] | None:
    """(epoch, metrics) of a report line; None for any other line; ValueError for a report
    line that is malformed (the trial fails with that message)."""
    if not line.startswith(PREFIX):
        return None
    text = line[len(PREFIX):].strip()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"report line is not JSON ({e}): {text[:200]}") from None
    if not isinstance(record, dict) or "epoch" not in record:
        raise ValueError(f"report line without an epoch: {text[:200]}")
    epoch = record.pop("epoch")
    return epoch, record


def check_report(epoch: Any, metrics: dict[str, Any], last_epoch: int | None) -> dict[str, float]:
    """The metrics as floats; ValueError naming what is wrong (epoch or a value)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"report: epoch must be a whole number 0 or more, got {epoch!r}")
    if last_epoch is not None and epoch <= last_epoch:
        raise ValueError(f"report: epoch {epoch} after epoch {last_epoch}: epochs must increase")
    if not metrics:
        raise ValueError(f"report: epoch {epoch} has no metrics")
    out = {}
    for name, value in metrics.items():
        number = _number(value)
        if number is None:
            raise ValueError(f"report: metric {name!r} at epoch {epoch} is {value!r}, expected "
                             "a number")
        out[name] = number
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        return None
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        try:  # numpy scalars, one-element tensors and arrays
            value = value.item()
        except (ValueError, RuntimeError, TypeError):
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None
