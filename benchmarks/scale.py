"""Many workers on one study: W simulated workers against one PostgreSQL study, directly,
through PgBouncer (transaction pooling) and through `hpsearch storage-proxy`.

Each simulated worker is hpsearch's real worker (`search.workers.run_worker`, as `hpsearch
worker` runs it: the storage opened with the spec's heartbeat settings, the budget lock, the
stored spec loaded and verified) on a study whose trainer is the function `scale:fit` below: 3
epochs of a few ms each, each reported, so the median pruner judges every epoch. Workers are
threads, many to an OS process, each with its own storage client (its own connection pool, in
which its budget lock is taken, or gRPC channel), so the server sees W clients. 1% of the
workers (at least one) are single-worker processes instead, each SIGKILLed at a random moment
inside its first trial's training: the heartbeats, the retries and the budget lock are
exercised.

Per W and path, one line:

    scale path=<direct|pgbouncer|proxy> workers=<W> trials_per_s=<x> p99_start_ms=<x>
        over_budget=<n> under_budget=<n> locks_left=<n> errors=<n> p50_start_ms=<x> ...

trials_per_s: COMPLETE+PRUNED trials from the first trial's start to the last one's end (the
workers start together, after all are set up); start/finish: a trial asked (budget lock, the
trial created with its first beat) and told (TrialRunner.ask / .tell); server_conns: the peak
of pg_stat_activity for the run's database during the run; errors: workers that could not start
or ended on an exception; killed/retried: the killed workers, and how many of their trials a
retry took up; fails: trials failed as stale (a killed worker's, or one whose heartbeats came
later than the grace), failed: those of them no retry took up; locks_left: advisory locks
still held in the run's database once the workers are gone (read again for up to 15 s: a start
in flight at the cut holds its lock until it ends);
cores_*: CPU seconds per second of the run, of the worker processes, of every PostgreSQL
process (this machine's other users' included) and of PgBouncer or the proxy; cut: workers
still running at the run's time limit (`--run-s`): then under_budget is what the time left
undone, not the budget missed; load1: the machine's load average as the run ended; rollbacks:
the database's rolled-back transactions (a worker's lock waits on the server and rolls nothing
back; a lock not bound to a storage rolls back each try that found it taken). Each run has a
fresh database.

    .venv/bin/python benchmarks/scale.py [--workers 10,100,300,1000]
        [--paths direct,pgbouncer,proxy] [--compare-rounds 3] [--run-s 90]

`--compare-rounds N` (N ≥ 1) then runs hpsearch's workers and a hand-written Optuna loop
(ask, suggest, report, should_prune, tell, MaxTrialsCallback's check) with the same clients at
W=`--compare-workers` through PgBouncer, alternating over N rounds: the ratio's median and range.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
ADMIN_URL = os.environ.get("HPSEARCH_TEST_POSTGRES",
                           "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
EPOCHS = 3
EPOCH_S = 0.003  # per epoch of a simulated trial: the "training"
VICTIM_EPOCH_S = 1.0  # the trial a worker is killed in trains slower: the kill lands inside
THREADS_PER_PROCESS = 50
MAX_PROCESSES = 8
PGBOUNCER_POOL = 20  # PgBouncer's default_pool_size
VICTIM_ENV = "HPSEARCH_SCALE_VICTIM"  # a file the worker to be killed names its trial in
TOKEN = "scale-benchmark-token"
_CALLS: list[int] = []  # the trials `fit` was called for in this process
_SPEC: list[Any] = []  # the study's spec, read once a worker process
_CHECKED: list[str] = []  # whether this process opened its storage through open_storage


def fit(params: dict[str, Any], trial: Any) -> float:
    """The trainer of every simulated worker: a made-up loss, falling with epochs, best near
    lr = 0.01, reported each epoch (`trial.report` raises Pruned when the pruner says so)."""
    victim = os.environ.get(VICTIM_ENV)
    _CALLS.append(trial.number)
    marked = bool(victim) and len(_CALLS) == 1  # (a second trial may find the budget met)
    if marked:  # named for the benchmark to kill this process while its first epoch trains
        Path(victim).write_text(str(trial.number))
    loss = math.inf
    for epoch in range(1, trial.epochs + 1):
        time.sleep(VICTIM_EPOCH_S if marked else EPOCH_S)
        loss = (math.log10(params["lr"]) + 2) ** 2 + params["x"] ** 2 + 1.0 / epoch
        trial.report(epoch, loss=loss)
    return loss


def spec_of(name: str, budget: int, tmp: Path, beats: tuple[int, int]) -> dict[str, Any]:
    return {
        "name": name, "trainer": "scale:fit", "objective": {"metric": "loss"},
        "budget": {"trials": budget, "epochs": EPOCHS},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "median", "options": {"n_startup_trials": 5}},
        "space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}, "x": {"low": -1.0, "high": 1.0}},
        "run": {"checkpoint_dir": str(tmp / "ckpt"), "heartbeat_interval": beats[0],
                "grace_period": beats[1]},
    }


# --- the worker processes ------------------------------------------------------------------

def timed(method: Any, into: list[float], kept: Any) -> Any:
    """`method` timed into `into` (ms) when what it returns passes `kept`."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = method(*args, **kwargs)
        if kept(out):
            into.append((time.perf_counter() - t0) * 1000)
        return out
    return wrapper


def open_ours(url: str, name: str, index: int) -> Any:
    """What `hpsearch worker NAME --storage URL` opens before its loop: the study from a
    storage with the spec's heartbeat settings, its spec, the budget lock."""
    from search.run import load, reseed
    from search.storage import budget_lock

    if not _SPEC:  # the heartbeat settings: read once a process, as a worker does
        _SPEC.append(load(name, open_storage_once(url))[1])
    study, spec = load(name, open_storage_once(url, _SPEC[0].run))
    reseed(study, spec, index)
    return study, spec, budget_lock(url, name)


def open_storage_once(url: str, run: Any = None) -> Any:
    """`search.storage.open_storage`, the heartbeat settings of `run` (a spec's) if given. On
    a database, Optuna's schema checks (alembic's revision files read again: 0.2 s of CPU) are
    made by a process's first storage only: a real worker makes them once, not once a thread."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from search.storage import open_storage
    from search.storage._open import engine_kwargs, install_idle_ping

    beats = ({} if run is None else
             {"heartbeat_interval": run.heartbeat_interval, "grace_period": run.grace_period})
    if url.startswith("grpc") or not _CHECKED:
        _CHECKED.append(url)
        return open_storage(url, **beats)
    if beats:
        beats["heartbeat_stale_trial_callback"] = RetryHeartbeatStaleTrialCallback(
            inherit_intermediate_values=True)
    storage = RDBStorage(url, engine_kwargs=engine_kwargs(url), skip_table_creation=True,
                         skip_compatibility_check=True, **beats)
    install_idle_ping(storage.engine)
    return storage


def run_ours(opened: Any, deadline: float) -> None:
    from search.workers import run_worker

    study, spec, lock = opened
    run_worker(study, spec, device="cpu", lock=lock, artifacts=False,
               timeout_s=max(1.0, deadline - time.time()))


def open_hand(url: str, name: str, index: int) -> Any:
    """A hand-written Optuna worker's setup: the study loaded from a storage of its own."""
    import optuna

    from search.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url),
                              sampler=optuna.samplers.RandomSampler(seed=index),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=5))
    return study, int(study.user_attrs.get("scale_budget", 0))


def run_hand(opened: Any, deadline: float, starts: list[float], ends: list[float]) -> None:
    """The loop an engineer writes from Optuna's docs: ask, suggest, report and should_prune
    each epoch, tell; stop once COMPLETE+PRUNED reach the budget (MaxTrialsCallback's count)."""
    from optuna.trial import TrialState

    study, budget = opened
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    while time.time() < deadline and len(study.get_trials(deepcopy=False, states=done)) < budget:
        t0 = time.perf_counter()
        trial = study.ask()
        starts.append((time.perf_counter() - t0) * 1000)
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        x = trial.suggest_float("x", -1.0, 1.0)
        state, loss = TrialState.COMPLETE, math.inf
        for epoch in range(1, EPOCHS + 1):
            time.sleep(EPOCH_S)
            loss = (math.log10(lr) + 2) ** 2 + x ** 2 + 1.0 / epoch
            trial.report(loss, epoch)
            if trial.should_prune():
                state = TrialState.PRUNED
                break
        t0 = time.perf_counter()
        study.tell(trial, loss if state == TrialState.COMPLETE else None, state=state)
        ends.append((time.perf_counter() - t0) * 1000)


def child(args: argparse.Namespace) -> None:
    """One worker process: `args.threads` workers set up, then started together once the
    benchmark says go; what they measured written to `args.out` as JSON."""
    import optuna

    from search.storage import quiet_optuna_warnings
    from search.trial import TrialRunner

    quiet_optuna_warnings()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # sockets: ~7 per worker
    starts: list[float] = []
    ends: list[float] = []
    TrialRunner.ask = timed(TrialRunner.ask, starts, lambda out: isinstance(out, optuna.Trial))
    TrialRunner.tell = timed(TrialRunner.tell, ends, lambda out: True)
    errors: list[str] = []
    if args.arm == "ours":  # torch, imported by a worker's first trial (its device), here
        import trainers

        trainers.resolve_device("cpu")
    opener = open_hand if args.arm == "hand" else open_ours
    opened = []
    for i in range(args.threads):
        try:
            opened.append(opener(args.url, args.name, args.first + i))
        except Exception as e:  # noqa: BLE001 - counted: a worker that could not start
            errors.append(f"start: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    Path(args.out + ".ready").touch()
    while not Path(args.go).exists():
        if os.getppid() != args.parent:  # the benchmark is gone: nothing will say go
            os._exit(1)
        time.sleep(0.01)
    deadline = float(Path(args.go).read_text())
    cpu_at_go = own_cpu()

    def worker(one: Any) -> None:
        try:
            if args.arm == "hand":
                run_hand(one, deadline, starts, ends)
            else:
                run_ours(one, deadline)
        except Exception as e:  # noqa: BLE001 - counted: a worker that ended on an error
            errors.append(f"run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    threads = [threading.Thread(target=worker, args=(one,), daemon=True) for one in opened]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline + 10 - time.time()))
    Path(args.out).write_text(json.dumps({
        "starts": starts, "ends": ends, "errors": errors, "cpu_s": own_cpu() - cpu_at_go,
        "cut": sum(t.is_alive() for t in threads),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    os._exit(0)  # not the daemon threads' storage clients racing the interpreter's exit


# --- the benchmark -------------------------------------------------------------------------

def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(*, comm: str | None = None, parent: int | None = None,
           but: frozenset[int] = frozenset()) -> float:
    """CPU seconds (user + system, with their reaped children's) of the live processes named
    `comm` or whose parent is `parent`, but not those in `but`."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if int(stat.parent.name) in but or not (
                name == comm or (parent is not None and int(fields[1]) == parent)):
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def admin_connection() -> Any:
    """A connection to the server's `test` database, in autocommit."""
    import psycopg2
    import sqlalchemy

    parsed = sqlalchemy.make_url(ADMIN_URL)
    conn = psycopg2.connect(host=parsed.host, port=parsed.port or 5432,
                            user=parsed.username, dbname=parsed.database, connect_timeout=5)
    conn.autocommit = True
    return conn


def admin(sql: str, *, conn: Any = None) -> list[tuple[Any, ...]]:
    """`sql`'s rows, on `conn` or a connection of its own."""
    own = conn is None
    conn = admin_connection() if own else conn
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
    finally:
        if own:
            conn.close()


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database for one run (its name), dropped after."""
    name = f"scale_{uuid.uuid4().hex[:10]}"
    admin(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def direct_url(database: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"


@contextmanager
def served_path(path: str, database: str, workers: int, tmp: Path) -> Iterator[str]:
    """The URL the workers use: the database itself, PgBouncer in front of it, or `hpsearch
    storage-proxy` (with a token) in front of it."""
    sys.path.insert(0, str(ROOT))  # tests/servers.py starts PgBouncer and the proxy
    if path == "direct":
        yield direct_url(database)
    elif path == "pgbouncer":
        from tests.servers import pgbouncer

        with pgbouncer(database=database, pool_size=PGBOUNCER_POOL,
                       max_client_conn=8 * workers + 100) as url:
            yield url
    elif path == "proxy":
        from tests.servers import storage_proxy

        with storage_proxy(direct_url(database), tmp,
                           env={**os.environ, "HPSEARCH_TOKEN": TOKEN}) as url:
            yield url
    else:
        raise SystemExit(f"--paths: unknown path {path!r}; expected direct, pgbouncer, proxy")


def create_study(url: str, name: str, budget: int, tmp: Path, arm: str,
                 beats: tuple[int, int]) -> None:
    """The study, created by hpsearch (arm "ours") or by Optuna's `create_study` (the hand
    loop's, its budget in a user attr for its workers)."""
    import optuna

    from search.run import create_or_load
    from search.spec import parse_spec
    from search.storage import open_storage

    if arm == "ours":
        create_or_load(parse_spec(spec_of(name, budget, tmp, beats)), open_storage(url))
    else:
        study = optuna.create_study(study_name=name, storage=url)
        study.set_user_attr("scale_budget", budget)


def layout(workers: int, kill: bool) -> tuple[int, list[int]]:
    """(victims, threads per process): 1% of the workers killed (at least one) when `kill`,
    the rest as threads, THREADS_PER_PROCESS to a process, in up to MAX_PROCESSES."""
    victims = max(1, round(workers / 100)) if kill else 0
    rest = workers - victims
    processes = min(MAX_PROCESSES, math.ceil(rest / THREADS_PER_PROCESS))
    return victims, [rest // processes + (i < rest % processes) for i in range(processes)]


def go(path: Path, deadline: float) -> None:
    """`path` written with the run's deadline, whole when it appears: workers read it at once."""
    ready = path.with_suffix(".next")
    ready.write_text(str(deadline))
    ready.rename(path)


class Run:
    """One run's worker processes, started together, watched until they end or time runs out:
    the server connections sampled, the victims killed inside a trial."""

    def __init__(self, url: str, name: str, arm: str, workers: int, tmp: Path, kill: bool):
        self.name, self.tmp = name, tmp
        victims, per_process = layout(workers, kill)
        self.go = tmp / f"{name}.go"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
               "OMP_NUM_THREADS": "1"}
        self.outs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.victims: dict[int, Path] = {}  # pid: the file it names its trial in
        # Taken before the workers start: with the direct path's connections all used, the
        # count still comes.
        self.monitor = admin_connection()
        first = 0
        self.sizes = [*per_process, *[1] * victims]  # workers of each process
        for i, threads in enumerate(self.sizes):
            out = tmp / f"{name}-{i}.json"
            victim = i >= len(per_process)
            extra = {VICTIM_ENV: str(out) + ".victim"} if victim else {}
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", arm, "--url", url, "--name", name,
                 "--threads", str(threads), "--first", str(first), "--out", str(out),
                 "--parent", str(os.getpid()),
                 "--go", str(self.go) + ".victims" * victim], env={**env, **extra},
                stdout=subprocess.DEVNULL,
                stderr=(tmp / f"{name}-{i}.log").open("w"), start_new_session=True)
            self.procs.append(proc)
            self.outs.append(out)
            if victim:
                self.victims[proc.pid] = Path(extra[VICTIM_ENV])
            first += threads
        self.killed: dict[int, int] = {}  # pid: the number of the trial it was killed in
        self.conns_peak = 0
        self.late = 0  # workers of processes killed at the end: they did not end in time

    def start(self, setup_s: float, run_s: float) -> float:
        """Once every process has set up its workers (or `setup_s` passed): go; the deadline."""
        limit = time.monotonic() + setup_s
        while time.monotonic() < limit and not all(
                Path(str(out) + ".ready").exists() or p.poll() is not None
                for out, p in zip(self.outs, self.procs, strict=True)):
            time.sleep(0.05)
        deadline = time.time() + run_s
        self.cpu = {"postgres": -cpu_of(comm="postgres"), "path": -self.path_cpu()}
        self.began = time.monotonic()
        # The workers to be killed go first, until each is in its trial (10 s at most): the
        # others could meet a small budget before a late one got a trial.
        go(Path(str(self.go) + ".victims"), deadline)
        limit = time.monotonic() + 10
        while time.monotonic() < limit and not all(
                marker.exists() or pid in self.killed for pid, marker in self.victims.items()):
            time.sleep(0.01)
        go(self.go, deadline)
        return deadline

    def path_cpu(self) -> float:
        """CPU seconds of PgBouncer or the proxy: this process's children but the workers."""
        return cpu_of(parent=os.getpid(), but=frozenset(p.pid for p in self.procs))

    def watch(self, database: str, deadline: float) -> None:
        """Until every process ended (or the deadline, plus time to end, passed)."""
        kill_at: dict[int, float] = {}
        while any(p.poll() is None for p in self.procs) and time.time() < deadline + 20:
            self.conns_peak = max(self.conns_peak, admin(
                f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'",
                conn=self.monitor)[0][0])
            for pid, marker in self.victims.items():
                if pid not in kill_at and marker.exists() and marker.read_text():
                    # (a second at most since it was written: inside its first epoch)
                    kill_at[pid] = time.monotonic() + random.uniform(0, 0.5 * VICTIM_EPOCH_S)
                if pid in kill_at and pid not in self.killed and time.monotonic() >= kill_at[pid]:
                    self.killed[pid] = int(marker.read_text())
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.cpu["postgres"] += cpu_of(comm="postgres")
        self.cpu["path"] += self.path_cpu()
        self.wall = time.monotonic() - self.began
        for p, size in zip(self.procs, self.sizes, strict=True):
            if p.poll() is None:
                self.late += size
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.monitor.close()

    def measured(self) -> dict[str, Any]:
        """What the worker processes wrote: timings, errors, their peak RSS."""
        starts: list[float] = []
        ends: list[float] = []
        errors: list[str] = []
        rss: list[float] = []
        cpu = 0.0
        cut = 0
        for out, proc in zip(self.outs, self.procs, strict=True):
            if proc.pid in self.victims:
                continue
            if not out.exists():
                if proc.returncode == -signal.SIGKILL:  # killed at the limit: all its workers
                    continue
                errors.append(f"process exited {proc.returncode} without its figures")
                continue
            got = json.loads(out.read_text())
            starts += got["starts"]
            ends += got["ends"]
            errors += got["errors"]
            rss.append(got["rss_mb"])
            cpu += got["cpu_s"]
            cut += got["cut"]
        cores = {f"cores_{k}": v / self.wall for k, v in {**self.cpu, "workers": cpu}.items()}
        return {"starts": starts, "ends": ends, "errors": errors, "rss_mb": max(rss, default=0),
                "cut": cut, **cores}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def locks_left(database: str, settle_s: float = 15) -> int:
    """Advisory locks held in `database` (the budget lock's kind) by anyone still connected,
    once the workers are gone: a start the proxy was serving at the cut holds its lock until
    it ends, so the count is read again for up to `settle_s` until it is 0."""
    deadline = time.monotonic() + settle_s
    while True:
        held = admin("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                     f"WHERE l.locktype = 'advisory' AND d.datname = '{database}'")[0][0]
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


def tally(url: str, name: str, budget: int, killed: dict[int, int]) -> dict[str, Any]:
    """From the storage: trials/s, over/under the budget, failed trials, killed trials retried."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    span = ((max(t.datetime_complete for t in done) - min(t.datetime_start for t in done))
            .total_seconds() if done else math.nan)
    retried_numbers = {n for t in trials
                       for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    failed = sum(t.state == TrialState.FAIL for t in trials)
    return {"trials_per_s": len(done) / span if span else math.nan,
            "over": max(0, len(done) - budget), "under": max(0, budget - len(done)),
            "failed": failed - len(retried_numbers & {t.number for t in trials}),
            "fails": failed,
            "retried": len(set(killed.values()) & retried_numbers)}


def one_run(path: str, workers: int, args: argparse.Namespace, tmp: Path, *,
            arm: str = "ours", kill: bool = True) -> dict[str, Any]:
    """W workers of `arm` ("ours" or "hand") on a fresh study through `path`: its figures."""
    budget = max(args.min_trials, args.trials_per_worker * workers)
    with fresh_database() as database:
        name = f"scale-{uuid.uuid4().hex[:8]}"
        create_study(direct_url(database), name, budget, tmp, arm,
                     (args.heartbeat_s, args.grace_s))
        with served_path(path, database, workers, tmp) as url:
            run = Run(url, name, arm, workers, tmp, kill)
            try:
                run.watch(database, run.start(args.setup_s, args.run_s))
            finally:
                for p in run.procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
            locks = locks_left(database)
            rollbacks = admin("SELECT xact_rollback FROM pg_stat_database WHERE datname = "
                              f"'{database}'")[0][0]
        figures = tally(direct_url(database), name, budget, run.killed)
    got = run.measured()
    errors = got["errors"]
    for reason in sorted(set(errors))[:5]:
        print(f"  {errors.count(reason)} x {reason}", file=sys.stderr)
    return {**figures, "locks": locks, "errors": len(errors), "killed": len(run.killed),
            "cut": got["cut"] + run.late, "load": os.getloadavg()[0], "rollbacks": rollbacks,
            "conns": run.conns_peak, "rss_mb": got["rss_mb"], "budget": budget,
            **{k: v for k, v in got.items() if k.startswith("cores_")},
            "p50_start": percentile(got["starts"], 50), "p99_start": percentile(got["starts"], 99),
            "p50_finish": percentile(got["ends"], 50), "p99_finish": percentile(got["ends"], 99)}


def line(path: str, workers: int, f: dict[str, Any]) -> str:
    return (f"scale path={path} workers={workers} trials_per_s={f['trials_per_s']:.1f} "
            f"p99_start_ms={f['p99_start']:.1f} over_budget={f['over']} "
            f"under_budget={f['under']} locks_left={f['locks']} errors={f['errors']} "
            f"p50_start_ms={f['p50_start']:.1f} p50_finish_ms={f['p50_finish']:.1f} "
            f"p99_finish_ms={f['p99_finish']:.1f} server_conns={f['conns']} "
            f"budget={f['budget']} killed={f['killed']} retried={f['retried']} "
            f"failed={f['failed']} fails={f['fails']} rss_mb_max={f['rss_mb']:.0f} "
            f"cores_workers={f['cores_workers']:.2f} cores_postgres={f['cores_postgres']:.2f} "
            f"cores_path={f['cores_path']:.2f} cut={f['cut']} load1={f['load']:.1f} "
            f"rollbacks={f['rollbacks']}")


def compare(args: argparse.Namespace, tmp: Path) -> None:
    """hpsearch's workers vs the hand-written loop, same clients, through PgBouncer, no kills:
    alternating which goes first, `args.compare_rounds` rounds; the ratio's median and range."""
    rates: dict[str, list[float]] = {"ours": [], "hand": []}
    for r in range(args.compare_rounds):
        for arm in (("ours", "hand") if r % 2 == 0 else ("hand", "ours")):
            f = one_run("pgbouncer", args.compare_workers, args, tmp, arm=arm, kill=False)
            rates[arm].append(f["trials_per_s"])
            print(f"compare round={r + 1} arm={arm} {line('pgbouncer', args.compare_workers, f)}",
                  flush=True)
    ratios = [o / h for o, h in zip(rates["ours"], rates["hand"], strict=True)]
    print(f"compare path=pgbouncer workers={args.compare_workers} rounds={args.compare_rounds} "
          f"ours_trials_per_s={statistics.median(rates['ours']):.1f} "
          f"hand_trials_per_s={statistics.median(rates['hand']):.1f} "
          f"ratio_median={statistics.median(ratios):.2f} ratio_min={min(ratios):.2f} "
          f"ratio_max={max(ratios):.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="10,100,300,1000")
    parser.add_argument("--paths", default="direct,pgbouncer,proxy")
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--min-trials", type=int, default=300)
    parser.add_argument("--run-s", type=float, default=90, help="each run's time limit")
    parser.add_argument("--setup-s", type=float, default=120)
    # Small enough that a killed worker's trial is retried within the run (default 10 / 30).
    parser.add_argument("--heartbeat-s", type=int, default=2)
    parser.add_argument("--grace-s", type=int, default=6)
    parser.add_argument("--compare-rounds", type=int, default=0)
    parser.add_argument("--compare-workers", type=int, default=100)
    for hidden in ("--child", "--url", "--name", "--out", "--go"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.arm = args.child
        child(args)
        return
    # SIGTERM ends the benchmark through its `finally`s: workers killed, databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ["HPSEARCH_TOKEN"] = TOKEN  # the proxy's; a study's spec is signed with it
    sys.path.insert(0, str(HERE))  # `scale:fit`, for the spec's check when it is created
    from search.storage import quiet_optuna_warnings

    quiet_optuna_warnings()  # (Optuna's experimental retry_history, read by `tally`)
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-scale-"))
    for path in args.paths.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            print(line(path, workers, one_run(path, workers, args, tmp)), flush=True)
    if args.compare_rounds:
        compare(args, tmp)


if __name__ == "__main__":
    main()
