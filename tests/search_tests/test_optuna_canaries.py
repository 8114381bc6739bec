"""Compatibility canaries: what hpsearch assumes of Optuna's internals, checked on the installed
release.

Every private name hpsearch uses goes through `search.storage._compat`. These tests fail first
when an Optuna release moves one: the names and columns are there, the trial reader returns
exactly what Optuna's RDB storage returns (in two queries where Optuna's take seven), and with
the fast paths off a study runs on Optuna's public path alone, with one warning line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.storages import RDBStorage
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

from search.storage import _compat, worker_study
from search.storage._reader import reader_for
from tests.search_tests.studies import LR, study_data

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def any_url(request):
    return request.getfixturevalue(f"{request.param}_url")

def _text(trial: optuna.trial.FrozenTrial) -> str:
    # repr, not ==: NaN intermediate values are equal to themselves only in their text. A dict's
    # keys are sorted: Optuna's own read leaves the order of attribute rows to the database.
    return repr(sorted((key, sorted(value.items(), key=repr) if isinstance(value, dict) else value)
                       for key, value in trial.__dict__.items()))

def _same(a: list[optuna.trial.FrozenTrial], b: list[optuna.trial.FrozenTrial]) -> None:
    assert [_text(t) for t in a] == [_text(t) for t in b]
    # Parameters keep Optuna's order (by param_id, as they were suggested).
    assert [list(t.params) for t in a] == [list(t.params) for t in b]

def _rich_study(storage: RDBStorage, name: str) -> tuple[int, int]:
    """Two studies holding every kind of row the reader builds trials from."""
    study = optuna.create_study(storage=storage, study_name=name,
                                directions=["minimize", "maximize"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 1e-3, 1.0, log=True)
        c = trial.suggest_categorical("c", ["a", None, 3.5, True])
        trial.suggest_int("i", 1, 9, step=2)
        trial.set_user_attr("history", [{"epoch": 1, "loss": 0.5, "gn": {"fc": 1e-9}}, None])
        trial.set_user_attr("host", "h\u00e9")
        trial.storage.set_trial_system_attr(trial._trial_id, "sys", {"k": [1, 2]})
        return x, float("inf") if c == "a" else -1.5

    study.optimize(objective, n_trials=10)
    study.enqueue_trial({"x": 0.5, "c": None})  # WAITING, with template params
    failed = study.ask()
    failed.suggest_float("x", 1e-3, 1.0, log=True)
    study.tell(failed, state=TrialState.FAIL)
    single = optuna.create_study(storage=storage, study_name=name + "-single")
    running = single.ask()
    running.suggest_float("y", -1.0, 1.0)
    for step, value in enumerate([1.0, float("nan"), float("inf"), float("-inf"), 1e-300]):
        running.report(value, step)
    done = single.ask()
    done.report(2.0, 0)
    single.tell(done, -math.inf)
    pruned = single.ask()
    pruned.report(3.0, 0)
    single.tell(pruned, state=TrialState.PRUNED)
    return study._study_id, single._study_id

def test_reads_equal_optunas_own(any_url, study_name):
    storage = RDBStorage(any_url)
    reader = reader_for()
    assert reader is not None
    for study_id in _rich_study(storage, study_name):
        ids = [t._trial_id for t in storage.get_all_trials(study_id)]
        cuts = [(set(), -1), (set(ids[:2]) | {10**9}, ids[len(ids) // 2]),
                (set(ids), ids[-1]), (set(), ids[0]), (set(), 10**9)]
        for states in (None, (TrialState.RUNNING,), (TrialState.WAITING,),
                       (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
            for included, greater in cuts:
                theirs = storage._get_trials(study_id, states, included, greater)
                with _create_scoped_session(storage.scoped_session) as session:
                    ours = reader.read(session, study_id, states, included, greater)
                _same(ours, theirs)
        for trial_id in ids:
            with _create_scoped_session(storage.scoped_session) as session:
                _same([reader.read_one(session, trial_id)], [storage.get_trial(trial_id)])

def test_a_workers_view_reads_what_optuna_reads(storage_url, study_name):
    storage = RDBStorage(storage_url)
    _rich_study(storage, study_name)
    for name in (study_name, study_name + "-single"):
        plain = optuna.load_study(study_name=name, storage=storage)
        view = worker_study(plain, budget=None)
        _same(view.get_trials(deepcopy=False), plain.get_trials(deepcopy=False))
        for trial in plain.get_trials(deepcopy=False):
            _same([view._storage.get_trial(trial._trial_id)], [trial])

def test_unknown_study_or_trial_is_a_key_error_as_in_optuna(sqlite_url):
    storage = RDBStorage(sqlite_url)
    reader = reader_for()
    with _create_scoped_session(storage.scoped_session) as session:
        with pytest.raises(KeyError):
            reader.read(session, 12345, None, set(), -1)
    with _create_scoped_session(storage.scoped_session) as session:
        with pytest.raises(KeyError):
            reader.read_one(session, 12345)
    with pytest.raises(KeyError):
        storage._get_trials(12345, None, set(), -1)

def _statements(storage: RDBStorage, read) -> int:
    count = [0]

    def counted(*_args) -> None:
        count[0] += 1

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", counted)
    try:
        read()
    finally:
        sqlalchemy.event.remove(storage.engine, "before_cursor_execute", counted)
    return count[0]

def test_a_read_takes_two_statements_where_optunas_takes_seven(postgres_url, study_name):
    storage = RDBStorage(postgres_url)
    study_id, single_id = _rich_study(storage, study_name)
    reader = reader_for()

    def ours(study_id=study_id) -> None:
        with _create_scoped_session(storage.scoped_session) as session:
            reader.read(session, study_id, None, set(), -1)

    def one(trial_id: int) -> None:
        with _create_scoped_session(storage.scoped_session) as session:
            reader.read_one(session, trial_id)

    assert _statements(storage, lambda: storage._get_trials(study_id, None, set(), -1)) == 7
    assert _statements(storage, ours) == 2
    running = storage.get_all_trials(single_id, states=(TrialState.RUNNING,))[0]._trial_id
    assert _statements(storage, lambda: storage.get_trial(running)) == 6
    assert _statements(storage, lambda: one(running)) == 2

def test_a_study_larger_than_a_chunk_reads_whole(sqlite_url, study_name):
    from search.storage._reader import CHUNK

    storage = RDBStorage(sqlite_url)
    study = optuna.create_study(storage=storage, study_name=study_name)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("i", 0, 3),
                   n_trials=2 * CHUNK + 5)
    reader = reader_for()

    def ours() -> list[optuna.trial.FrozenTrial]:
        with _create_scoped_session(storage.scoped_session) as session:
            return reader.read(session, study._study_id, None, set(), -1)

    _same(ours(), storage._get_trials(study._study_id, None, set(), -1))
    # One query for the trials and one per CHUNK of them for their rows.
    assert _statements(storage, ours) == 1 + 3


def test_the_installed_optuna_is_the_one_the_fast_paths_are_tested_on():
    """pyproject pins Optuna to `_compat.TESTED`; a release outside it gets the public path."""
    assert _compat.version() == _compat.TESTED, (
        f"Optuna {optuna.__version__} installed; update _compat.TESTED and pyproject together "
        "once these canaries pass on it")
    assert _compat.missing() is None


@pytest.mark.parametrize("model", sorted(_compat.COLUMNS))
def test_every_table_and_column_the_fast_paths_use_exists(model):
    table = getattr(_compat.models, model).__table__
    assert set(_compat.COLUMNS[model]) <= set(table.c.keys())


@pytest.mark.parametrize("owner,name", [(cls, name) for cls, names in _compat.METHODS.items()
                                        for name in names])
def test_every_private_method_search_storage_relies_on_exists(owner, name):
    assert callable(getattr(owner, name, None))


@pytest.mark.parametrize("index", range(len(_compat.GRPC_PARTS)))
def test_every_part_of_optunas_grpc_proxy_the_tls_proxy_is_built_from_exists(index):
    """The storage proxy with TLS and a token is Optuna's service, stub and client cache on
    hpsearch's own server and channel (Optuna's add an insecure port and build an insecure
    channel): each part, by the name `_compat` reaches it."""
    assert _compat._grpc_part(index) is not None


def test_optunas_grpc_service_is_the_one_the_token_check_guards():
    from optuna.storages import GrpcStorageProxy
    from optuna.storages._grpc.auto_generated import api_pb2

    service = api_pb2.DESCRIPTOR.services_by_name["StorageService"]
    assert service.full_name == _compat.GRPC_SERVICE
    assert set(_compat.storage_service_methods()) == set(service.methods_by_name)
    assert all(not m.client_streaming and not m.server_streaming for m in service.methods)
    assert callable(getattr(GrpcStorageProxy, "_setup", None))  # overridden for the channel


def test_a_proxy_client_with_hpsearchs_methods_is_optunas_heartbeat_and_keeps_its_channel():
    """The worker's proxy client is Optuna's client with a BaseHeartbeat mixed in (so Optuna's
    `is_heartbeat_enabled` sees its interval), and hpsearch's methods ride Optuna's channel."""
    import grpc
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    from search.storage._proxy_client import WorkerMethods

    assert _compat.BaseHeartbeat is BaseHeartbeat
    made = []

    def channel():
        made.append(grpc.insecure_channel("127.0.0.1:9"))  # never called: nothing listens
        return made[-1]

    proxy = _compat.grpc_proxy_client("127.0.0.1", 9, channel, mixin=WorkerMethods)
    assert isinstance(proxy, optuna.storages.GrpcStorageProxy) and not is_heartbeat_enabled(proxy)
    proxy.heartbeat_interval = 2
    assert is_heartbeat_enabled(proxy) and _compat.proxy_channel(proxy) is made[0]
    proxy.close()


def test_stale_trial_ids_are_optunas_own(sqlite_url, study_name):
    storage = RDBStorage(sqlite_url, heartbeat_interval=1, grace_period=1)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name)
    beating, silent = storage.create_new_trial(study_id), storage.create_new_trial(study_id)
    storage.record_heartbeat(silent)
    storage.record_heartbeat(beating)
    # SQLite's CURRENT_TIMESTAMP keeps whole seconds: only 2 s apart are two truncated clocks
    # surely more than the 1 s grace apart (1.5 s failed in CI when it straddled one tick)
    time.sleep(2.1)
    storage.record_heartbeat(beating)
    assert _compat.stale_trial_ids(storage, study_id) == [silent]


def test_a_trial_started_beside_optunas_cache_is_known_to_it_once_recorded(sqlite_url,
                                                                             study_name):
    """The proxy starts trials on its RDB storage, beside the cache wrapper Optuna's service
    sets params through: unrecorded, the wrapper does not know the trial (KeyError)."""
    backend = RDBStorage(sqlite_url)
    cached = optuna.storages.get_storage(backend)
    study_id = cached.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name)
    dist = optuna.distributions.FloatDistribution(0, 1)
    for record in (False, True):
        frozen = backend._create_new_trial(study_id)
        if record:
            _compat.cache_started_trial(cached, study_id, frozen)
            cached.set_trial_param(frozen._trial_id, "x", 0.5, dist)
            assert backend.get_trial(frozen._trial_id).params == {"x": 0.5}
        else:
            with pytest.raises(KeyError):
                cached.set_trial_param(frozen._trial_id, "x", 0.5, dist)
    _compat.cache_started_trial(backend, study_id, frozen)  # no cache: nothing to record


def test_another_optuna_release_takes_the_public_path_with_one_warning(monkeypatch, caplog,
                                                                       sqlite_url, study_name):
    monkeypatch.setattr(optuna, "__version__", "5.1.0")
    _compat.reset()
    try:
        assert "Optuna 5.1.0 is not the tested 5.0" in _compat.missing()
        storage = RDBStorage(sqlite_url)
        study = optuna.create_study(storage=storage, study_name=study_name)
        assert worker_study(study, budget=3) is study  # no view over Optuna's tables
        assert reader_for() is None
        assert _compat.rdb_backend(storage) is None
        _compat.fast_paths()
        warnings = [r.getMessage() for r in caplog.records
                    if r.name.startswith("hpsearch.") and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "public storage API" in warnings[0]
    finally:
        _compat.reset()


def test_a_study_runs_whole_on_the_public_path(tmp_path, sqlite_url):
    """The worker with every fast path off: the exact budget, every attribute, one warning."""
    space = {**LR, "batch_size": {"pow2": [32, 64]}}
    data = study_data("public-path", trials=4, epochs=2, space=space,
                      checkpoints=tmp_path / "ckpt", heartbeat=True)
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, _compat.FAST_PATHS_ENV: "0"}
    result = subprocess.run([HPSEARCH, "run", str(path), "--storage", sqlite_url, "--workers", "2"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # Said once, by the supervisor: the worker processes it starts stay quiet.
    assert result.stderr.count("uses Optuna's public storage API") == 1
    study = optuna.load_study(study_name="public-path", storage=sqlite_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4 and all(t.state == TrialState.COMPLETE for t in finished)
    for t in finished:
        assert {"host", "pid", "device", "history", "seconds", "ended"} <= set(t.user_attrs)
        assert t.user_attrs["batch_size"] == 2 ** t.params["log2_batch_size"]
        assert len(t.user_attrs["history"]) == 2
        links = [k for k in t.system_attrs if k.startswith("artifacts:")]
        assert len(links) == 4 and json.loads(t.system_attrs[links[0]])["filename"]


@pytest.mark.parametrize("state", [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
def test_tell_trial_stores_what_optunas_tell_stores_without_reading_back(sqlite_url, study_name,
                                                                         state, monkeypatch):
    """The runner's tell (`_compat.tell_trial`, Optuna's `_tell_with_warning`) leaves each
    state as `Study.tell` does, skips a finished trial, and reads the trial once, not twice."""
    study = optuna.create_study(storage=sqlite_url, study_name=study_name)
    view = worker_study(study, budget=10)
    values = [0.25] if state == TrialState.COMPLETE else None
    ours, theirs = view.ask(), view.ask()
    for trial in (ours, theirs):
        trial.suggest_float("x", 0.0, 1.0)
        trial.report(0.5, 1)
    storage = _compat.storage_of(view)
    reads = []
    real = storage.get_trial
    monkeypatch.setattr(storage, "get_trial", lambda i: reads.append(i) or real(i))
    _compat.tell_trial(view, ours, values, state)
    assert len(reads) == 1  # Study.tell reads it again for the copy it returns
    view.tell(theirs, values, state=state)
    a, b = (study.get_trials(deepcopy=False)[n] for n in (0, 1))
    assert (a.state, a.values, a.intermediate_values) == (b.state, b.values, b.intermediate_values)
    _compat.tell_trial(view, ours, values, state)  # told already: skipped, no error
    assert study.get_trials(deepcopy=False)[0].state == state
