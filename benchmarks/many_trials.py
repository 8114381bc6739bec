"""A study with many finished trials: a worker's ask, the pruner's read, status, best, report.

A fresh PostgreSQL database per run (CREATE DATABASE, DROP at the end) holds one study shaped
like studies/fashion_mlp.yaml (its space, TPE and Hyperband-within-scheduler pruner built by
hpsearch's own loaders), with N finished trials bulk-inserted (COMPLETE and PRUNED, intermediate
values and the user attrs a real trial carries: history, seconds, host…). Then, as a worker
does, through `worker_study`'s view with the study's real sampler and pruner: K trials asked
(ask + suggest, the first ask apart: it reads the whole history; wall time and this
process's CPU time, which a loaded machine does not inflate), each reporting 3 epochs with
the pruner's read after each, and told. Then `hpsearch status --json`, `best` and `report`,
timed in a child process as a command runs (a cold read of the study), with the two-query
reader (what hpsearch does) and without it (`HPSEARCH_FAST_PATHS=0`: Optuna's ORM reads the
study, as before); the report's plots read uncopied trials in both arms. Beside them,
optuna-dashboard's study page data (its own reads: the same in both arms), cold and warm.
And `status` and `best` warm, called again in this process (`warm`): the reads and the work
alone, no first call's setup.

The planner's statistics are taken after the bulk insert (ANALYZE), as autovacuum does on a
server that has it on; `--stale-statistics` leaves them as they were (empty tables).

Arms, alternated over the rounds in one run: N = 1,000 and 10,000, and for the worker's asks
TPE with its history trimmed past 1,000 finished trials (`search.run.study_sampler`, what
hpsearch builds) and TPE as Optuna builds it (`search.spec.build_sampler`, trim=off). Prints
one line per measurement and a table of medians with [min, max] over the rounds, and the
ratio of N=10,000 to N=1,000 (10 is linear).

    .venv/bin/python benchmarks/many_trials.py [--sizes 1000,10000] [--rounds 3] [--asks 25]
        [--parts asks,views,warm] [--stale-statistics] [--profile N]
    (--profile: cProfile of the later asks at N trials with trim=on, the top 25 functions)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import wsgiref.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState, create_trial

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.run import create_or_load, study_pruner, study_sampler  # noqa: E402
from search.spec import build_sampler, load_spec, real_value_attrs, suggest  # noqa: E402
from search.storage import open_storage, worker_study  # noqa: E402
from search.views import show_best, show_status, write_report  # noqa: E402

SERVER = os.environ.get("HPSEARCH_BENCH_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432")
STUDY = ROOT / "studies" / "fashion_mlp.yaml"
EPOCHS = 15
RUNGS = (1, 3, 9)  # Hyperband's rungs at 15 epochs, factor 3: where a pruned trial stops
HOST = "gpu-node-07"


@contextlib.contextmanager
def fresh_database(tag: str) -> Iterator[str]:
    """A new PostgreSQL database for this run: its URL; dropped at the end."""
    name = f"hps_many_{tag}_{os.getpid()}"
    admin = sa.create_engine(f"{SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            c.execute(sa.text(f"CREATE DATABASE {name}"))
        yield f"{SERVER}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def epoch_record(epoch: int, val_loss: float, rng: random.Random) -> dict[str, Any]:
    """One epoch of the `history` attr, with the fields a real MLP trial stores."""
    return {"epoch": epoch, "train_loss": round(val_loss * 0.9, 6),
            "train_accuracy": round(0.7 + 0.2 * rng.random(), 6), "val_loss": round(val_loss, 6),
            "val_accuracy": round(0.7 + 0.2 * rng.random(), 6), "lr": round(rng.random(), 6),
            "momentum": None, "grad_norms": {"net.0.weight": round(rng.random(), 6),
                                             "net.2.weight": round(rng.random(), 6),
                                             "net.4.weight": round(rng.random(), 6)},
            "epoch_seconds": 3.1, "train_seconds": 2.8, "samples_per_second": 17000.0,
            "group_lrs": None, "trained_parameters": 108_106}


def make_trials(spec: Any, n: int, *, seed: int = 0) -> list[FrozenTrial]:
    """`n` finished trials of `spec`'s space: params drawn by hpsearch's `suggest` (a seeded
    random sampler in memory), a third COMPLETE after 15 epochs, the rest PRUNED at a rung."""
    rng = random.Random(seed)
    memory = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = []
    for _ in range(n):
        trial, attrs = memory.ask(), {"host": HOST, "pid": 4242, "device": "cuda:0"}
        suggest(trial, spec, user_attrs=attrs)
        complete = rng.random() < 1 / 3
        epochs = EPOCHS if complete else rng.choice(RUNGS)
        start = 0.3 + 0.5 * rng.random()
        losses = {e: start * (0.97 ** e) for e in range(1, epochs + 1)}
        attrs.update(history=[epoch_record(e, v, rng) for e, v in losses.items()],
                     epochs_run=epochs, seconds=round(3.1 * epochs, 3), parameters=108_106,
                     trained_parameters=108_106,
                     ended="completed" if complete else f"pruned at epoch {epochs}")
        trials.append(create_trial(
            state=TrialState.COMPLETE if complete else TrialState.PRUNED,
            value=losses[epochs], params=trial.params, distributions=trial.distributions,
            user_attrs=attrs, intermediate_values=losses))
    return trials


def bulk_insert(url: str, study_name: str, trials: list[FrozenTrial], *,
                analyze: bool = True) -> None:
    """`trials` written into the study's tables in a few statements (Optuna's `add_trials`
    takes ~45 ms a trial here): the tables reflected from the database, rows as Optuna writes
    them; `check_inserted` then compares them with what Optuna reads back."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine, only=["studies", "trials", "trial_params", "trial_values",
                               "trial_user_attributes", "trial_intermediate_values"])
    t = meta.tables
    with engine.begin() as c:
        study_id = c.execute(sa.select(t["studies"].c.study_id)
                             .where(t["studies"].c.study_name == study_name)).scalar_one()
        first = c.execute(sa.select(sa.func.coalesce(sa.func.max(t["trials"].c.number), -1) + 1)
                          .where(t["trials"].c.study_id == study_id)).scalar_one()
        ids = c.execute(sa.insert(t["trials"]).returning(t["trials"].c.trial_id,
                                                          sort_by_parameter_order=True),
                        [{"number": first + i, "study_id": study_id, "state": tr.state.name,
                          "datetime_start": tr.datetime_start,
                          "datetime_complete": tr.datetime_complete}
                         for i, tr in enumerate(trials)]).scalars().all()
        params, values, attrs, inter = [], [], [], []
        for trial_id, tr in zip(ids, trials, strict=True):
            for name, value in tr.params.items():
                d = tr.distributions[name]
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": d.to_internal_repr(value),
                               "distribution_json": distribution_to_json(d)})
            values.append({"trial_id": trial_id, "objective": 0, "value": tr.value,
                           "value_type": "FINITE"})
            attrs += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                      for k, v in tr.user_attrs.items()]
            inter += [{"trial_id": trial_id, "step": s, "intermediate_value": v,
                       "intermediate_value_type": "FINITE"}
                      for s, v in tr.intermediate_values.items()]
        for table, rows in (("trial_params", params), ("trial_values", values),
                            ("trial_user_attributes", attrs),
                            ("trial_intermediate_values", inter)):
            c.execute(sa.insert(t[table]), rows)
    # The planner's statistics, as autovacuum's analyze takes them after a table grows by a
    # tenth (PostgreSQL's default; this machine's server runs without autovacuum). Stale
    # (`--stale-statistics`), they describe the tables as empty, and each chunk of the reader's
    # children query scans whole tables: status and best 18-25% slower at 1,000 and 10,000.
    if analyze:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text("ANALYZE"))
    engine.dispose()


def check_inserted(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """The bulk-inserted trials read back by Optuna equal the ones made (a sample of them)."""
    stored = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    assert len(stored) == len(trials), (len(stored), len(trials))
    for made, got in zip(trials[:50] + trials[-50:], stored[:50] + stored[-50:], strict=True):
        assert (made.state, made.params, made.distributions, made.user_attrs,
                made.intermediate_values, made.values) == (
            got.state, got.params, got.distributions, got.user_attrs,
            got.intermediate_values, got.values), got.number


def ask_times(url: str, spec: Any, asks: int, rng: random.Random, *, trim: bool,
              profile: cProfile.Profile | None = None) -> dict[str, list[float]]:
    """A worker's K trials in seconds: first ask, later asks (ask + suggest), pruner reads."""
    storage = open_storage(url)
    study = optuna.load_study(study_name=spec.name, storage=storage,
                              sampler=(study_sampler if trim else build_sampler)(
                                  spec, salt=rng.randrange(1 << 30)),
                              pruner=study_pruner(spec))
    view = worker_study(study, None, created_attrs={"host": HOST, "pid": os.getpid(),
                                                    "device": "cpu"},
                        param_attrs=real_value_attrs(spec))
    out: dict[str, list[float]] = {"first_ask": [], "ask": [], "ask_cpu": [], "prune": []}
    for k in range(asks):
        if k == 1 and profile is not None:
            profile.enable()
        t0, cpu0 = time.perf_counter(), time.process_time()
        trial = view.ask()
        suggest(trial, spec, user_attrs={})
        out["first_ask" if k == 0 else "ask"].append(time.perf_counter() - t0)
        if k:  # this process's CPU: what other programs on a shared machine do not inflate
            out["ask_cpu"].append(time.process_time() - cpu0)
        loss = 0.3 + 0.5 * rng.random()
        pruned = False
        for epoch in range(1, 4):
            trial.report(loss * 0.97 ** epoch, epoch)
            t0 = time.perf_counter()
            pruned = trial.should_prune()
            out["prune"].append(time.perf_counter() - t0)
            if pruned:
                break
        view.tell(trial, None if pruned else loss,
                  state=TrialState.PRUNED if pruned else TrialState.COMPLETE)
    if profile is not None:
        profile.disable()
    return out


def view_times(url: str, name: str) -> dict[str, float]:
    """`hpsearch status --json`, `best --format json` and `report`, each from a cold storage."""
    out = {}
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        for what, call in (("status", lambda: show_status(name, url, as_json=True)),
                           ("best", lambda: show_best(name, url, as_format="json")),
                           ("report", lambda: write_report(name, url,
                                                           out=Path(folder) / "r.html"))):
            t0 = time.perf_counter()
            code = call()
            out[what] = time.perf_counter() - t0
            assert code == 0, (what, code)
    return out


def warm_view_times(url: str, name: str, calls: int = 3) -> dict[str, float]:
    """`status --json` and `best --format json` called in this process, after one untimed
    call each (imports, the connection pool and SQLAlchemy's compiled statements warm): the
    median of `calls`, in ms. What grows with N here is the reads and the work alone."""
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for what, call in (("status", lambda: show_status(name, url, as_json=True)),
                           ("best", lambda: show_best(name, url, as_format="json"))):
            times = []
            for i in range(calls + 1):
                t0 = time.perf_counter()
                assert call() == 0, what
                if i:
                    times.append(time.perf_counter() - t0)
            out[f"{what}_warm_ms"] = 1e3 * statistics.median(times)
    return out


def dashboard_times(url: str, name: str) -> dict[str, float]:
    """optuna-dashboard's study page data (GET /api/studies/<id>: every trial, serialized) on
    the storage `hpsearch dashboard` hands it: first (cold) and again (its own trial cache)."""
    from optuna_dashboard import wsgi

    from search.storage import open_for_watching

    storage = open_for_watching(url)
    app = wsgi(storage)
    study_id = storage.get_study_id_from_name(name)
    out, statuses = {}, []
    for what in ("dashboard_cold", "dashboard_warm"):
        environ: dict[str, Any] = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ["PATH_INFO"] = f"/api/studies/{study_id}"
        t0 = time.perf_counter()
        body = b"".join(app(environ, lambda status, headers, *_: statuses.append(status)))
        out[what] = time.perf_counter() - t0
        assert statuses[-1].startswith("200") and json.loads(body)["trials"], statuses
    return out


def views_in_child(url: str, name: str, *, fast: bool) -> dict[str, float]:
    """`view_times` in a new process, as a command runs; `fast` False: HPSEARCH_FAST_PATHS=0
    (Optuna's own ORM reads the study, as before the two-query reader served the views)."""
    env = {**os.environ, "HPSEARCH_FAST_PATHS": "1" if fast else "0"}
    done = subprocess.run([sys.executable, __file__, "--views-child", url, "--study", name],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"views child failed ({done.returncode}): {done.stderr[-2000:]}", flush=True)
        return {}
    return {f"{k}_ms": 1e3 * v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def summary(samples: dict[str, list[float]]) -> dict[str, float]:
    return {"first_ask_ms": 1e3 * samples["first_ask"][0],
            "ask_p50_ms": 1e3 * statistics.median(samples["ask"]),
            "ask_p99_ms": 1e3 * p99(samples["ask"]),
            "ask_cpu_p50_ms": 1e3 * statistics.median(samples["ask_cpu"]),
            "ask_cpu_p99_ms": 1e3 * p99(samples["ask_cpu"]),
            "prune_p50_ms": 1e3 * statistics.median(samples["prune"]),
            "prune_p99_ms": 1e3 * p99(samples["prune"])}


def run(sizes: list[int], rounds: int, asks: int, profile_at: int | None,
        parts: set[str], *, analyze: bool = True) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(STUDY)
    results: dict[tuple[int, str], dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        urls = {}
        for n in sizes:
            urls[n] = url = stack.enter_context(fresh_database(str(n)))
            trials = make_trials(spec, n)
            study = create_or_load(spec, open_storage(url))
            t0 = time.perf_counter()
            bulk_insert(url, spec.name, trials, analyze=analyze)
            check_inserted(study, trials)
            print(f"inserted n={n} in {time.perf_counter() - t0:.1f} s", flush=True)
        rng = random.Random(1)
        for r in range(rounds):
            for n in sizes:
                for trim in (True, False) if "asks" in parts else ():
                    arm = f"trim={'on' if trim else 'off'}"
                    prof = cProfile.Profile() if (profile_at == n and trim and r == 0) else None
                    got = summary(ask_times(urls[n], spec, asks, rng, trim=trim, profile=prof))
                    if prof is not None:
                        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
                        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
                    print(f"round={r} n={n} {arm} " + " ".join(
                        f"{k}={v:.1f}" for k, v in got.items()), flush=True)
                    for k, v in got.items():
                        results.setdefault((n, arm), {}).setdefault(k, []).append(v)
                for fast in (True, False) if "views" in parts else ():
                    arm = f"views reader={'on' if fast else 'off'}"
                    got = views_in_child(urls[n], spec.name, fast=fast)
                    print(f"round={r} n={n} {arm} " + " ".join(
                        f"{k}={v:.0f}" for k, v in got.items()), flush=True)
                    for k, v in got.items():
                        results.setdefault((n, arm), {}).setdefault(k, []).append(v)
                if "warm" in parts:
                    got = warm_view_times(urls[n], spec.name)
                    print(f"round={r} n={n} views warm " + " ".join(
                        f"{k}={v:.0f}" for k, v in got.items()), flush=True)
                    for k, v in got.items():
                        results.setdefault((n, "views warm"), {}).setdefault(k, []).append(v)
    table(results, sizes)


def table(results: dict[tuple[int, str], dict[str, list[float]]], sizes: list[int]) -> None:
    """Medians [min, max] over the rounds, and each figure's ratio of the largest N to the
    smallest (10 would be linear)."""
    print("\n| arm | measure | " + " | ".join(f"N={n:,}" for n in sizes)
          + f" | ratio {sizes[-1] // sizes[0]}x N |")
    print("|---|---|" + "---|" * len(sizes) + "---|")
    for arm in ("trim=on", "trim=off", "views reader=on", "views reader=off", "views warm"):
        for measure in results.get((sizes[0], arm), {}):
            cells, medians = [], []
            for n in sizes:
                v = results.get((n, arm), {}).get(measure) or [float("nan")]
                medians.append(statistics.median(v))
                cells.append(f"{medians[-1]:.1f} [{min(v):.1f}, {max(v):.1f}]")
            ratio = medians[-1] / medians[0] if medians[0] else float("nan")
            print(f"| {arm} | {measure} | " + " | ".join(cells) + f" | {ratio:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--asks", type=int, default=25)
    p.add_argument("--profile", type=int, default=None)
    p.add_argument("--parts", default="asks,views,warm", help="asks, views, warm: any of them")
    p.add_argument("--stale-statistics", action="store_true",
                   help="no ANALYZE after the bulk insert (a server without autovacuum)")
    p.add_argument("--views-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--study", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.views_child:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # What the commands import on first use, and the database driver, before the clock:
        # the figures time the reads and the work, not Python's imports.
        for module in ("torch", "trainers", "rich.console", "plotly.graph_objects",
                       "plotly.offline", "optuna.visualization", "optuna.importance"):
            importlib.import_module(module)
        optuna.get_all_study_names(open_storage(a.views_child))
        print(json.dumps({**view_times(a.views_child, a.study),
                          **dashboard_times(a.views_child, a.study)}))
        return
    run([int(s) for s in a.sizes.split(",")], a.rounds, a.asks, a.profile,
        set(a.parts.split(",")), analyze=not a.stale_statistics)


if __name__ == "__main__":
    main()
