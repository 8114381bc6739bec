"""Studies with many trials: a worker's cached reads equal a fresh reader's across two clients,
a later ask reads no finished trial, and TPE's trimmed history (`search.storage._trimmed`)
changes nothing up to a thousand finished trials."""

from __future__ import annotations

import random

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from search.storage import (
    _trimmed,
    open_storage,
    shared_study,
    storage_of,
    with_trimmed_history,
    worker_study,
)
from search.storage._compat import backend_of
from search.storage._reader import ReadingStorage, reading
from search.storage._trimmed import (
    HISTORY_LIMIT,
    KEEP_BEST,
    History,
    TrimmedSampler,
    trimmed,
)

X = FloatDistribution(0.0, 1.0)


def _seen(trials: list[FrozenTrial]) -> list[tuple]:
    return [(t.number, t.state, t.params, t.distributions, t.values, t.user_attrs,
             t.system_attrs, t.intermediate_values, t.datetime_start, t.datetime_complete)
            for t in trials]


def _fresh(url: str, name: str) -> list[tuple]:
    # Optuna's own reader, no cache: a new RDBStorage read straight through `get_all_trials`.
    storage = RDBStorage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
        return _seen(storage.get_all_trials(study_id, deepcopy=False))
    finally:
        storage.engine.dispose()


def test_a_workers_cached_reads_equal_a_fresh_reader_across_two_clients(storage_url: str,
                                                                          study_name: str
                                                                          ) -> None:
    """Client A (a worker's view: Optuna's cached storage over the two-query reader) reads
    while client B (another worker) finishes trials, queues one, fails A's running trial and
    queues its retry: after every step A's list is a fresh reader's, trial for trial."""
    other = optuna.create_study(study_name=study_name, storage=open_storage(storage_url),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    other.add_trials([create_trial(params={"x": 0.1 * i}, distributions={"x": X}, value=i,
                                   user_attrs={"history": [{"epoch": 1, "val_loss": i}]},
                                   intermediate_values={1: float(i)}) for i in range(5)])
    running_b = other.ask({"x": X})
    mine = worker_study(optuna.load_study(study_name=study_name,
                                          storage=open_storage(storage_url),
                                          sampler=optuna.samplers.RandomSampler(seed=1)), None)

    def same() -> None:
        assert _seen(mine.get_trials(deepcopy=False)) == _fresh(storage_url, study_name)

    same()  # the first read: all of them
    a = mine.ask({"x": X})
    a.report(0.5, 1)
    same()
    other.tell(running_b, 3.0)  # finished by the other client after A cached it running
    late = other.ask({"x": X})
    other.tell(late, state=TrialState.PRUNED)
    other.enqueue_trial({"x": 0.25}, user_attrs={"enqueued": True})
    same()
    taken = mine.ask({"x": X})  # A takes the queued trial: an id A had not seen
    assert taken.params == {"x": 0.25}
    same()
    # B fails A's trial (a stale scan: A looked dead) and queues its retry; A tells the other.
    other.tell(a.number, state=TrialState.FAIL)
    other.enqueue_trial({"x": a.params["x"]}, user_attrs={"retried_from": a.number})
    mine.tell(taken, 0.7)
    same()
    retry = mine.ask({"x": X})
    assert retry.user_attrs.get("retried_from") == a.number
    mine.tell(retry, 0.6)
    same()


def _bulk(url: str, name: str, n: int) -> None:
    # n COMPLETE trials with one param in three statements (Optuna's own add_trials would
    # take ~10 ms a trial): rows as Optuna writes them, read back by Optuna in the test.
    engine = sa.create_engine(url)
    with engine.begin() as c:
        sid = c.execute(sa.text("SELECT study_id FROM studies WHERE study_name = :n"),
                        {"n": name}).scalar_one()
        c.execute(sa.text(
            "INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) "
            "SELECT g, :sid, 'COMPLETE', now(), now() FROM generate_series(0, :last) g"),
            {"sid": sid, "last": n - 1})
        c.execute(sa.text(
            "INSERT INTO trial_values (trial_id, objective, value, value_type) "
            "SELECT trial_id, 0, (number * 7919 % 1000) / 1000.0, 'FINITE' FROM trials "
            "WHERE study_id = :sid"), {"sid": sid})
        c.execute(sa.text(
            "INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) "
            "SELECT trial_id, 'x', (number * 104729 % 1000) / 1000.0, :d FROM trials "
            "WHERE study_id = :sid"), {"sid": sid, "d": distribution_to_json(X)})
    engine.dispose()


def test_a_later_ask_reads_no_finished_trial(postgres_url: str, study_name: str) -> None:
    """At 2,000 finished trials a worker's first ask reads them all, each later ask (TPE's
    reads, the WAITING check, the pruner's) only the unfinished ones: rows, not seconds."""
    n = 2000
    optuna.create_study(study_name=study_name, storage=open_storage(postgres_url))
    _bulk(postgres_url, study_name, n)
    storage = open_storage(postgres_url)
    rows: list[int] = []

    def count(conn, cursor, statement, params, context, executemany) -> None:
        if statement.startswith("SELECT trials.trial_id, trials.number, trials.state"):
            rows.append(cursor.rowcount)

    sa.event.listen(storage.engine, "after_cursor_execute", count)
    view = worker_study(optuna.load_study(
        study_name=study_name, storage=storage,
        sampler=with_trimmed_history(optuna.samplers.TPESampler(seed=0))), None)
    per_ask = []
    for _ in range(4):
        rows.clear()
        trial = view.ask()
        trial.suggest_float("x", 0.0, 1.0)
        trial.report(0.5, 1)
        trial.should_prune()
        view.tell(trial, 0.5)
        per_ask.append(sum(rows))
    assert per_ask[0] >= n, per_ask
    # Its own trial, read a few times (the sampler, the WAITING check, the pruner): 7 here.
    assert max(per_ask[1:]) <= 10, per_ask


def _trials(n: int, *, running: int = 0, seed: int = 0) -> list[FrozenTrial]:
    rng = random.Random(seed)
    out = []
    for i in range(n + running):
        if i >= n:
            t = create_trial(state=TrialState.RUNNING, params={"x": rng.random()},
                             distributions={"x": X})
        elif i % 3:
            t = create_trial(state=TrialState.PRUNED, params={"x": rng.random()},
                             distributions={"x": X}, intermediate_values={1: rng.random()})
        else:
            t = create_trial(value=rng.random(), params={"x": rng.random()},
                             distributions={"x": X})
        t.number = i
        out.append(t)
    return out


def test_trimming_leaves_a_thousand_finished_trials_as_they_are() -> None:
    trials = _trials(HISTORY_LIMIT, running=3)
    assert trimmed(trials, optuna.study.StudyDirection.MINIMIZE) is trials


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_past_the_limit_tpe_keeps_the_best_the_recent_and_the_running(direction: str) -> None:
    trials = _trials(3000, running=2)
    kept = trimmed(trials, optuna.study.StudyDirection[direction.upper()])
    finished = [t for t in kept if t.state.is_finished()]
    assert len(finished) == HISTORY_LIMIT
    assert [t.number for t in kept] == sorted(t.number for t in kept)  # in order
    assert {t.number for t in kept if not t.state.is_finished()} == {3000, 3001}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: t.value, reverse=direction == "maximize")
    assert {t.number for t in best[:KEEP_BEST]} <= {t.number for t in kept}
    # TPE's good group (at most 25 trials) is the one the whole history gives
    good = [t for t in kept if t.state == TrialState.COMPLETE]
    assert sorted(good, key=lambda t: t.value, reverse=direction == "maximize")[:25] == (
        best[:25])
    assert kept[-3].number == 2999  # the most recent finished trial


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_a_history_carried_from_ask_to_ask_is_the_trimmed_list(
        direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a worker's list grows (new trials, running ones that end, ties in value), `History`
    gives what `trimmed` gives of each list, the very trial objects in the same order."""
    monkeypatch.setattr(_trimmed, "HISTORY_LIMIT", 40)
    monkeypatch.setattr(_trimmed, "KEEP_BEST", 6)
    direction_ = optuna.study.StudyDirection[direction.upper()]
    rng = random.Random(5)
    history, trials, crossed = History(direction_), [], False

    def ended(i: int) -> FrozenTrial:
        if rng.random() < 0.5:
            t = create_trial(state=TrialState.PRUNED, params={"x": 0.5}, distributions={"x": X})
        else:  # few distinct values: ties are broken as `trimmed` breaks them
            t = create_trial(value=rng.choice([0.1, 0.2, 0.3, 0.4]), params={"x": 0.5},
                             distributions={"x": X})
        t.number = i
        return t

    for _ in range(60):
        for i, t in enumerate(trials):  # some running trials end
            if not t.state.is_finished() and rng.random() < 0.4:
                trials[i] = ended(i)
        for _ in range(rng.randrange(0, 4)):  # new ones start, some ended at once
            t = create_trial(state=TrialState.RUNNING, params={"x": 0.5},
                             distributions={"x": X})
            t.number = len(trials)
            trials.append(t if rng.random() < 0.3 else ended(len(trials)))
        listed = list(trials)
        got, want = history.kept(listed), trimmed(listed, direction_)
        assert [id(t) for t in got] == [id(t) for t in want]
        crossed |= got is not listed
    assert crossed  # the limit was passed: trimming ran
    shuffled = list(reversed(trials))  # not a list it grew from: trimmed whole
    assert history.kept(shuffled) == trimmed(shuffled, direction_)


def _asked(sampler: optuna.samplers.BaseSampler, trials: list[FrozenTrial]) -> list[dict]:
    study = optuna.create_study(sampler=sampler)
    study.add_trials([t for t in trials if t.state.is_finished()])
    out = []
    for _ in range(5):
        trial = study.ask()
        out.append({"x": trial.suggest_float("x", 0.0, 1.0),
                    "c": trial.suggest_categorical("c", ["a", "b"])})
        study.tell(trial, out[-1]["x"])
    return out


@pytest.mark.parametrize("n", [40, HISTORY_LIMIT - 5])
def test_tpe_samples_as_before_up_to_the_limit(n: int) -> None:
    """The same seed, the same history: the trimmed TPE asks exactly what TPE asks."""
    trials = _trials(n)
    plain = _asked(optuna.samplers.TPESampler(seed=3), trials)
    wrapped = with_trimmed_history(optuna.samplers.TPESampler(seed=3))
    assert isinstance(wrapped, TrimmedSampler)
    assert _asked(wrapped, trials) == plain


def test_only_tpe_is_trimmed() -> None:
    random_sampler = optuna.samplers.RandomSampler(seed=0)
    assert with_trimmed_history(random_sampler) is random_sampler


def test_a_view_of_a_whole_study_reads_what_optuna_reads(storage_url: str,
                                                          study_name: str) -> None:
    """`status`, `best` and `report` open a study through `reading` (the two-query reader)."""
    plain = optuna.create_study(study_name=study_name, storage=RDBStorage(storage_url))
    plain.add_trials(_trials(30, seed=1))
    plain.ask({"x": X}).report(0.25, 3)
    viewed = optuna.load_study(study_name=study_name, storage=reading(RDBStorage(storage_url)))
    assert isinstance(backend_of(storage_of(viewed)), ReadingStorage)
    assert _seen(viewed.get_trials(deepcopy=False)) == _fresh(storage_url, study_name)


def test_the_reports_plots_read_the_cached_trials_uncopied(sqlite_url: str,
                                                            study_name: str) -> None:
    study = optuna.create_study(study_name=study_name, storage=open_storage(sqlite_url))
    study.add_trials(_trials(12, seed=2))
    shared = shared_study(study)
    assert _seen(shared.trials) == _seen(study.trials)
    assert shared.trials[3] is study.get_trials(deepcopy=False)[3]  # no copy
    assert study.trials[3] is not study.get_trials(deepcopy=False)[3]  # Optuna's own copies


def test_past_the_limit_a_trimmed_tpe_asks_from_the_trimmed_history() -> None:
    sampler = with_trimmed_history(optuna.samplers.TPESampler(seed=0))
    study = optuna.create_study(sampler=sampler)
    study.add_trials([t for t in _trials(HISTORY_LIMIT + 100) if t.state.is_finished()])
    for _ in range(3):
        trial = study.ask()
        assert 0.0 <= trial.suggest_float("x", 0.0, 1.0) <= 1.0
        seen = sampler._view[1].get_trials(deepcopy=False)  # what TPE was shown
        assert len([t for t in seen if t.state.is_finished()]) == HISTORY_LIMIT
        assert seen[-1].number == trial.number  # the trial being asked, running
        study.tell(trial, 0.5)
