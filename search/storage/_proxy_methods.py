"""`hpsearch storage-proxy`: Optuna's storage service and hpsearch's own worker methods on one
gRPC server, in front of the database.

The worker methods (`hpsearch.Worker`, JSON in and out; the client: `_proxy_client`) run what
must be atomic where the database is: a trial's start (a WAITING trial taken, else a new one
created with its budget check in the transaction that locks the study's row, and its first
heartbeat), heartbeats, the stale-trial scan that fails dead workers' trials and queues
their retries, and interrupted trials queued again. Starts, scans and requeues of a study hold
the study's budget lock (`search.storage._locks.budget_lock`, the same one direct workers take),
taken by the proxy itself: one thread of the proxy at a time per study (on PostgreSQL in a
transaction of the proxy's own pool that the thread's calls join: `DatabaseLock.bind`), and no
client ever holds a lock. They sit behind the token check and TLS of every other method
(`search.storage._proxy.proxy_server`).

The stale scan does not blame workers for the proxy's own delay: a trial is stale only past its
grace period plus the longest a heartbeat waited inside the proxy lately (`_Lag`, measured from
each call's deadline) or the oldest call now waiting for a thread (`_proxy.QueuedPool`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from search._auth import Serving
from search._errors import SpecError, StorageError
from search._log import logger
from search._urls import is_proxy, redact, resolve_url
from search.storage._budget import BudgetReached, counts_of
from search.storage._compat import (
    backend_of,
    cache_started_trial,
    quiet_experimental,
    session,
    shared_reads_cache,
    stale_trial_ids,
    trial_id_of,
)
from search.storage._control import requeue_interrupted
from search.storage._locks import Lock, budget_lock
from search.storage._open import open_storage
from search.storage._proxy import SERVER_THREADS, QueuedPool, proxy_server
from search.storage._proxy_client import SERVICE, VERSION, decode, encode
from search.storage._reader import reading
from search.storage._retry import is_connection_error
from search.storage._tables import count_states, first_heartbeat, record_heartbeats
from search.storage._trial_start import take_waiting, worker_view

LOG = logger("storage")
SCAN_EVERY_S = 1.0  # a study's stale scan at most this often: workers waiting ask each second
# Threads that may wait for a study's lock at once; a call past them is answered "busy" at once
# (its worker asks again shortly), so the server's other threads stay free for Optuna's calls
# (reports, tells) and heartbeats: hundreds of workers starting trials never take them all.
LOCK_WAITERS = 4
KEPT_ERRORS = 64  # a failed heartbeat batch's error is kept for this many later batches' time
# A trial is failed as stale only once its last heartbeat is older than its grace period plus
# the longest any heartbeat waited inside the proxy (its queue, its batch) in this window: an
# overloaded proxy does not fail live workers' trials for beats it held up itself.
LAG_WINDOW_S = 120.0
LAG_WARN_EVERY_S = 60.0  # the proxy says it holds heartbeats up at most this often


@dataclass
class _Study:
    """A study the proxy serves workers of: its name, and its budget lock (a thread's at a
    time: a database lock is one connection's)."""

    name: str
    lock: Lock
    threads: threading.Lock = field(default_factory=threading.Lock)
    waiters: threading.Semaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(LOCK_WAITERS))
    scanned: float = -float("inf")

    @contextmanager
    def held(self) -> Iterator[bool]:
        """The lock held (True), or False at once when LOCK_WAITERS threads wait for it."""
        if not self.waiters.acquire(blocking=False):
            yield False
            return
        try:
            with self.threads:
                self.lock.acquire()
                try:
                    yield True
                finally:
                    self.lock.release()
        finally:
            self.waiters.release()


class _Beats:
    """Workers' heartbeats written together: a Beat call's trial ids join the next batch, one
    statement for every id gathered while the last batch was written (`record_heartbeats`), and
    the call returns once its batch is committed. The first caller to find no batch in flight
    writes one; the others wait for theirs. Hundreds of workers beating each cost the proxy a
    statement a batch, not a transaction each. A batch that fails raises in each of its calls."""

    def __init__(self, write: Callable[[list[int]], None]) -> None:
        self.write = write
        self.cond = threading.Condition()
        self.pending: set[int] = set()
        self.begun = 0  # batches begun; batch k+1 holds what came in while k was written
        self.ended = 0  # the last batch written (or failed)
        self.writing = False
        self.failed: dict[int, BaseException] = {}  # batch number → its error (a few kept)

    def beat(self, trial_ids: list[int]) -> None:
        with self.cond:
            self.pending.update(trial_ids)
            mine = self.begun + 1  # the next batch to begin holds these ids
            while self.ended < mine:
                if self.writing:
                    self.cond.wait()
                    continue
                batch, self.pending = sorted(self.pending), set()
                self.begun += 1
                number, self.writing = self.begun, True
                self.cond.release()
                error: BaseException | None = None
                try:
                    self.write(batch)
                except BaseException as e:  # noqa: BLE001 - handed to this batch's callers
                    error = e
                finally:
                    self.cond.acquire()
                    self.writing, self.ended = False, number
                    self.failed.pop(number - KEPT_ERRORS, None)
                    if error is not None:
                        self.failed[number] = error
                    self.cond.notify_all()
            error = self.failed.get(mine)
        if error is not None:
            raise error


class _Lag:
    """How long workers' heartbeats waited inside the proxy lately: from the moment gRPC
    received the call (its deadline, less the timeout the client sent) to its batch's commit.
    `recent()` is the longest in the last LAG_WINDOW_S (a sliding maximum)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.marks: deque[tuple[float, float]] = deque()  # (when, lag), lags decreasing
        self.warned = -math.inf

    def add(self, lag: float, grace: int | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            while self.marks and self.marks[-1][1] <= lag:
                self.marks.pop()
            self.marks.append((now, lag))
            warn = (grace is not None and lag > grace / 2
                    and now - self.warned > LAG_WARN_EVERY_S)
            if warn:
                self.warned = now
        if warn:
            LOG.warning(f"storage proxy: a heartbeat waited {lag:.1f} s inside the proxy (its "
                        f"queue of calls, more than half the {grace} s grace period): it serves "
                        "more workers than it keeps up with, and trials are failed as stale "
                        "only that much later; docs/scale.md says what to use past it")

    def recent(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.marks and self.marks[0][0] < now - LAG_WINDOW_S:
                self.marks.popleft()
            return self.marks[0][1] if self.marks else 0.0


class WorkerService:
    """hpsearch's worker methods over the proxy's RDB storage at `url`."""

    def __init__(self, storage: Any, url: str,
                 queued: Callable[[], float] = lambda: 0.0) -> None:
        backend = backend_of(storage)
        if not isinstance(backend, RDBStorage):
            raise StorageError("the storage proxy serves a database (an RDB storage)")
        # `storage`: Optuna's cache wrapper, which Optuna's service on the same server uses.
        self.storage, self.backend, self.url = storage, backend, url
        self._studies: dict[int, _Study] = {}
        self._views: dict[tuple[int, int | None], RDBStorage] = {}
        self._guard = threading.Lock()
        self._beats = _Beats(lambda ids: record_heartbeats(self.backend, ids))
        self.lag = _Lag()
        self.queued = queued  # how long the oldest call waiting for a thread has waited

    def methods(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"Hello": self.hello, "StartTrial": self.start_trial, "Beat": self.beat,
                "Stale": self.stale, "FailStale": self.fail_stale, "Requeue": self.requeue}

    def hello(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"version": VERSION}

    def start_trial(self, request: dict[str, Any]) -> dict[str, Any]:
        """A WAITING trial taken, else a new one created, under the budget; its first beat."""
        study_id, budget = _int(request, "study_id"), _int(request, "budget", none=True)
        study = self._study(study_id)
        view = worker_view(self.backend, budget, beat=True)

        def counts() -> Any:
            with session(view) as s:
                return counts_of(count_states(s.connection(), study_id))

        try:
            with study.held() as held:
                if not held:
                    return {"busy": True}
                trial_id = take_waiting(view, study_id, budget, counts)
                if trial_id is None:
                    trial = view._create_new_trial(study_id)
                else:  # a WAITING trial taken: its first beat now
                    first_heartbeat(view, trial_id)
                    trial = view.get_trial(trial_id)
        except BudgetReached as full:
            return {"full": asdict(full.counts)}
        # Optuna's service sets the trial's params through its cache, which must know it.
        cache_started_trial(self.storage, study_id, trial)
        return {"trial_id": trial_id_of(trial)}

    def beat(self, request: dict[str, Any]) -> dict[str, Any]:
        ids = request.get("trial_ids")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ValueError("trial_ids: expected a list of trial ids")
        self._beats.beat(ids)
        arrived = request.get(ARRIVED)
        if isinstance(arrived, float):
            grace = request.get("grace")
            self.lag.add(time.monotonic() - arrived, grace if type(grace) is int else None)
        return {}

    def stale(self, request: dict[str, Any]) -> dict[str, Any]:
        view = self._heartbeat_view(request)
        return {"trial_ids": stale_trial_ids(view, _int(request, "study_id"))}

    def fail_stale(self, request: dict[str, Any]) -> dict[str, Any]:
        """The study's stale trials failed and their retries queued, under its budget lock."""
        view, study = self._heartbeat_view(request), self._study(_int(request, "study_id"))
        if time.monotonic() - study.scanned < SCAN_EVERY_S:
            return {}
        with study.held() as held:
            if not held or time.monotonic() - study.scanned < SCAN_EVERY_S:
                return {}  # busy, or scanned by the call this one waited behind: later
            loaded = optuna.load_study(study_name=study.name, storage=view,
                                       sampler=optuna.samplers.RandomSampler())
            with quiet_experimental():
                optuna.storages.fail_stale_trials(loaded)
            study.scanned = time.monotonic()
        return {}

    def requeue(self, request: dict[str, Any]) -> dict[str, Any]:
        """Interrupted trials ended and queued again (`requeue_interrupted`), under the study's
        budget lock."""
        numbers = request.get("numbers")
        if not isinstance(numbers, list) or not all(type(n) is int for n in numbers):
            raise ValueError("numbers: expected a list of trial numbers")
        study = self._study(_int(request, "study_id"))
        with study.held() as held:
            if not held:
                return {"busy": True}
            loaded = optuna.load_study(study_name=study.name, storage=self.storage,
                                       sampler=optuna.samplers.RandomSampler())
            return {"queued": requeue_interrupted(loaded, set(numbers))}

    def _study(self, study_id: int) -> _Study:
        with self._guard:
            study = self._studies.get(study_id)
        if study is not None:
            return study
        name = self.backend.get_study_name_from_id(study_id)  # KeyError: NOT_FOUND
        lock = budget_lock(self.url, name)
        lock.bind(self.backend)  # PostgreSQL: held in the transaction its holder's calls join
        with self._guard:
            return self._studies.setdefault(study_id, _Study(name, lock))

    def _heartbeat_view(self, request: dict[str, Any]) -> RDBStorage:
        """The proxy's storage with the worker's heartbeat settings (its study's spec), its
        grace period lengthened by the longest wait of a heartbeat inside the proxy lately."""
        interval, grace = _int(request, "interval"), _int(request, "grace", none=True)
        if interval is None or interval <= 0 or (grace is not None and grace <= 0):
            raise ValueError("interval and grace: expected positive seconds")
        # The beats that came in late lately, or those waiting now (which may be later still).
        lag = max(self.lag.recent(), self.queued())
        if lag > 0:  # (Optuna's grace when none is set: two intervals)
            grace = (grace or 2 * interval) + math.ceil(lag)
        key = (interval, grace)
        with self._guard:
            view = self._views.get(key)
            if view is None:
                view = object.__new__(type(self.backend))  # the engine shared, as worker_view
                view.__dict__.update(self.backend.__dict__)
                view.heartbeat_interval, view.grace_period = key
                with quiet_experimental():
                    view.heartbeat_stale_trial_callback = RetryHeartbeatStaleTrialCallback(
                        inherit_intermediate_values=True)
                view.failed_trial_callback = view.heartbeat_stale_trial_callback
                self._views[key] = view
            return view


ARRIVED = "_arrived"  # set by the server on a request: when gRPC received it (monotonic)


MAX_TIMEOUT_S = 3600.0  # the longest timeout a client may say it sent (hpsearch's: 300 s)


def _timeout_s(request: dict[str, Any]) -> float | None:
    """The timeout the client says it gave the call, or None when it says none. One past
    MAX_TIMEOUT_S is refused: the wait measured from it (`_Lag`) lengthens every trial's grace
    period for LAG_WINDOW_S, so a client claiming a day would keep dead trials RUNNING."""
    sent = request.get("timeout_s")
    if sent is None:
        return None
    if (type(sent) not in (int, float) or not math.isfinite(sent)
            or not 0 < sent <= MAX_TIMEOUT_S):
        raise ValueError(f"timeout_s: expected seconds in (0, {MAX_TIMEOUT_S:g}], got {sent!r}")
    return float(sent)


def _int(request: dict[str, Any], key: str, *, none: bool = False) -> Any:
    value = request.get(key)
    if (value is None and none) or type(value) is int:
        return value
    raise ValueError(f"{key}: expected an integer{' or null' if none else ''}, got {value!r}")


def add_worker_service(server: Any, storage: Any, url: str,
                       queued: Callable[[], float] = lambda: 0.0) -> None:
    """hpsearch's worker methods for `storage` (at `url`), added to the proxy's gRPC `server`
    (behind its interceptors: the token check); `queued`: how long the oldest call waiting for
    one of the server's threads has waited (`_proxy.QueuedPool.oldest_wait`)."""
    import grpc

    service = WorkerService(storage, url, queued)

    def handler(method: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        def handle(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
            try:
                request.pop(ARRIVED, None)
                sent, left = _timeout_s(request), context.time_remaining()
                if sent is not None and left is not None and left > 0:
                    # When gRPC received the call: its deadline less the client's timeout
                    # (gRPC sends a deadline rounded, up by a second or so: a quick call reads
                    # as none).
                    request[ARRIVED] = time.monotonic() - max(0.0, sent - left)
                return method(request)
            except KeyError as e:
                context.abort(grpc.StatusCode.NOT_FOUND, f"not found: {e}")
            except (ValueError, TypeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:300])
            except Exception as e:  # noqa: BLE001 - the storage's: one line to the client
                said = redact(f"{type(e).__name__}: {e}").splitlines()[0][:300]
                LOG.warning(f"storage proxy: {method.__name__} failed ({said})")
                code = (grpc.StatusCode.UNAVAILABLE if is_connection_error(e)
                        else grpc.StatusCode.INTERNAL)
                context.abort(code, said)
            raise AssertionError("unreachable")  # context.abort raised

        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=decode,
                                                   response_serializer=encode)

    handlers = {name: handler(method) for name, method in service.methods().items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def serve_proxy(url: str | None, *, serving: Serving, port: int) -> None:
    """`hpsearch storage-proxy`: Optuna's gRPC storage service and hpsearch's worker methods in
    front of the database, with TLS and the token where `serving` has them
    (`search._auth.serving`), until Ctrl-C."""
    url = resolve_url(url)
    if is_proxy(url):
        raise SpecError("--storage: the proxy serves a database URL, not another proxy")
    # Cached, as Optuna advises; trials read in two queries, re-reads shared between threads.
    storage = shared_reads_cache(reading(open_storage(url)))
    pool = QueuedPool(SERVER_THREADS)
    server = proxy_server(storage, serving, port, pool)
    add_worker_service(server, storage, url, pool.oldest_wait)
    scheme = "grpcs" if serving.tls else "grpc"
    guarded = ("TLS and a token" if serving.tls and serving.token else
               "TLS, no token" if serving.tls else
               "a token, no TLS" if serving.token else "no TLS, no token")
    print(f"storage proxy for {redact(url)} on {scheme}://{serving.host}:{port} ({guarded}); "
          f"workers use --storage {scheme}://{serving.host}:{port}"
          + (" with $HPSEARCH_TOKEN" if serving.token else "") + " (Ctrl-C stops it)",
          flush=True)
    server.start()
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=2)
