"""How a trial ended, as values: what the code running a trial returns (`Ended`), what the
runner hands the worker after a step (`Step`), and what the display shows (`TrialOutcome`).

No exception carries a trial's end through the worker: the kind of trial that ran it says how
it ended, and the runner (`search.trial._runner`) acts on that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from search._log import logger

if TYPE_CHECKING:
    from search.storage import Counts

# A trial's error with its traceback, in Optuna's words under `study.optimize`: hpsearch's
# record (hpsearch.trial), shown by whoever shows hpsearch's warnings.
LOG = logger("trial")

GPU_FULL = "gpu full"  # Step.stop: a shared-GPU out-of-memory, the trial queued again
STOP_REQUESTED = "stop requested"  # Step.stop: `hpsearch stop`, the trials queued again


class End(enum.Enum):
    """How one trial ended."""

    COMPLETE = "complete"
    PRUNED = "pruned"  # by the pruner, or diverged: a bad region the sampler learns from
    FAILED = "failed"  # with a reason recorded on the trial
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, `hpsearch stop`, a pack out of memory
    TAKEN_OVER = "taken over"  # failed as stale while its worker was paused, retried elsewhere
    GPU_FULL = "gpu full"  # out of memory on a GPU shared with other workers
    RANK_LOST = "rank lost"  # a rank of a wide trial died: retried from its checkpoint

    @property
    def state(self) -> TrialState:
        """The state the trial is told with (an interrupted one is queued again after)."""
        if self is End.COMPLETE:
            return TrialState.COMPLETE
        return TrialState.PRUNED if self is End.PRUNED else TrialState.FAIL

    @property
    def queued_again(self) -> bool:
        """Whether the trial is queued again unchanged, to resume from its checkpoints."""
        return self in (End.INTERRUPTED, End.GPU_FULL, End.RANK_LOST)


def log_failure(number: int, error: BaseException) -> None:
    """Show a trial's error with its traceback (its reason is recorded on the trial)."""
    LOG.warning("Trial %d failed because of the following error: %r", number, error,
                exc_info=error)


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended, as the worker saw it: enough to show it without reading it back."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    values: list[float] | None
    last_value: float | None  # the last reported value (pruned trials have no final value)
    params: dict[str, Any]
    epochs_run: int
    seconds: float
    ended: str


@dataclass(frozen=True)
class Ended:
    """How one trial ended, as the code that ran it returns it: what the runner tells."""

    how: End
    values: list[float] | None = None  # COMPLETE: the objective values
    shown: TrialOutcome | None = None  # for the display and the worker's counts
    reason: str = ""  # GPU_FULL, RANK_LOST: the line the worker says of it
    clear: tuple[Path | None, ...] = ()  # checkpoint folders to delete once it is told

    @classmethod
    def of(cls, shown: TrialOutcome, *, clear: tuple[Path | None, ...] = ()) -> Ended:
        """A trial that ran to an end of its own: COMPLETE, PRUNED or FAIL as `shown` says."""
        how = {"COMPLETE": End.COMPLETE, "PRUNED": End.PRUNED}.get(shown.state, End.FAILED)
        return cls(how, shown.values if how is End.COMPLETE else None, shown, clear=clear)


@dataclass
class Step:
    """What one step of a runner came to, for the worker: the trials it told (in order), or
    the budget's counts when no trial could start, and why the worker stops, if it does."""

    outcomes: list[TrialOutcome] = field(default_factory=list)
    full: Counts | None = None
    stop: str = ""  # GPU_FULL or STOP_REQUESTED
