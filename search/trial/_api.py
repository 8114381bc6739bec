"""The public face of hpsearch for users' own training code, apart from the code that runs it.

- `Trial`: what a `trainer: pkg.module:fit` function gets besides its params (`report`,
  checkpoints, device), and `Pruned`, what `Trial.report` raises when the trial should stop;
- `report`, `params`, `checkpoint_dir` and `is_final`: for a script run by `trainer: {command:
  [...]}`, in any framework;
- the ``@hpsearch`` line protocol those scripts speak (`parse_line`, `check_report`).

Importable without torch or Optuna. The worker starts a script with its trial's parameters as
JSON in ``HPSEARCH_PARAMS`` (and substituted into the command's arguments) and reads its
standard output: a line

    @hpsearch {"epoch": 3, "val_loss": 0.2512, "val_accuracy": 0.91}

reports the metrics of an epoch. `report` prints one; any language can print the same line.
In a trial of several processes (torchrun merges its ranks' output) a line may say whose it is,

    @hpsearch {"epoch": 3, "rank": 1, "val_loss": 0.2533}

and only rank 0's count (a line without a rank is rank 0's): `report` adds the rank where
torchrun's ``RANK`` is set, and writes each line whole, so a report merged after another
rank's unfinished line, or after torchrun's ``[default0]:`` (``--tee``), is still read.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search._log import logger

LOG = logger("trial")
HISTORY_FILE = "hpsearch-history.json"  # beside the user's checkpoint: what was reported
STATE_FILE = "state.pt"
PREFIX = "@hpsearch "
PARAMS_ENV = "HPSEARCH_PARAMS"
RANK_KEY = "rank"  # a report line's rank, beside its "epoch"; not a metric's name
RANK_ENV = "RANK"  # set by torchrun for each of its processes
# The rest of what the worker tells a script, by environment variable.
ENV = {
    "trial_number": "HPSEARCH_TRIAL_NUMBER",
    "study_name": "HPSEARCH_STUDY",
    "checkpoint_dir": "HPSEARCH_CHECKPOINT_DIR",
    "device": "HPSEARCH_DEVICE",
    "epochs": "HPSEARCH_EPOCHS",
    "final": "HPSEARCH_FINAL",
    "seed": "HPSEARCH_SEED",
    "nproc": "HPSEARCH_NPROC",
    "gpus": "HPSEARCH_GPUS",
    "master_port": "HPSEARCH_MASTER_PORT",
}


def report(epoch: int, **metrics: float) -> None:
    """Report an epoch's metrics to the worker running this script (a line on stdout).

    Under torchrun every rank may call it: the line says its rank (``RANK``), and the worker
    keeps rank 0's."""
    if RANK_KEY in metrics:
        raise ValueError(f"report: {RANK_KEY!r} is the line's rank under torchrun, not a "
                         "metric: name the metric otherwise")
    record: dict[str, Any] = {"epoch": int(epoch)}
    rank = os.environ.get(RANK_ENV, "").strip()
    if rank:
        record[RANK_KEY] = int(rank)
    record.update({k: float(v) for k, v in metrics.items()})
    # One write, newline included (print writes the end apart): where ranks share a pipe, no
    # other rank's output lands inside the line.
    sys.stdout.write(PREFIX + json.dumps(record, allow_nan=True) + "\n")
    sys.stdout.flush()


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
    """(epoch, metrics) of a report line of rank 0; None for any other line, another rank's
    report among them; ValueError for a report line that is malformed, whoever's (the trial
    fails with that message). A report after other text (torchrun's ``[default0]:``, another
    rank's unfinished line) is read from its ``@hpsearch {``."""
    start = 0 if line.startswith(PREFIX) else line.find(PREFIX + "{")
    if start < 0:
        return None
    text = line[start + len(PREFIX):].strip()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"report line is not JSON ({e}): {text[:200]}") from None
    if not isinstance(record, dict) or "epoch" not in record:
        raise ValueError(f"report line without an epoch: {text[:200]}")
    epoch = record.pop("epoch")
    rank = record.pop(RANK_KEY, 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"report line with rank {rank!r}, expected a whole number 0 or more: "
                         f"{text[:200]}")
    return (epoch, record) if rank == 0 else None


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



class Pruned(Exception):  # noqa: N818 - a signal, as optuna.TrialPruned
    """Raised by `Trial.report` when the trial should stop (the pruner said so, or a reported
    objective value is NaN or infinite). Let it propagate out of your function."""

class StopRequested(Pruned):
    """Raised by `Trial.report` or `Trial.save_checkpoint` when `hpsearch stop` asked the
    worker to stop: the trial ends at that point, after its checkpoint, and is queued again to
    resume. Let it propagate, as `Pruned`."""


@dataclass(frozen=True)
class Reported:
    """One `report` as the progress display sees it."""

    epoch: int
    metrics: dict[str, float]


class Trial:
    """What your training function gets besides its params: where to run, how to report and
    checkpoint. Optuna-free: hpsearch's pruning, storage and retries stay behind it.

    Attributes: `number`, `study_name`, `params` (a copy), `device` ("cuda:0", "cpu"),
    `threads` (CPU threads this worker may use, or None), `epochs` (budget.epochs, the most
    a trial trains), `final` (True under `hpsearch retrain`: train on everything you tune on
    and return the test metrics), `seed` (the retrain seed, else None), `checkpoint_dir`,
    and for a trial of several processes (``resources: {gpus: N}``) `rank`, `world_size` and
    `is_main` (rank 0: the one whose reports are stored and whose checkpoints are written).
    """

    def __init__(self, *, number: int, study_name: str, params: dict[str, Any],
                 device: str = "cpu", threads: int | None = None, epochs: int = 1,
                 checkpoint_dir: Path | None = None, final: bool = False,
                 seed: int | None = None,
                 on_report: Callable[[int, dict[str, float]], str | None] | None = None,
                 stop: Callable[[], bool] | None = None,
                 rank: int = 0, world_size: int = 1, writes_history: bool = True,
                 ) -> None:
        self.number = number
        self.study_name = study_name
        self.params = dict(params)
        self.device = device
        self.threads = threads
        self.epochs = epochs
        self.final = final
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.world_size = world_size
        # A rank's Trial leaves the history file to its worker, which stores rank 0's reports.
        self._writes_history = writes_history
        self._on_report = on_report
        self._stop = stop or (lambda: False)
        self._checkpointed = False  # save_checkpoint was called in this run
        self._history: list[dict[str, float]] = []
        self._resumed = False
        # The epoch the loop resumed after (its first report's epoch - 1) on a dead trial's
        # retry; 0 when it started from scratch.
        self.resumed_from_epoch = 0
        self.stopped: str | None = None  # why report raised Pruned, once it has
        self.stop_requested = False  # `hpsearch stop` ended it (StopRequested was raised)
        self._warned = False
        self._repeat_warned = False
        if checkpoint_dir is not None and (checkpoint_dir / HISTORY_FILE).is_file():
            try:
                self._history = json.loads((checkpoint_dir / HISTORY_FILE).read_text())
                self._resumed = bool(self._history)
            except (OSError, ValueError):
                self._history = []

    @property
    def is_main(self) -> bool:
        """Rank 0 (and every one-process trial): log, save and evaluate here."""
        return self.rank == 0

    @property
    def history(self) -> list[dict[str, float]]:
        """Every report so far, as ``{"epoch": …, metric: value, …}`` (a retry's includes the
        dead trial's reports up to its checkpoint)."""
        return [dict(r) for r in self._history]

    @property
    def last_epoch(self) -> int | None:
        return int(self._history[-1]["epoch"]) if self._history else None

    def report(self, epoch: int, **metrics: float) -> None:
        """Report an epoch's metrics (numbers). Raises `Pruned` when the trial should stop;
        ValueError when the epoch goes back or a value is not a number. An epoch reported
        again (Hugging Face's `trainer.evaluate()` after `train()` reports the last one twice)
        is ignored with one warning, as Optuna ignores a step reported twice: the first stays."""
        if (type(epoch) is int and not self._resumed
                and any(r["epoch"] == epoch for r in self._history)):
            if not self._repeat_warned:
                self._repeat_warned = True
                LOG.warning(f"trial #{self.number}: epoch {epoch} was reported already; "
                            "this and any later repeat are ignored (the first report stays)")
            return
        last = self.last_epoch
        if self._resumed:
            # The first report after a resume may repeat epochs the dead trial reported (its
            # checkpoint was older, or there was none): those reports are replaced.
            self._resumed = False
            self._history = [r for r in self._history if r["epoch"] < epoch]
            self.resumed_from_epoch = max(0, epoch - 1) if self._history else 0
            last = self.last_epoch
        values = check_report(epoch, metrics, last)
        self._history.append({"epoch": epoch, **values})
        self._save_history()
        if self._on_report is not None:
            try:
                verdict = self._on_report(epoch, values)
            except StopRequested:  # a trial of several ranks: decided once, for every rank
                self.stop_requested = True
                raise
            if verdict:
                self.stopped = verdict
                raise Pruned(verdict)
        if not self._checkpointed and self._stop():  # code that never checkpoints stops here
            self.stop_requested = True
            raise StopRequested(f"stopped at epoch {epoch} on request")

    def save_checkpoint(self, state: Any) -> None:
        """Save `state` (anything `torch.save` takes) as this trial's checkpoint: a retry of
        this trial after its worker died gets it back from `load_checkpoint`. A full disk is a
        warning, not a failure: the trial goes on without a checkpoint. In a trial of several
        ranks only rank 0 writes (call it on every rank, or on `is_main` alone)."""
        if self.checkpoint_dir is None or not self.is_main:
            return
        import torch

        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".{STATE_FILE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_dir / STATE_FILE)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            self._warn(f"checkpoint not saved ({getattr(e, 'strerror', None) or e}): the trial "
                       "goes on without it")
            return
        self.checkpointed()

    def checkpointed(self) -> None:
        """Say that a checkpoint of this trial was just written into `checkpoint_dir` by
        other means than `save_checkpoint` (Hugging Face's `Trainer`, Lightning's
        `ModelCheckpoint`: `search.integrations` calls it for them). The reports so far are
        saved beside it, for a retry to resume with, and after `hpsearch stop` it raises
        `StopRequested`, as `save_checkpoint` does: right after a checkpoint, nothing is lost."""
        if self.checkpoint_dir is not None and self.is_main:
            self._save_history(force=True)
        self._checkpointed = True
        if self._stop():
            self.stop_requested = True
            raise StopRequested("stopped on request after a checkpoint")

    def load_checkpoint(self) -> Any | None:
        """The last state `save_checkpoint` saved for this trial (or for the dead trial this
        one retries), else None."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / STATE_FILE).is_file():
            return None
        import torch

        # Written by this study's own workers into its checkpoint folder (see the trust
        # model in docs/operations.md); the user's state may hold any Python object.
        return torch.load(self.checkpoint_dir / STATE_FILE, map_location="cpu",
                          weights_only=False)

    def _save_history(self, *, force: bool = False) -> None:
        directory = self.checkpoint_dir
        if directory is None or not self._writes_history or not (force or directory.exists()):
            return
        try:
            tmp = directory / f".{HISTORY_FILE}.tmp"
            tmp.write_text(json.dumps(self._history))
            os.replace(tmp, directory / HISTORY_FILE)
        except OSError as e:
            self._warn(f"history not saved beside the checkpoint ({e.strerror or e})")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            LOG.warning(f"trial #{self.number}: {message}")
