"""One worker's trackers, fed from a background thread: a tracker never holds a trial up.

A told trial is read back once (the runner's thread) and queued; the tracker's thread logs it
to each tracker the study file names. A tracker that is down or refuses is one warning per
trial, never a failed trial: the trial is counted as not logged there, and the tracker is left
alone for `RETRY_AFTER_S` (each trial ending meanwhile is one more warning, not one more wait)
before it is asked again. At the worker's end `close` waits up to `FLUSH_S` for the trials
still queued and says how many were not logged, and where.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from search._log import logger
from search.spec import best_trials
from search.storage import (
    TRACKING_ATTR,
    retried_from,
    stored_trial,
    with_retry,
)
from search.tracking._record import TrialRecord, record_of

if TYPE_CHECKING:
    import optuna

    from search.spec import StudySpec

LOG = logger("tracking")
RETRY_AFTER_S = 30.0  # a tracker that failed is not asked again for this long
FLUSH_S = 30.0  # the most a worker waits at its end for trials still being logged
_DONE = object()  # the queue's last item
_START = object()  # its first: each tracker's `start`


@dataclass(frozen=True)
class _StudyDone:
    best: TrialRecord | None


class Backend(Protocol):
    """One tracker: MLflow, TensorBoard or W&B (`search.tracking._mlflow`, …)."""

    name: str
    where: str  # for messages: the server, the folder, the project

    def start(self) -> None: ...  # as the worker starts (MLflow: the study's parent run)

    def log_trial(self, record: TrialRecord) -> None: ...

    def study_done(self, best: TrialRecord | None) -> None: ...  # the budget is met

    def close(self) -> None: ...


@dataclass
class _Tally:
    logged: int = 0
    missed: int = 0
    down_until: float = 0.0
    error: str = ""


# What a client's long error comes down to, found anywhere in its text (or its causes').
_CAUSES = (("connection refused", "connection refused"), ("timed out", "timed out"),
           ("read timeout", "timed out"), ("name or service not known", "unknown host"),
           ("temporary failure in name resolution", "unknown host"))


def said(error: BaseException) -> str:
    """An error in one short line: the cause where a client's message says one."""
    texts, seen = [], error
    while seen is not None and len(texts) < 5:
        texts.append(" ".join(str(seen).split()) or type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    lowered = " ".join(texts).lower()
    for phrase, cause in _CAUSES:
        if phrase in lowered:
            return f"{cause} ({type(error).__name__})"
    text = texts[0].rstrip(".")
    return text if len(text) <= 200 else text[:197] + "..."


def backends_for(study: optuna.Study, spec: StudySpec) -> list[Backend]:
    """The trackers `spec.tracking` names; MLflow's parent run kept on `study`."""
    tracking = spec.tracking
    if tracking is None:
        return []
    backends: list[Backend] = []
    if tracking.mlflow is not None:
        from search.tracking._mlflow import MlflowBackend

        kept = dict(study.user_attrs.get(TRACKING_ATTR) or {})

        def keep(parent: dict[str, Any]) -> None:
            with_retry(lambda: study.set_user_attr(TRACKING_ATTR, {**kept, "mlflow": parent}),
                       what="keeping the study's MLflow run")

        backends.append(MlflowBackend(tracking.mlflow, spec.name, kept.get("mlflow"), keep,
                                      settings=study_settings(spec)))
    if tracking.tensorboard is not None:
        from search.tracking._tensorboard import TensorboardBackend

        backends.append(TensorboardBackend(tracking.tensorboard, spec.name))
    if tracking.wandb is not None:
        from search.tracking._wandb import WandbBackend

        backends.append(WandbBackend(tracking.wandb, spec.name))
    return backends


def study_settings(spec: StudySpec) -> dict[str, str]:
    """What the study's parent run shows as its params: the search as the file set it."""
    objective = spec.objective
    settings = {"sampler": spec.sampler.type, "pruner": spec.pruner.type,
                "objective": ", ".join(objective.metric_names),
                "direction": ", ".join(objective.direction_names),
                "budget.trials": str(spec.budget.trials), "budget.epochs": str(spec.budget.epochs),
                "trainer": spec.trainer_name}
    dumped = spec.model_dump(mode="json")
    settings.update({f"space.{key}": json.dumps({k: v for k, v in entry.items() if v is not None})
                     for key, entry in dumped["space"].items()})
    settings.update({f"fixed.{key}": json.dumps(value) for key, value in spec.fixed.items()})
    return settings


class Tracker:
    """Logs a worker's finished trials to the study's trackers, from its own thread."""

    def __init__(self, backends: list[Backend], spec: StudySpec) -> None:
        self.backends, self.spec = backends, spec
        self.tallies = {b.name: _Tally() for b in backends}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()

    @classmethod
    def for_study(cls, study: optuna.Study, spec: StudySpec) -> Tracker | None:
        """The study's tracker, or None when its file names none."""
        backends = backends_for(study, spec)
        return cls(backends, spec) if backends else None

    def trial_ended(self, trial: optuna.Trial) -> None:
        """`trial`, just told, read back and queued to be logged."""
        try:
            frozen = with_retry(lambda: stored_trial(trial), what="reading the trial to log")
            record = record_of(frozen, self.spec, retry_of=retried_from(trial))
        except Exception as e:  # noqa: BLE001 - the trial is told: logging it is a nicety
            for backend in self.backends:
                self._missed(backend, trial.number, e)
            return
        self.log(record)

    def start(self) -> None:
        """Start the tracker's thread, which first sets each tracker up (MLflow's parent run
        of the study, found or created): nothing here waits for a server."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="hpsearch-tracking",
                                                daemon=True)
                self._thread.start()
                self._queue.put(_START)

    def log(self, record: TrialRecord) -> None:
        """Queue `record` for every tracker."""
        self.start()
        with self._lock:
            self._pending += 1
        self._queue.put(record)

    def _work(self) -> None:
        while (record := self._queue.get()) is not _DONE:
            if record is _START or isinstance(record, _StudyDone):
                for backend in self.backends:
                    self._start(backend) if record is _START else self._finish(backend, record)
                continue
            for backend in self.backends:
                self._log_to(backend, record)
            with self._lock:
                self._pending -= 1

    def _start(self, backend: Backend) -> None:
        try:
            backend.start()
        except Exception as e:  # noqa: BLE001 - tracking is never a reason not to run
            tally = self.tallies[backend.name]
            tally.down_until, tally.error = time.monotonic() + RETRY_AFTER_S, said(e)
            LOG.warning(f"{backend.name} ({backend.where}): not set up ({tally.error}); it "
                        f"is asked again {RETRY_AFTER_S:.0f} s after it failed")

    def study_done(self, study: optuna.Study) -> None:
        """The budget is met: the trackers that span the study (MLflow's parent run) end it,
        with the best feasible trial's values."""
        try:
            best = best_trials(study)
            record = record_of(best[0], self.spec) if len(best) == 1 else None
        except Exception as e:  # noqa: BLE001 - the study is done: summing it up is a nicety
            LOG.warning(f"tracking: the study's best trial was not read ({said(e)})")
            record = None
        self.start()
        self._queue.put(_StudyDone(record))

    def _finish(self, backend: Backend, done: _StudyDone) -> None:
        if time.monotonic() < self.tallies[backend.name].down_until:
            return
        try:
            backend.study_done(done.best)
        except Exception as e:  # noqa: BLE001
            LOG.warning(f"{backend.name} ({backend.where}): the study's end was not logged "
                        f"({said(e)})")

    def _log_to(self, backend: Backend, record: TrialRecord) -> None:
        tally = self.tallies[backend.name]
        if time.monotonic() < tally.down_until:
            self._missed(backend, record.number, None)
            return
        try:
            backend.log_trial(record)
        except Exception as e:  # noqa: BLE001 - any failure of a tracker is a warning
            tally.down_until = time.monotonic() + RETRY_AFTER_S
            self._missed(backend, record.number, e)
            return
        tally.logged += 1

    def _missed(self, backend: Backend, number: int, error: BaseException | None) -> None:
        tally = self.tallies[backend.name]
        tally.missed += 1
        if error is not None:
            tally.error = said(error)
            why = tally.error
        else:
            why = f"{tally.error}; it is asked again {RETRY_AFTER_S:.0f} s after it failed"
        LOG.warning(f"trial #{number}: not logged to {backend.name} ({backend.where}): {why}")

    def close(self, timeout: float = FLUSH_S) -> None:
        """Log what is queued (up to `timeout` seconds), then say how many trials were not
        logged, and where."""
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._lock:
                    late = self._pending
                for backend in self.backends:
                    self.tallies[backend.name].missed += late
                    self.tallies[backend.name].error = f"still logging after {timeout:.0f} s"
        for backend in self.backends:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001
                LOG.warning(f"{backend.name} ({backend.where}): not closed cleanly: {said(e)}")
        self.say()

    def say(self) -> None:
        """One line per tracker: how many trials it logged, and how many it did not."""
        for backend in self.backends:
            tally = self.tallies[backend.name]
            if tally.missed:
                LOG.warning(f"tracking: {tally.missed} of {tally.missed + tally.logged} "
                            f"trial(s) not logged to {backend.name} ({backend.where}); last "
                            f"error: {tally.error}")
            elif tally.logged:
                LOG.info(f"tracking: {tally.logged} trial(s) logged to {backend.name} "
                         f"({backend.where})")
