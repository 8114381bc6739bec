"""Lightning's `Trainer` as a trial: `HpsearchCallback` reports each validated epoch, stops the
fit when the trial is pruned, and checkpoints every epoch into the trial's folder so that a
dead trial's retry resumes from it.

```python
import lightning.pytorch as L
from search.integrations.lightning import HpsearchCallback

def fit(params, trial):
    hp = HpsearchCallback(trial)
    trainer = L.Trainer(max_epochs=trial.epochs, callbacks=[hp], logger=False)
    trainer.fit(model, train_loader, val_loader, ckpt_path=hp.resume_from)
```

This module owns the Lightning side only: when a report is made and with what numbers, how
Lightning is stopped, where its checkpoint lives and when it is written. What a report does
(history, pruner, `hpsearch stop`) is `search.Trial`'s. The study's objective names a metric
as the `LightningModule` logs it (`self.log("val_accuracy", …)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from search._log import logger
from search.trial import Pruned, StopRequested, Trial

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Checkpoint
except ImportError as e:  # pragma: no cover - the extra is in every test environment
    raise ImportError("search.integrations.lightning needs Lightning: "
                      "pip install 'hpsearch[lightning]'") from e

LOG = logger("trial")
FOLDER = "lightning"  # in the trial's folder
LAST = "last.ckpt"  # the one checkpoint kept there: the last epoch reported


class HpsearchCallback(Checkpoint):
    """Reports each epoch of `Trainer.fit` to `trial` and acts on the answer.

    - A report is made at the end of each training epoch in which a validation ran (every
      epoch without a validation loop), as epoch `trainer.current_epoch + 1`: its metrics
      are `trainer.callback_metrics` that are numbers (scalar tensors), the epoch's
      validation and training aggregates alike. At the epoch's end rather than the
      validation's, because only then are the metrics logged with `on_epoch=True` in
      `training_step` (or logged in `on_train_epoch_end`) this epoch's and not the last one's.
    - Pruned (or diverged): `trainer.should_stop` is set, no checkpoint is written for that
      epoch and nothing more is reported; `fit` returns normally, nothing to catch, and the
      trial ends PRUNED. (Lightning trains on up to `min_epochs` if the Trainer has one.)
    - After each report it saves the Trainer's full state (weights, optimizer, schedulers,
      loops, callbacks) to `<trial folder>/lightning/last.ckpt`, replacing the last one, and
      tells the trial (`Trial.checkpointed`). A retry of a trial whose worker died finds it:
      `trainer.fit(..., ckpt_path=hp.resume_from)` goes on from the epoch after it. After
      `hpsearch stop` the fit stops right after that checkpoint and the trial is queued again
      to resume from it. Without a trial folder it reports only.
    - It is Lightning's checkpoint callback (a `Checkpoint`), so the Trainer adds no
      `ModelCheckpoint` of its own (which would write into the working directory); leave
      `enable_checkpointing` at its default, True. A `ModelCheckpoint` of yours (the best
      model) may go beside it, listed first if you use `ckpt_path="best"`.
    - Under a trial of several processes (`resources`), every rank reports and saves, and
      every rank stops at the same epoch.
    """

    def __init__(self, trial: Trial) -> None:
        self.trial = trial
        self.stopped = False  # pruned, diverged or stopped on request: nothing more to report
        self._validated = False  # a validation ran in this training epoch

    @property
    def checkpoint_path(self) -> Path | None:
        """Where the last epoch's checkpoint is saved: None without a trial folder."""
        directory = self.trial.checkpoint_dir
        return None if directory is None else directory / FOLDER / LAST

    @property
    def resume_from(self) -> str | None:
        """The last checkpoint of this trial (the dead trial's, for a retry), or None: give it
        to `trainer.fit(..., ckpt_path=…)`."""
        path = self.checkpoint_path
        return str(path) if path is not None and path.is_file() else None

    # ---------------------------------------------------------------- Lightning's hooks

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopped or not (self._validated or not trainer.enable_validation):
            return
        values = {name: number for name, value in trainer.callback_metrics.items()
                  if name != "epoch" and (number := _number(value)) is not None}
        try:
            self.trial.report(trainer.current_epoch + 1, **values)
        except StopRequested:  # never checkpointed in this run yet: keep this epoch first
            self._stop(trainer)
        except Pruned:
            self._stop(trainer)
            return
        self._save(trainer)

    # ---------------------------------------------------------------- the checkpoint

    def _save(self, trainer: pl.Trainer) -> None:
        """The Trainer's state as the trial's checkpoint, then `Trial.checkpointed` (where
        `hpsearch stop` takes effect). Written beside and renamed, so that a worker killed
        while writing leaves the last one whole; a failed write is a warning."""
        path = self.checkpoint_path
        if path is None:
            return
        partial = path.with_name(f".{LAST}.tmp")
        try:
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(partial, weights_only=False)  # every rank; rank 0 writes
            if trainer.is_global_zero:
                os.replace(partial, path)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            LOG.warning(f"trial #{self.trial.number}: Lightning checkpoint not saved ({e}): the "
                        "trial goes on without it")
            return
        try:
            self.trial.checkpointed()
        except StopRequested:
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        self.stopped = True
        trainer.should_stop = True


def _number(value: Any) -> float | None:
    """A metric's value as a float: numbers and one-element tensors; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:
        return float(value.item())
    return None
