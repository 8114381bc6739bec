"""A worker's heartbeat: one thread for the worker's life, beating for the trials it runs
(one, or the members of a pack: `search.trial._packing`).

Each trial's first beat is written with the trial itself (`_trial_start`), or synchronously as a
WAITING trial is taken, then one every `heartbeat_interval` seconds; a worker killed at any point
after that leaves a trial that goes stale and is retried by the storage's
RetryHeartbeatStaleTrialCallback. Optuna's own per-trial heartbeat thread and its stale scan
before every ask are off for the trials a worker runs: this does both, dead workers' trials
failed at most once an interval and whenever the worker is about to wait for others.
Through the gRPC proxy the beats are calls of hpsearch's worker methods, and the proxy fails
stale trials and queues their retries itself, under its own budget lock
(`search.storage._proxy_methods`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import optuna

from search._log import logger
from search.storage._compat import (
    heartbeat_enabled,
    quiet_experimental,
    storage_of,
    study_id_of,
)
from search.storage._control import stop_requested
from search.storage._retry import is_connection_error
from search.storage._tables import first_heartbeat

LOG = logger("storage")
LATE_ROUNDS = 10  # the stop check waits at most this many rounds of late beats


class WorkerHeartbeat:
    """Beats for each trial between its `begin` and `end`; fails stale trials with
    `fail_stale`.

    `study` must be on the heartbeat-enabled storage (it is the one stale trials are failed
    through, so its RetryHeartbeatStaleTrialCallback queues their retries), or a proxy client
    opened with heartbeats. Without heartbeats every method does nothing.
    """

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.storage = storage_of(study)
        self.interval: int | None = (self.storage.get_heartbeat_interval()
                                     if heartbeat_enabled(self.storage) else None)
        self._trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set to beat now (and by `close`, to end)
        self._late = 0  # beats in a row that came back late, so the stop check was put off
        self._thread: threading.Thread | None = None
        self._last_check = -float("inf")
        self._warned = False
        # Set when `hpsearch stop` asks this study's workers to stop (read at each beat).
        self.stop = threading.Event()

    def begin(self, trial_id: int, *, written: bool = False, since: float | None = None
              ) -> None:
        """The trial's first beat, written before this returns (unless the trial's creation
        `written` it: search.storage._trial_start, no earlier than `since`, a monotonic time);
        later ones from the thread, at once if that first beat is already older than the grace
        period less an interval (a start held up by a busy storage): the thread's next round
        could come too late."""
        if self.interval is None:
            return
        if not written:
            first_heartbeat(self.storage, trial_id)
        self._trial_ids = self._trial_ids | {trial_id}  # a new set: the thread reads a snapshot
        grace = getattr(self.storage, "grace_period", None) or 2 * self.interval  # (Optuna's)
        if written and since is not None and time.monotonic() - since > grace - self.interval:
            self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="hpsearch-heartbeat",
                                            daemon=True)
            self._thread.start()

    def end(self, trial_id: int | None = None) -> None:
        """No more beats for `trial_id` (for every trial when None)."""
        self._trial_ids = set() if trial_id is None else self._trial_ids - {trial_id}

    def close(self) -> None:
        self._trial_ids = set()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def fail_stale(self, *, now: bool = False, lock: Any = None) -> None:
        """Fail the trials of dead workers and queue their retries: at most once an interval
        unless `now`. Under the budget `lock` (`search.storage._locks`): no worker counts the
        trials between a failed trial and its queued retry."""
        if self.interval is None:
            return
        if not now and time.monotonic() - self._last_check < self.interval:
            return
        on_proxy = getattr(self.storage, "fail_stale_on_proxy", None)
        if on_proxy is not None:  # the proxy holds the lock itself: no client ever does
            on_proxy(study_id_of(self.study))
            self._last_check = time.monotonic()
            return
        if lock is not None:
            lock.acquire()
        try:
            with quiet_experimental():
                optuna.storages.fail_stale_trials(self.study)
        finally:
            if lock is not None:
                lock.release()
        self._last_check = time.monotonic()

    def _beat(self) -> None:
        """Each interval, a beat for each trial, then the check for `hpsearch stop`. When the
        beats came back late (more than half an interval), the check waits for a round that
        does not, up to LATE_ROUNDS rounds: a trial's beats stay no further apart than an
        interval plus one of the storage's delays, which the proxy allows for
        (`_proxy_methods`), not two."""
        assert self.interval is not None
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            began = time.monotonic()
            trial_id = None
            try:
                for trial_id in sorted(self._trial_ids):
                    self.storage.record_heartbeat(trial_id)
                trial_id = None
                late = time.monotonic() - began > self.interval / 2
                self._late = self._late + 1 if late else 0
                if self._late in (0, LATE_ROUNDS):
                    self._late = 0
                    if stop_requested(self.study):
                        self.stop.set()
            except Exception as e:
                # The storage is away: the worker's own calls wait for it; a beat missed for
                # longer than the grace period makes the trial stale, as a dead worker's would.
                if not is_connection_error(e) and not self._warned:
                    self._warned = True
                    LOG.warning(f"heartbeat of trial id {trial_id} not recorded "
                                f"({type(e).__name__}: {e})")
