"""The worker's heartbeat and the RDB fast paths it rides on, on SQLite and PostgreSQL.

The end-to-end proof (a SIGKILLed worker's trial goes stale and its retry resumes) is in
test_workers.py; these pin the pieces: one thread per worker and none of Optuna's, a beat from
a trial's first moment, a stale check at most once an interval, attributes replaced in one
transaction and refused on a finished trial.
"""

from __future__ import annotations

import itertools
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

import trainers
from search.run import create_or_load
from search.spec import parse_spec
from search.storage import (
    WorkerHeartbeat,
    open_storage,
    quiet_optuna_warnings,
    set_user_attrs,
    worker_study,
)
from search.storage._tables import first_heartbeat
from search.storage._trial_start import WorkerStorage
from search.workers import run_worker
from tests.search_tests.studies import study_data

quiet_optuna_warnings()
# study.ask on a heartbeat storage warns that heartbeats are meant for optimize: here the test
# plays the worker.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")

def _spec(name: str, tmp_path, *, trials: int = 2, epochs: int = 1, space=None):
    return parse_spec(study_data(name, trials=trials, epochs=epochs, space=space, size=256,
                                 hidden=8, checkpoints=tmp_path / "ckpt", heartbeat=True))


def _open(url: str, spec):
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    return create_or_load(spec, storage)

def _beats(study: optuna.Study) -> dict[int, object]:
    """trial number → its heartbeat time, read straight from the table."""
    engine = study._storage._backend.engine
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text(
            "SELECT t.number, h.heartbeat FROM trial_heartbeats h "
            "JOIN trials t ON t.trial_id = h.trial_id WHERE t.study_id = :s"),
            {"s": study._study_id}).all()
    return dict(rows)

def test_one_worker_thread_beats_from_the_first_moment_and_optuna_starts_none(
        storage_url, study_name, tmp_path, monkeypatch):
    spec = _spec(study_name, tmp_path, trials=2)
    study = _open(storage_url, spec)
    seen = []
    real_train = trainers.train

    def train(config, on_epoch=None, checkpoint=None, **kwargs):
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        first = _beats(study).get(running[0].number)
        time.sleep(2.5)  # more than the interval: the worker's thread beats again
        seen.append((first, _beats(study)[running[0].number],
                     [t.name for t in threading.enumerate()]))
        return real_train(config, on_epoch, checkpoint, **kwargs)

    monkeypatch.setattr(trainers, "train", train)
    run_worker(study, spec, device="cpu", artifacts=False)
    assert len(seen) == 2
    for first, later, threads in seen:
        assert first is not None  # written before the objective ran
        assert later > first
        assert threads.count("hpsearch-heartbeat") == 1
        assert not [n for n in threads if "_record_heartbeat" in n]  # Optuna's per-trial one
    assert "hpsearch-heartbeat" not in [t.name for t in threading.enumerate()]  # closed

def test_worker_study_shares_the_engine_with_heartbeats_off(sqlite_url, study_name, tmp_path):
    study = _open(sqlite_url, _spec(study_name, tmp_path))
    view = worker_study(study, budget=5)
    backend = study._storage._backend
    assert isinstance(view._storage._backend, WorkerStorage)
    assert view._storage._backend.engine is backend.engine
    assert view._storage.get_heartbeat_interval() is None
    assert backend.heartbeat_interval == 1  # the caller's storage is untouched
    assert view.study_name == study.study_name and view.sampler is study.sampler
    plain = create_or_load(_spec(study_name + "x", tmp_path), open_storage(sqlite_url))
    assert not worker_study(plain, budget=5)._storage._backend.beat  # none configured

def test_a_started_trial_has_its_heartbeat_from_its_creation(storage_url, study_name, tmp_path):
    study = _open(storage_url, _spec(study_name, tmp_path))
    view = worker_study(study, budget=5)
    trial = view.ask()
    # Read on another connection: the row was committed with the trial, in one transaction.
    assert list(_beats(study)) == [trial.number]
    assert view._storage._backend.beaten == trial._trial_id
    study.enqueue_trial({"lr": 0.01})  # a template trial: not started, no beat
    assert list(_beats(study)) == [trial.number]

def test_a_workers_trial_has_no_attribute_transaction_of_its_own(
        storage_url, study_name, tmp_path, monkeypatch):
    import os
    import socket

    import search.trial._objective

    spec = _spec(study_name, tmp_path, trials=1,
                 space={"lr": {"low": 1e-3, "high": 0.1, "log": True},
                        "batch_size": {"pow2": [16, 64]}})
    study = _open(storage_url, spec)
    seen, writes = [], []
    real_train, real_set = trainers.train, search.trial._objective.set_user_attrs

    def train(config, on_epoch=None, checkpoint=None, **kwargs):
        # Read on another connection while the trial runs: committed before training.
        fresh = optuna.load_study(study_name=study_name, storage=storage_url)
        seen.append((config.batch_size, fresh.get_trials(states=(TrialState.RUNNING,))))
        return real_train(config, on_epoch, checkpoint, **kwargs)

    monkeypatch.setattr(trainers, "train", train)
    monkeypatch.setattr(search.trial._objective, "set_user_attrs",
                        lambda trial, attrs, **kw: (writes.append(sorted(attrs)),
                                                    real_set(trial, attrs, **kw)))
    run_worker(study, spec, device="cpu", artifacts=False)
    (batch_size, running), = seen
    attrs = running[0].user_attrs
    assert attrs["host"] == socket.gethostname() and attrs["pid"] == os.getpid()
    assert attrs["device"] == "cpu"
    assert attrs["batch_size"] == batch_size == 2 ** running[0].params["log2_batch_size"]
    assert writes == []  # start attrs with the creation, the result's with the tell
    done = study.get_trials()[0]
    assert done.state == TrialState.COMPLETE and done.user_attrs["batch_size"] == batch_size
    assert done.user_attrs["ended"] == "completed" and len(done.user_attrs["history"]) == 1

@pytest.mark.parametrize("state", [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
def test_result_attrs_are_written_by_the_tell_that_finishes_the_trial(
        storage_url, study_name, tmp_path, state):
    from search.storage import with_result

    study = _open(storage_url, _spec(study_name, tmp_path))
    view = worker_study(study, budget=5)
    trial = view.ask()
    trial.report(0.5, 1)
    assert with_result(trial, {"ended": state.name.lower(), "history": [{"epoch": 1}]},
                       {"artifact:curves": "abc"})
    assert "ended" not in study.get_trials()[0].user_attrs  # not before the tell
    view.tell(trial, 0.25 if state == TrialState.COMPLETE else None, state=state)
    done = optuna.load_study(study_name=study_name, storage=storage_url).get_trials()[0]
    assert done.state == state
    assert done.value == (0.25 if state == TrialState.COMPLETE else
                          (0.5 if state == TrialState.PRUNED else None))
    assert done.user_attrs["ended"] == state.name.lower()
    assert done.system_attrs["artifact:curves"] == "abc"
    # A result for another trial is not written on this one, and is dropped once told.
    other = view.ask()
    with_result(trial, {"ended": "stale"})
    view.tell(other, 1.0)
    assert "ended" not in study.get_trials()[1].user_attrs
    assert view._storage._backend._with_result is None
    # A trial already finished elsewhere: refused, and nothing is written on it.
    third = view.ask()
    study.tell(third.number, 2.0)
    with_result(third, {"ended": "late"})
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        view._storage._backend.set_trial_state_values(third._trial_id, TrialState.COMPLETE,
                                                      [3.0])
    assert "ended" not in study.get_trials()[2].user_attrs

def test_stale_trials_fail_at_most_once_an_interval_unless_waiting(
        sqlite_url, study_name, tmp_path, monkeypatch):
    study = _open(sqlite_url, _spec(study_name, tmp_path))
    calls = []
    monkeypatch.setattr(optuna.storages, "fail_stale_trials", lambda s: calls.append(s))
    heartbeat = WorkerHeartbeat(study)
    heartbeat.fail_stale()
    heartbeat.fail_stale()
    assert len(calls) == 1
    heartbeat.fail_stale(now=True)
    assert len(calls) == 2
    time.sleep(1.05)
    heartbeat.fail_stale()
    assert len(calls) == 3 and calls[0] is study

def test_a_dead_trial_goes_stale_and_is_queued_for_retry(storage_url, study_name, tmp_path):
    study = _open(storage_url, _spec(study_name, tmp_path))
    trial = study.ask()
    first_heartbeat(study._storage, trial._trial_id)  # then the "worker" dies: no more beats
    heartbeat = WorkerHeartbeat(study)
    heartbeat.fail_stale(now=True)
    assert study.trials[0].state == TrialState.RUNNING  # within the grace period
    time.sleep(4.5)  # past the 3 s grace period, in SQLite's whole seconds too
    heartbeat.fail_stale(now=True)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.WAITING]

def test_attributes_are_replaced_with_their_links_and_refused_once_finished(
        storage_url, study_name, tmp_path):
    study = _open(storage_url, _spec(study_name, tmp_path))
    trial = study.ask()
    set_user_attrs(trial, {"host": "dead", "pid": 1})  # as a retry inherits them
    set_user_attrs(trial, {"host": "alive", "device": "cpu"},
                   system_attrs={"artifacts:x": "{}"})
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.user_attrs == {"host": "alive", "pid": 1, "device": "cpu"}
    assert frozen.system_attrs["artifacts:x"] == "{}"
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"late": True})



def test_a_retry_reports_the_epochs_its_checkpoint_holds_but_the_dead_trial_never_reported(
        tmp_path):
    """The trainer checkpoints an epoch before it reports it: a worker lost between the two
    leaves its retry a checkpoint one report ahead. The retry reports the gap at its end."""
    from search.trial import Objective

    spec = _spec("gap", tmp_path, epochs=3)
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 'gap.db'}"))
    trial = study.ask()
    trial.report(0.9, 1)  # the dead trial reported epoch 1; its checkpoint holds epochs 1-2

    def epoch(n: int) -> trainers.EpochMetrics:
        return trainers.EpochMetrics(
            epoch=n, train_loss=1.0 / n, train_accuracy=0.5, val_loss=1.0 / n,
            val_accuracy=0.5, lr=0.1, momentum=None, grad_norms={}, epoch_seconds=0.1,
            train_seconds=0.1, samples_per_second=1.0)

    trial.report(1.0 / 3, 3)  # the retry's own report, live, after it resumed
    resumed = trainers.TrainResult(status="completed", reason="done",
                                   history=(epoch(1), epoch(2), epoch(3)), seconds=0.3,
                                   resumed_from_epoch=2)
    Objective(spec).report_restored(trial, resumed)
    reported = study.trials[0].intermediate_values
    assert reported == {1: 0.9, 2: 0.5, 3: 1.0 / 3}  # epoch 1 kept as the dead trial said it


def _timed_beats(study: optuna.Study, heartbeat: WorkerHeartbeat, monkeypatch,
                 took: list[float]) -> tuple[list[float], list[float]]:
    """The storage's beats made to take took[0] seconds each (a storage or proxy that answers
    late): when each beat and each `hpsearch stop` check began."""
    beats: list[float] = []
    checks: list[float] = []
    record = heartbeat.storage.record_heartbeat

    def slow_beat(trial_id: int) -> None:
        beats.append(time.monotonic())
        time.sleep(took[0])
        record(trial_id)

    def stop_check(study: optuna.Study) -> bool:
        checks.append(time.monotonic())
        time.sleep(took[0])
        return False

    monkeypatch.setattr(heartbeat.storage, "record_heartbeat", slow_beat)
    monkeypatch.setattr("search.storage._heartbeat.stop_requested", stop_check)
    return beats, checks


def test_beats_are_one_wait_apart_when_the_storage_answers_late(tmp_path, study_name,
                                                               monkeypatch):
    """Each call takes 0.8 s with a 1 s interval: the stop check waits for rounds that come
    back in time, so a trial's beats are an interval and one wait apart (1.8 s), not two waits
    (2.6 s, the check between them). When calls are quick again, the check runs."""
    spec = _spec(study_name, tmp_path)
    study = _open(f"sqlite:///{tmp_path / 'hb.db'}", spec)
    trial_id = worker_study(study, 2).ask()._trial_id
    heartbeat = WorkerHeartbeat(study)
    took = [0.8]
    beats, checks = _timed_beats(study, heartbeat, monkeypatch, took)
    heartbeat.begin(trial_id, written=True)
    time.sleep(4.9)
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert len(beats) >= 2 and max(gaps) < 2.2, beats
    assert checks == []  # put off: every round was late
    took[0] = 0.0
    time.sleep(2.2)
    heartbeat.close()
    assert checks, "a round in time checks for `hpsearch stop` again"


def test_a_trial_whose_start_was_held_up_beats_at_once(tmp_path, study_name, monkeypatch):
    """A trial's first beat was written with it, but its start came back late (asked 2.5 s
    ago; a 1 s interval, a 3 s grace: its next round, up to 1 s away, could come too late):
    the thread beats for it at once."""
    spec = _spec(study_name, tmp_path)
    study = _open(f"sqlite:///{tmp_path / 'hb.db'}", spec)
    view = worker_study(study, 2)
    first, second = view.ask()._trial_id, view.ask()._trial_id
    heartbeat = WorkerHeartbeat(study)
    beats, _ = _timed_beats(study, heartbeat, monkeypatch, [0.0])
    heartbeat.begin(first, written=True, since=time.monotonic())  # in time: the next round
    time.sleep(0.3)
    assert beats == []
    begun = time.monotonic()
    heartbeat.begin(second, written=True, since=begun - 2.5)
    time.sleep(0.3)
    heartbeat.close()
    assert len(beats) == 2 and beats[0] - begun < 0.3  # one round: both trials, at once
