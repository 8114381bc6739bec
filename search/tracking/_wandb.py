"""Weights & Biases: one run per trial, grouped by study (``group`` = the study's name).

A trial's run has its params as config, each epoch's metrics logged at step = epoch, and its
state, final value(s), pruning epoch and the trial it retries in the summary. ``mode:
offline`` writes the runs under ``dir`` (``wandb sync`` uploads them later).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.spec import WandbSpec
    from search.tracking._record import TrialRecord


class WandbBackend:
    """Logs each finished trial as a W&B run."""

    name = "wandb"

    def __init__(self, spec: WandbSpec, study: str) -> None:
        self.spec, self.study = spec, study
        self.project = spec.project or study
        self.where = f"{spec.mode} project {self.project!r}"

    def start(self) -> None:
        """W&B imported as the worker starts, not as the first trial ends."""
        import wandb  # noqa: F401

    def log_trial(self, record: TrialRecord) -> None:
        import wandb

        if self.spec.dir is not None:
            from pathlib import Path

            Path(self.spec.dir).expanduser().mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project, entity=self.spec.entity, group=record.study,
            name=record.run_name, job_type=record.kind, config=dict(record.params),
            mode=self.spec.mode, dir=self.spec.dir, reinit="create_new",
            tags=[record.state.lower()],
            settings=wandb.Settings(silent=True, console="off", init_timeout=30))
        try:
            for epoch, metrics in record.epochs:
                run.log(dict(metrics), step=epoch)
            summary: dict[str, Any] = {"hpsearch.study": record.study,
                                       "hpsearch.trial": record.number,
                                       "hpsearch.state": record.state,
                                       **{f"objective.{k}": v for k, v in record.values.items()}}
            if record.pruned_at is not None:
                summary["hpsearch.pruned_at_epoch"] = record.pruned_at
            if record.retry_of is not None:
                summary["hpsearch.retry_of"] = record.retry_of
            run.summary.update(summary)
        finally:
            run.finish(exit_code=1 if record.state == "FAIL" else 0)

    def study_done(self, best: TrialRecord | None) -> None:
        """Nothing spans the study here: each trial's run is whole."""

    def close(self) -> None:
        """Each trial's run is finished as it is logged."""
