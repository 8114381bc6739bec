"""A worker's side of hpsearch's own methods on the storage proxy (the server's side:
`search.storage._proxy_methods`).

Through `hpsearch storage-proxy` a worker starts a trial, beats, fails stale trials and queues
interrupted ones again as one call each, which the proxy runs on its database, under its own
budget lock:
no lock is held by a client (one that died holding it would stop every worker). The methods
are a service of their own (`hpsearch.Worker`) on the proxy's gRPC server, behind its token
check and TLS, carried by the channel of Optuna's client (one connection a worker); requests
and replies are JSON, so the server never unpickles what a client sends. A proxy of an older
hpsearch, without them, is one clear line (`hello`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from search._errors import StorageError
from search.storage import _compat
from search.storage._budget import BudgetReached, Counts
from search.storage._compat import quiet_experimental

SERVICE = "hpsearch.Worker"  # the gRPC service of hpsearch's worker methods
VERSION = 1  # what `Hello` answers: a client needing more refuses an older proxy
CALL_TIMEOUT_S = 300.0  # a start may wait for the proxy's budget lock
# A call the proxy answers "busy" is asked again after a pause that doubles from the first to
# the last (each drawn from its upper half): a thousand workers waiting to start trials would
# otherwise ask thousands of times a second, and the heartbeats queued behind those calls would
# come later than the grace period.
BUSY_FIRST_PAUSE_S = 0.1
BUSY_LAST_PAUSE_S = 2.0


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data or b"{}")
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message


class WorkerMethods(_compat.BaseHeartbeat):
    """hpsearch's worker methods on a proxy client (mixed into Optuna's `GrpcStorageProxy`
    by `search.storage._proxy.open_proxy`): Optuna's heartbeat interface served by the proxy,
    a trial's start under the budget, and the stale-trial scan with its retries."""

    url = ""  # the proxy's URL, for messages
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    # A worker's view (`worker_view`): the budget its trials start under, and the trial whose
    # first heartbeat the proxy wrote as it started it.
    budget: int | None = None
    beaten: int | None = None
    _calls: dict[str, Callable[..., Any]] | None = None

    def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        """One of hpsearch's methods on the proxy; its reply, asked again after a growing random
        pause while the proxy says it is busy (enough of its threads wait for the study's
        lock). KeyError for an unknown study or trial; StorageError, in one line, from a proxy
        that has no such method."""
        pause = BUSY_FIRST_PAUSE_S
        while True:
            reply = self._call_once(method, request)
            if not reply.get("busy"):
                return reply
            time.sleep(random.uniform(0.5, 1.0) * pause)
            pause = min(2 * pause, BUSY_LAST_PAUSE_S)

    def _call_once(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        import grpc

        if self._calls is None:
            self._calls = {}
        call = self._calls.get(method)
        if call is None:
            call = _compat.proxy_channel(self).unary_unary(
                f"/{SERVICE}/{method}", request_serializer=encode, response_deserializer=decode)
            self._calls[method] = call
        try:
            return call(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise StorageError(
                    f"the storage proxy at {self.url} has no hpsearch worker methods (an "
                    "hpsearch older than this client serves it): upgrade the proxy's hpsearch"
                ) from None
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(e.details()) from None
            raise

    def hello(self) -> None:
        """Check that the proxy serves hpsearch's worker methods (StorageError if not)."""
        version = self.call("Hello", {}).get("version", 0)
        if version < VERSION:
            raise StorageError(f"the storage proxy at {self.url} serves hpsearch's worker "
                               f"methods version {version}; this worker needs {VERSION}")

    def record_heartbeat(self, trial_id: int) -> None:
        # The timeout sent, and the grace: the proxy measures how long it held the beat up.
        self.call("Beat", {"trial_ids": [trial_id], "timeout_s": CALL_TIMEOUT_S,
                           "grace": self.grace_period})

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.call("Stale", self._heartbeat_request(study_id))["trial_ids"]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, Any], None]:
        with quiet_experimental():  # as `open_storage` configures a database's
            return RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)

    def fail_stale_on_proxy(self, study_id: int) -> None:
        """Fail the study's stale trials and queue their retries, on the proxy under its budget
        lock."""
        self.call("FailStale", self._heartbeat_request(study_id))

    def requeue_on_proxy(self, study_id: int, numbers: list[int]) -> list[int]:
        """`requeue_interrupted` run by the proxy under its budget lock: the numbers queued."""
        return self.call("Requeue", {"study_id": study_id, "numbers": numbers})["queued"]

    def start_trial(self, study_id: int) -> int:
        """A trial started on the proxy: a WAITING one taken, else a new one, admitted against
        `budget` in the transaction that takes or creates it, its first heartbeat written.
        BudgetReached, with the counts, when the budget leaves no room."""
        reply = self.call("StartTrial", {"study_id": study_id, "budget": self.budget})
        if "full" in reply:
            raise BudgetReached(Counts(**reply["full"]))
        trial_id = int(reply["trial_id"])
        self.beaten = trial_id
        return trial_id

    def _heartbeat_request(self, study_id: int) -> dict[str, Any]:
        if self.heartbeat_interval is None:
            raise ValueError("this proxy client was opened without heartbeats")
        return {"study_id": study_id, "interval": self.heartbeat_interval,
                "grace": self.grace_period}


class ProxyWorkerStudy(optuna.Study):
    """A study whose trials start on the proxy (`WorkerMethods.start_trial`): a WAITING trial
    taken, or a new one created, as one operation of the proxy under the budget."""

    def _pop_waiting_trial_id(self) -> int | None:
        # Optuna asks for a WAITING trial first and creates one when there is none: the proxy
        # does both in one call, so Optuna's own creation is never reached.
        return self._storage.start_trial(self._study_id)


def worker_view(proxy: WorkerMethods, budget: int | None) -> WorkerMethods:
    """A worker's view of a proxy client: trials start under `budget`; the same channel and
    trial cache (no new connection); Optuna's per-trial heartbeat off (the worker beats)."""
    view = object.__new__(type(proxy))
    view.__dict__.update(proxy.__dict__)
    view.heartbeat_interval = None
    view.budget = budget
    view.beaten = None
    return view
