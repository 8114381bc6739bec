"""The storage proxy under many workers: its threads share their re-reads of a study, and its
workers' heartbeats are written together, with nothing a worker would see alone lost or late."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import FloatDistribution

from search.storage import _compat, open_storage
from search.storage._compat import backend_of, shared_reads_cache
from search.storage._proxy_methods import _Beats
from search.storage._reader import ReadingStorage, reading
from search.storage._tables import record_heartbeats

X = FloatDistribution(0.0, 1.0)


CALLS = 8  # each reading thread's


def test_concurrent_reads_share_a_read_begun_after_they_came_in(
        sqlite_url: str, study_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve threads read the study while another adds trials: every read holds each trial
    added before it began, and the reads share the database's: fewer of them than calls.

    A read takes 0.2 s, long beside a thread's wake-up on a loaded machine: with 0.05 s, a CI
    run (two test processes and multi-process trials beside) gave 92 reads for 180 calls, the
    waiters split into small groups. (Groups split here even when idle: the threads a read
    served wait for the cache's lock, which the next read may hold already, to return.)"""
    backend = reading(open_storage(sqlite_url))
    assert isinstance(backend, ReadingStorage)
    # The writer: another client, Optuna's own storage (its reads are not the cache's).
    study = optuna.create_study(study_name=study_name,
                                storage=optuna.storages.RDBStorage(sqlite_url))
    cache = shared_reads_cache(backend)
    study_id = cache.get_study_id_from_name(study_name)
    reads = []
    real = ReadingStorage._get_trials

    def slow(self, *args, **kwargs):
        reads.append(1)
        time.sleep(0.2)  # a read long enough for calls to pile up behind it
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ReadingStorage, "_get_trials", slow)
    added: list[int] = []  # numbers of trials whose creation ended, in order
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            trial = study.ask()
            added.append(trial.number)
            time.sleep(0.005)

    def reader() -> list[str]:
        problems = []
        for _ in range(CALLS):
            before = len(added)  # these trials exist before this call
            seen = {t.number for t in cache.get_all_trials(study_id, deepcopy=False)}
            missing = set(added[:before]) - seen
            if missing:
                problems.append(f"missing {sorted(missing)[:5]}")
        return problems

    writing = threading.Thread(target=writer)
    writing.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: reader(), range(12)))
    finally:
        stop.set()
        writing.join()
    assert [p for r in results for p in r] == []
    assert len(added) > 10
    # Shared: fewer reads than three quarters of the calls (each call its own read: all of
    # them). Here 25-27 of 96 idle, 32-45 beside three busy processes on two cores.
    assert len(reads) < 12 * CALLS * 3 / 4, len(reads)


def test_beats_are_written_in_batches_and_each_call_returns_once_its_own_is() -> None:
    written: set[int] = set()
    batches: list[list[int]] = []

    def write(ids: list[int]) -> None:
        time.sleep(0.01)
        batches.append(ids)
        written.update(ids)

    beats = _Beats(write)

    def beat(trial_id: int) -> bool:
        beats.beat([trial_id])
        return trial_id in written

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(beat, range(200)))
    assert sorted(i for b in batches for i in b) == list(range(200))  # each once
    assert len(batches) < 100, len(batches)


def test_a_batch_that_fails_raises_in_each_of_its_calls() -> None:
    def write(ids: list[int]) -> None:
        raise ConnectionError("server went away")

    beats = _Beats(write)
    with pytest.raises(ConnectionError, match="went away"):
        beats.beat([1])
    beats.write = lambda ids: None
    beats.beat([2])  # the next batch is written as usual


def _beats(engine: sa.Engine, ids: list[int]) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT trial_id, heartbeat FROM trial_heartbeats WHERE trial_id IN "
            f"({', '.join(map(str, ids))})")).all())


@pytest.mark.parametrize("url", ["sqlite_url", "postgres_url"])
def test_heartbeats_of_many_trials_in_one_statement(url: str, study_name: str,
                                                    request: pytest.FixtureRequest) -> None:
    storage = open_storage(request.getfixturevalue(url), heartbeat_interval=60)
    study = optuna.create_study(study_name=study_name, storage=storage)
    ids = [study.ask()._trial_id for _ in range(3)]
    engine = backend_of(storage).engine
    statements = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda *args: statements.append(args[2]))
    record_heartbeats(storage, ids)
    assert sum("trial_heartbeats" in s for s in statements) == 1  # one statement, 3 rows
    beats = _beats(engine, ids)
    assert set(beats) == set(ids)
    record_heartbeats(storage, [*ids, 987654])  # not a trial: passed over, the others beat
    again = _beats(engine, ids)
    assert all(again[i] >= beats[i] for i in ids)


def test_the_services_trials_are_optunas_own_as_trials_change(sqlite_url: str,
                                                              study_name: str) -> None:
    """GetTrials keeps a trial's message while the trial is unchanged; a trial that changes
    (a report, its end) is answered anew, message for message as Optuna's own service."""
    from optuna.storages._grpc.auto_generated import api_pb2

    storage = shared_reads_cache(reading(open_storage(sqlite_url)))
    ours, optunas = _compat._storage_service_class()(storage), _compat._grpc_part(0)(storage)
    study = optuna.create_study(study_name=study_name, storage=storage)
    request = api_pb2.GetTrialsRequest(study_id=study._study_id, trial_id_greater_than=-1)
    running = [study.ask() for _ in range(3)]
    for step in range(3):
        for trial in running:
            trial.suggest_float(f"x{step}", 0.0, 1.0)
            trial.report(0.1 * step, step)
        for _ in range(2):  # the second time from the kept messages
            assert ours.GetTrials(request, None) == optunas.GetTrials(request, None)
    study.tell(running[0], 0.5)
    assert ours.GetTrials(request, None) == optunas.GetTrials(request, None)
    assert ours.GetTrials(request, None).trials[0].state == api_pb2.COMPLETE


def test_a_kept_message_is_for_a_trial_equal_in_every_field() -> None:
    """The service's comparison of a re-read trial with the one whose message it kept agrees
    with FrozenTrial's `==` as each of its fields changes (a field Optuna adds fails here),
    without asking either trial for its `__dict__` (see `_compat._same_trial`)."""
    import copy
    import datetime

    from optuna.trial import FrozenTrial, TrialState

    start = datetime.datetime(2026, 12, 7, 10, 0)
    trial = FrozenTrial(number=3, state=TrialState.COMPLETE, value=0.5, datetime_start=start,
                        datetime_complete=start + datetime.timedelta(seconds=5),
                        params={"x": 0.25}, distributions={"x": X}, user_attrs={"u": 1},
                        system_attrs={"s": 2}, intermediate_values={1: 0.7}, trial_id=9)
    changes = {"_number": 4, "state": TrialState.PRUNED, "_values": [0.6],
               "_datetime_start": start + datetime.timedelta(seconds=1),
               "datetime_complete": None, "_params": {"x": 0.5},
               "_distributions": {"x": FloatDistribution(0.0, 2.0)}, "_user_attrs": {"u": 2},
               "_system_attrs": {}, "intermediate_values": {1: 0.7, 2: 0.6}, "_trial_id": 9}
    assert set(changes) == set(vars(copy.deepcopy(trial)))  # every field Optuna keeps
    same = copy.deepcopy(trial)
    assert _compat._same_trial(trial, same) and trial == same
    for name, value in changes.items():
        other = copy.deepcopy(trial)
        setattr(other, name, value)
        assert _compat._same_trial(trial, other) == (trial == other), name
        if name != "_trial_id":  # (the id is the cache's key: never two trials under one)
            assert not _compat._same_trial(trial, other), name


def test_the_servers_pool_knows_how_long_its_oldest_waiting_call_has_waited() -> None:
    """One thread, held: the calls behind it wait, the oldest's wait grows; once they ran,
    nothing waits."""
    from search.storage._proxy import QueuedPool

    pool = QueuedPool(1)
    release = threading.Event()
    try:
        held = pool.submit(release.wait)
        time.sleep(0.1)  # the first call has its thread: it waits for nothing
        assert pool.oldest_wait() == 0.0
        behind = [pool.submit(lambda i=i: i) for i in range(3)]
        time.sleep(0.3)
        assert 0.25 < pool.oldest_wait() < 5
        release.set()
        assert held.result(timeout=10) and [f.result(timeout=10) for f in behind] == [0, 1, 2]
        assert pool.oldest_wait() == 0.0
    finally:
        release.set()
        pool.shutdown()
