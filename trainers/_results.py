"""What a run reports: each epoch's metrics, the run's result, and the signal that ends it early.

`train` and a pack (`trainers._packed`) report in these same values, so an observer (`on_epoch`,
the search side) cannot tell a packed run from one trained alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


class StopTraining(Exception):  # noqa: N818 - a control signal, not an error
    """Raised by an `on_epoch` callback to end the run cleanly after the current epoch."""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch of a run reports to `on_epoch` (and its checkpoint keeps)."""

    epoch: int  # 1-based: the number of epochs completed
    train_loss: float
    train_accuracy: float
    val_loss: float  # nan without a validation split
    val_accuracy: float
    lr: float  # at the end of the epoch
    momentum: float | None
    grad_norms: dict[str, float]  # mean L2 norm of each layer's weight gradient (sampled)
    epoch_seconds: float  # training pass plus validation
    train_seconds: float  # the training pass alone
    samples_per_second: float
    group_lrs: dict[str, float] = field(default_factory=dict)  # lr of each parameter group
    trained_parameters: int = 0  # parameters that were not frozen this epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """How a run ended, its every epoch's metrics, and the trained network."""

    status: str  # "completed" | "stopped" (by on_epoch) | "diverged"
    reason: str
    history: tuple[EpochMetrics, ...]
    seconds: float
    resumed_from_epoch: int = 0
    parameters: int = 0
    trained_parameters: int = 0  # in the last epoch (freezing may have changed it)
    device: str = "cpu"
    test_loss: float | None = None
    test_accuracy: float | None = None
    notes: tuple[str, ...] = ()  # what loading `model.weights` did (re-initialized heads, …)
    train_examples: int = 0  # the training split's size (its steps per epoch follow from it)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def final(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None
