"""A study's own training code in place of the built-in trainer.

`trainer: pkg.module:fit` runs ``fit(params, trial) -> float | dict | None`` in the worker;
`trainer: {command: [...]}` runs a process per trial that reports by printing lines
(`search.trial._command`). Either way the trial's reports go through `Trial.report`: stored as the
trial's history, given to the pruner, and turned into `Pruned` when the trial should stop.
Checkpoints live in the trial's folder, which a dead trial's retry inherits, so the user's loop
resumes where it died.
"""

from __future__ import annotations

import functools
import math
import os
import time
import traceback
from typing import TYPE_CHECKING, Any

import optuna

import trainers
from search.spec import RETURNED_ATTR, check_trainer, suggest
from search.storage import INTERRUPTED, with_retry
from search.trial import _api
from search.trial._api import Pruned, Reported, StopRequested, Trial
from search.trial._command import TrialFailed, run_command
from search.trial._objective import (
    Objective,
    TakenOver,
    TrialStart,
    placement_attrs,
    report_or_taken_over,
)
from search.trial._outcome import End, Ended, TrialOutcome
from search.trial._ranks import FitJob, RankFailed, RankLost, Verdict, fit_rank, run_ranks

if TYPE_CHECKING:
    from search.spec import StudySpec


def fixed_params(spec: StudySpec) -> dict[str, Any]:
    """The `fixed:` settings as the user wrote them (a user trainer's params start there)."""
    return dict(spec.fixed)


class UserObjective(Objective):
    """The objective of a study with `trainer:`: runs the user's function or command."""

    def __init__(self, spec: StudySpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        assert spec.trainer is not None
        self.trainer = spec.trainer
        check_trainer(spec, source=f"study {spec.name!r}")  # on this machine, before a trial
        self.function = (trainers.load_plugin(self.trainer.function, "hpsearch.trainers",
                                              "trainer")
                         if self.trainer.function else None)

    def creation_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"host": self.host, "pid": os.getpid(), **placement_attrs()}
        try:
            attrs["device"] = self._device()
        except Exception:  # noqa: BLE001 - the trial reports it
            pass
        return attrs

    def _device(self) -> str:
        return self.rank_gpus or str(trainers.resolve_device(self.device or "auto"))

    def run(self, trial: optuna.Trial) -> Ended:
        """Run the user's function or command for `trial` (asked by the runner) and say how it
        ended."""
        begun = TrialStart(trial, {}, time.perf_counter())
        sampled = suggest(trial, self.spec, user_attrs=begun.start_attrs)
        begun.params = {**fixed_params(self.spec), **sampled}
        user: Trial | None = None
        output: dict[str, str] = {}
        try:
            user = self._start(begun)
            returned = self._call(user, output)
            if user.stop_requested:  # `hpsearch stop`: queued again, it resumes
                self._record_end(begun, INTERRUPTED, user)
                return Ended(End.INTERRUPTED)
            values, stopped = self._values(user, returned)
        except TakenOver:
            return Ended(End.TAKEN_OVER)  # not this worker's trial any more: nothing to record
        except TrialFailed as e:
            return Ended.of(self._record_end(begun, str(e), user, e.attrs))
        except RankLost as e:  # queued again: its retry resumes from the user's checkpoint
            return self.lost(begun, str(e), {"history": user.history if user else []})
        except RankFailed as e:
            return Ended.of(self._record_end(begun, f"error: {e}", user,
                                             {"traceback": e.traceback}))
        except Exception as e:  # noqa: BLE001 - the user's error, recorded as the trial's
            lines = traceback.format_exception(e)
            # The traceback's last line, as Python prints it: the type and the message's
            # first line (the rest is in the traceback attr).
            message = next((line for line in str(e).splitlines() if line.strip()), "")
            reason = f"{type(e).__name__}: {message}" if message else type(e).__name__
            return Ended.of(self._record_end(begun, f"error: {reason}", user,
                                             {"traceback": "".join(lines)[-8000:]}))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: queued again to resume
            self._record_end(begun, INTERRUPTED, user)
            raise
        return self._finish(begun, user, values, stopped, output,
                            returned=self._returned(returned))

    def _start(self, begun: TrialStart) -> Trial:
        """The trial's start attrs and the `Trial` the user's code gets (a retry's checkpoint
        folder holds the dead trial's checkpoints)."""
        trial = begun.trial
        device = self._device()
        begun.start_attrs.update(host=self.host, pid=os.getpid(), device=device)
        begun.retried_from = self.begin(trial, begun.start_attrs)
        directory = self.checkpoint_directory(trial.number, begun.retried_from)
        return Trial(number=trial.number, study_name=self.spec.name, params=begun.params,
                     device=device, threads=self.threads, epochs=self.spec.budget.epochs,
                     checkpoint_dir=directory, stop=self.stop,
                     on_report=functools.partial(self._on_report, trial))

    def _call(self, user: Trial, output: dict[str, str]) -> Any:
        """What the user's function returned (None for a command, or when it was pruned)."""
        try:
            if self.function is not None and self.spec.resources.width > 1:
                return self._fit_ranks(user)
            if self.function is not None:
                return self.function(dict(user.params), user)
            return run_command(self.spec, user, output)
        except Pruned:
            return None

    def _fit_ranks(self, user: Trial) -> Any:
        """The user's function in each of the trial's ranks; what rank 0's returned. `user`
        is the worker's record of the trial: rank 0's reports, the pruner's verdicts."""
        assert self.trainer.function is not None
        job = FitJob(self.trainer.function, user.number, user.study_name, user.params,
                     user.epochs, str(user.checkpoint_dir) if user.checkpoint_dir else None,
                     user.final, user.seed)
        return run_ranks(fit_rank, job, self.placement(user.device),
                         on_report=functools.partial(_verdict, user), label=f"trial #{user.number}",
                         preload=_module_of(self.trainer.function))

    def _on_report(self, trial: optuna.Trial, epoch: int, values: dict[str, float]
                   ) -> str | None:
        """A report of the user's: shown, given to the pruner; why the trial should stop."""
        metric = self.metrics[0]
        if self.on_epoch is not None:
            self.on_epoch(trial.number, Reported(epoch, values))  # type: ignore[arg-type]
        if metric not in values:
            return None
        value = values[metric]
        if not math.isfinite(value):
            return f"diverged: {metric} is {value} at epoch {epoch}"
        if len(self.metrics) == 1:
            report_or_taken_over(trial, value, epoch)
            if with_retry(trial.should_prune, what="asking the pruner"):
                return f"pruned at epoch {epoch}"
        return None

    def _record_end(self, begun: TrialStart, ended: str, user: Trial | None,
                    extra: dict[str, Any] | None = None) -> TrialOutcome:
        """A trial that did not run to a result: why (`ended`) and what it reported."""
        extra = {**(extra or {}), "history": user.history if user else []}
        return self.record_failure(begun.trial, ended, begun.start_attrs, begun.params,
                                   begun.started, extra)

    def _finish(self, begun: TrialStart, user: Trial, values: list[float] | None,
                stopped: str | None, output: dict[str, str], *,
                returned: dict[str, float]) -> Ended:
        """The trial's end attrs and artifacts, written with its result as it is told."""
        trial, metric = begun.trial, self.metrics[0]
        seconds = round(time.perf_counter() - begun.started, 3)
        history = user.history
        ended = stopped or "completed"
        end_attrs: dict[str, Any] = {"history": history, "epochs_run": len(history),
                                     "seconds": seconds, "ended": ended}
        if returned:  # what constraints: may bound besides the reports
            end_attrs[RETURNED_ATTR] = returned
        if begun.retried_from is not None:
            end_attrs["resumed_from_epoch"] = user.resumed_from_epoch
        links: dict[str, str] = {}
        if self.artifacts is not None:
            written = self.artifacts.write_user(trial, ended, history, begun.params, output,
                                                self.spec.budget.epochs)
            if written is not None:
                end_attrs["artifact_seconds"] = round(written.seconds, 3)
                links = written.links
        self.record_result(trial, end_attrs, links)
        last = next((r[metric] for r in reversed(history) if metric in r), None)
        shown = TrialOutcome(trial.number, "COMPLETE" if values else "PRUNED", values, last,
                             begun.params, len(history), seconds, ended)
        return Ended.of(shown, clear=self.checkpoints_of(user.checkpoint_dir,
                                                         begun.retried_from))

    def _returned(self, returned: Any) -> dict[str, float]:
        """The finite numbers a function returned, by metric (a bare number is the
        objective's)."""
        given = returned if isinstance(returned, dict) else {self.metrics[0]: returned}
        out = {}
        for key, value in given.items():
            if isinstance(value, (bool, str)):
                continue
            try:
                number = float(value)  # a numpy or 0-d torch scalar too
            except (TypeError, ValueError, RuntimeError):
                continue
            if math.isfinite(number):
                out[str(key)] = number
        return out

    def _values(self, user: Trial, returned: Any) -> tuple[list[float] | None, str | None]:
        """The objective values (None when stopped) and why the trial stopped."""
        if user.stopped:
            return None, user.stopped
        metrics = self.metrics
        given: dict[str, Any] = {}
        if isinstance(returned, dict):
            given = returned
        elif returned is not None:
            if len(metrics) > 1:
                raise TrialFailed(f"returned {returned!r}; with several objectives return a "
                                  f"mapping of {', '.join(metrics)}")
            given = {metrics[0]: returned}
        values = []
        for metric in metrics:
            if metric in given:
                number = _api.check_report(0, {metric: given[metric]}, None)[metric]
            else:
                number = next((r[metric] for r in reversed(user.history) if metric in r), None)
            if number is None:
                raise TrialFailed(f"never reported the objective metric {metric!r} (reported: "
                                  f"{', '.join(_reported(user.history)) or 'nothing'})")
            if not math.isfinite(number):
                return None, f"diverged: {metric} is {number}"
            values.append(number)
        return values, None


def _verdict(user: Trial, report: tuple[int, dict[str, float]]) -> Verdict:
    """Rank 0's report, recorded on the worker's `user` trial: the verdict every rank acts on."""
    epoch, values = report
    try:
        user.report(epoch, **values)
    except StopRequested as stop:
        return ("stop", str(stop))
    except Pruned as pruned:
        return ("pruned", str(pruned))
    return None


def _module_of(function: str) -> tuple[str, ...]:
    """The module a `module:function` trainer's ranks import, for their fork server to import
    once; none for `__main__` (the server would run the worker's main script again)."""
    module = function.partition(":")[0]
    return () if module == "__main__" else (module,)


def _reported(history: list[dict[str, float]]) -> list[str]:
    return sorted({k for r in history for k in r if k != "epoch"})
