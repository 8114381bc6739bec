"""TensorBoard: one event folder per trial, ``<folder>/<study>/trial-<n>``.

Each folder holds the trial's metrics per epoch (step = epoch), its final value(s) and last
metrics as ``final/<metric>``, and the hparams summary (params and those final metrics), so
TensorBoard's HParams tab compares the study's trials side by side. Written with
`torch.utils.tensorboard` (the `tensorboard` package) when the trial ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.tracking._record import TrialRecord


def _hparam(value: Any) -> bool | int | float | str:
    """A param as TensorBoard's hparams take it: a number, a bool or text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class TensorboardBackend:
    """Writes each finished trial's event folder under one root folder."""

    name = "tensorboard"

    def __init__(self, folder: str, study: str) -> None:
        self.root = Path(folder).expanduser() / study
        self.where = str(self.root)

    def folder_of(self, record: TrialRecord) -> Path:
        kind = "retrain" if record.kind == "retrain" else "trial"
        return self.root / f"{kind}-{record.number}"

    def start(self) -> None:
        """Its writer imported as the worker starts, not as the first trial ends."""
        import torch.utils.tensorboard  # noqa: F401

    def log_trial(self, record: TrialRecord) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        start = record.start.timestamp() if record.start else None
        end = record.end.timestamp() if record.end else start
        final = {f"final/{key}": value for key, value in record.last_metrics.items()}
        last_epoch = record.epochs[-1][0] if record.epochs else 0
        with SummaryWriter(log_dir=str(self.folder_of(record))) as writer:
            for epoch, metrics in record.epochs:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, epoch, walltime=end)
            params = {key: _hparam(value) for key, value in record.params.items()}
            params["hpsearch.state"] = record.state
            for summary in hparams(params, final):
                writer.file_writer.add_summary(summary, walltime=end)
            for key, value in final.items():
                writer.add_scalar(key, value, last_epoch, walltime=end)

    def study_done(self, best: TrialRecord | None) -> None:
        """Nothing spans the study here: each trial's run is whole."""

    def close(self) -> None:
        """Each trial's writer is closed (flushed) as it is logged."""
