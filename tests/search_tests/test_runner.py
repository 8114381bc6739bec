"""The trial runner: every way a trial can end, as a value, and what the runner does with it.

A scripted kind of trial stands in for the trainers (each of which returns these values: their
own tests run them through real workers); the storage is real SQLite, with heartbeats.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.storage import (
    INTERRUPTED,
    Counts,
    NullLock,
    WorkerHeartbeat,
    open_storage,
    worker_study,
)
from search.trial import GPU_FULL, STOP_REQUESTED, End, Ended, TrialOutcome, TrialRunner


class Scripted:
    """A kind of trial that ends each trial as its script says, marking an interrupted one as
    the trainers do."""

    def __init__(self, *ends: End | BaseException) -> None:
        self.ends = list(ends)
        self.cleared: list[tuple[Path | None, ...]] = []

    def run(self, trial: optuna.Trial) -> Ended:
        trial.suggest_float("x", 0.0, 1.0)
        trial.report(0.5, 1)
        end = self.ends.pop(0)
        if isinstance(end, BaseException):
            if isinstance(end, KeyboardInterrupt):
                trial.set_user_attr("ended", INTERRUPTED)
            raise end
        if end.queued_again:
            trial.set_user_attr("ended", INTERRUPTED)
        shown = TrialOutcome(trial.number, {End.COMPLETE: "COMPLETE", End.PRUNED: "PRUNED"}
                             .get(end, "FAIL"), [0.25] if end is End.COMPLETE else None, 0.5,
                             trial.params, 1, 0.1, end.value)
        values = [0.25] if end is End.COMPLETE else None
        return Ended(end, values, shown, reason="the GPU is shared",
                     clear=(Path(f"/nowhere/trial-{trial.number}"),))

    def clear_checkpoints(self, directories: tuple[Path | None, ...]) -> None:
        self.cleared.append(directories)


@pytest.fixture
def make(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'runner.db'}", heartbeat_interval=60,
                           grace_period=120)
    study = optuna.create_study(study_name="runner", storage=storage)
    made = []

    def runner(kind: Scripted, budget: int = 10) -> TrialRunner:
        heartbeat = WorkerHeartbeat(study)
        made.append(heartbeat)
        return TrialRunner(kind, study, worker_study(study, budget), heartbeat, NullLock(),
                           budget)

    yield study, runner
    for heartbeat in made:
        heartbeat.close()


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_a_finished_trial_is_told_and_shown_and_its_checkpoints_cleared(make):
    study, runner = make
    kind = Scripted(End.COMPLETE, End.PRUNED, End.FAILED)
    run = runner(kind)
    steps = [run.step() for _ in range(3)]
    assert states(study) == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert study.trials[0].value == 0.25 and study.trials[1].value == 0.5  # its last report
    assert [[o.state for o in s.outcomes] for s in steps] == [["COMPLETE"], ["PRUNED"], ["FAIL"]]
    assert all(not s.stop and s.full is None for s in steps)
    assert [d[0].name for d in kind.cleared] == ["trial-0", "trial-1", "trial-2"]
    assert not run.live


@pytest.mark.parametrize(("end", "stop"), [(End.INTERRUPTED, STOP_REQUESTED),
                                          (End.GPU_FULL, GPU_FULL)])
def test_an_interrupted_trial_is_queued_again_and_the_worker_told_to_stop(make, end, stop,
                                                                          caplog):
    study, runner = make
    kind = Scripted(end)
    with caplog.at_level(logging.INFO, logger="hpsearch"):
        step = runner(kind).step()
    assert step.stop == stop and not step.outcomes
    first, retry = study.get_trials(deepcopy=False)
    assert first.state == TrialState.FAIL and first.user_attrs["ended"] == INTERRUPTED
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert not kind.cleared  # its retry resumes from its checkpoints
    said = [r.getMessage() for r in caplog.records if r.name == "hpsearch.trial"]
    assert ("trial #0: the GPU is shared" in said) == (end is End.GPU_FULL)


def test_a_trial_taken_over_is_dropped_untold(make, caplog):
    study, runner = make
    with caplog.at_level(logging.INFO, logger="hpsearch"):
        step = runner(Scripted(End.TAKEN_OVER)).step()
    assert step.outcomes == [] and not step.stop
    assert states(study) == [TrialState.RUNNING]  # others finish it, not this worker
    assert "its late result is dropped" in caplog.text


class FailsItAsStale(optuna.samplers.RandomSampler):
    """A sampler whose `after_trial` (Optuna calls it inside `tell`, between reading the trial's
    state and writing the new one) has another worker fail the trial as stale meanwhile: the
    race of a tell against a stale-trial scan, made certain."""

    def __init__(self, storage_url: str) -> None:
        super().__init__(seed=0)
        self.other = open_storage(storage_url)

    def after_trial(self, study, trial, state, values) -> None:
        self.other.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def test_a_trial_failed_as_stale_during_its_tell_is_dropped_and_the_worker_goes_on(make,
                                                                                  caplog):
    study, runner = make
    study.sampler = FailsItAsStale(study._storage._backend.url)
    with caplog.at_level(logging.INFO, logger="hpsearch"):
        step = runner(Scripted(End.COMPLETE)).step()
    assert step.outcomes == [] and not step.stop
    assert states(study) == [TrialState.FAIL]  # as the other worker left it, for its retry
    assert "its late result is dropped" in caplog.text


def test_an_error_escaping_the_trial_fails_it_and_is_logged(make, caplog):
    study, runner = make
    run = runner(Scripted(RuntimeError("the storage hiccuped"), End.COMPLETE))
    with caplog.at_level(logging.WARNING, logger="hpsearch"):
        run.step()
    failed = [r for r in caplog.records if r.name == "hpsearch.trial"]
    assert len(failed) == 1 and "the storage hiccuped" in failed[0].getMessage()
    assert failed[0].exc_info is not None  # shown with its traceback
    assert states(study) == [TrialState.FAIL]
    run.step()  # the worker goes on
    assert states(study) == [TrialState.FAIL, TrialState.COMPLETE]


def test_ctrl_c_queues_the_trial_again_and_is_raised_on(make):
    study, runner = make
    run = runner(Scripted(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run.step()
    first, retry = study.get_trials(deepcopy=False)
    assert first.state == TrialState.FAIL and first.user_attrs["ended"] == INTERRUPTED
    assert retry.state == TrialState.WAITING and not run.live


def test_no_trial_starts_past_the_budget(make):
    study, runner = make
    run = runner(Scripted(End.COMPLETE, End.COMPLETE), budget=1)
    assert run.step().outcomes[0].state == "COMPLETE"
    full = run.step().full
    assert isinstance(full, Counts) and full.complete == 1 and len(study.trials) == 1
    run.set_budget(2)  # `run --trials` moved it
    assert run.step().outcomes[0].state == "COMPLETE" and len(study.trials) == 2


def test_the_runner_counts_first_where_the_storage_cannot_admit(make):
    study, runner = make
    run = runner(Scripted(End.COMPLETE), budget=1)
    run.view = study  # as through the gRPC proxy: no admitting view
    run.step()
    assert run.step().full.complete == 1 and len(study.trials) == 1
