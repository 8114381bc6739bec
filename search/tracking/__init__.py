"""Where a study's trials are logged besides its storage: MLflow, TensorBoard, W&B.

The study file's `tracking:` section names the trackers (`search.spec._tracking`); nothing of
them is imported unless it does. Every worker logs each trial it tells (`Tracker`, from the
trial runner: every kind of trial, on every machine) from a background thread, when the trial
ends, under the study's MLflow parent run (found or created as the worker starts); and
`hpsearch retrain` logs its final run (`log_retrain`). A tracker that is down is a warning per
trial, never a failed or a stalled trial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from search.tracking._record import TrialRecord, record_of, retrain_record
from search.tracking._tracker import FLUSH_S, Tracker

if TYPE_CHECKING:
    import optuna

    from search.spec import StudySpec


def log_retrain(study: optuna.Study, spec: StudySpec, summary: dict[str, Any]) -> None:
    """`hpsearch retrain`'s final run, logged to the study's trackers (waiting up to
    `FLUSH_S` for them)."""
    tracker = Tracker.for_study(study, spec)
    if tracker is not None:
        tracker.log(retrain_record(spec, summary))
        tracker.close()


__all__ = ["FLUSH_S", "Tracker", "TrialRecord", "log_retrain", "record_of"]
