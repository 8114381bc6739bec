"""Controlling a study from outside its workers: stop it cleanly, resume interrupted trials,
delete it with everything it left.

`hpsearch stop` is a flag on the study (a user attr) that every worker's heartbeat thread
reads: each checkpoints its trial at its next epoch and exits. An interrupted trial (Ctrl-C,
SIGTERM, a stop) ends as FAIL and is queued again as a WAITING retry, as a dead worker's trial
is, so the next `run` or `worker` on any machine resumes it from its last checkpoint.
"""

from __future__ import annotations

import copy
import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search.storage import _compat
from search.storage._artifact_store import artifact_location, open_artifact_store, storage_url_of
from search.storage._compat import quiet_experimental, storage_of, study_id_of, trial_id_of
from search.storage._locks import budget_lock

STOP_ATTR = "hpsearch_stop"  # set by `hpsearch stop`: when it was asked for
INTERRUPTED = "interrupted"
# Why a trial was interrupted by a lack of memory: of that trial, not of its retry (which
# Optuna's retry would otherwise copy with the other user attrs).
# Why a run was interrupted: said on the run that was, not inherited by its retry.
OOM_ATTRS = ("oom_pack", "oom_shared", "rank_lost")


def request_stop(study: optuna.Study) -> None:
    """`hpsearch stop`: flag the study; every worker's heartbeat reads it and stops its
    trials at their next epoch's end."""
    study.set_user_attr(STOP_ATTR, dt.datetime.now(dt.timezone.utc).isoformat())


def stop_requested(study: optuna.Study) -> bool:
    """Whether `hpsearch stop` asked this study's workers to stop (one small read)."""
    return bool(storage_of(study).get_study_user_attrs(study_id_of(study)).get(STOP_ATTR))


def clear_stop(study: optuna.Study) -> bool:
    """Forget a stop request (a new `run` or `worker` resumes the study); whether there was
    one. (Optuna deletes no study attr: the request is set to null.)"""
    if not stop_requested(study):
        return False
    study.set_user_attr(STOP_ATTR, None)
    return True


def _retried_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the trials a queued or run retry already stands for."""
    out: set[int] = set()
    with quiet_experimental():
        for t in study.get_trials(deepcopy=False):
            out.update(RetryHeartbeatStaleTrialCallback.retry_history(t))
    return out


def taken_over(study: optuna.Study, number: int) -> bool:
    """Whether trial `number` was failed by others (stale: its worker paused past the grace
    period) and retried: the worker that ran it must drop its late result."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return (trial is not None and trial.state == TrialState.FAIL
            and trial.user_attrs.get("ended") != INTERRUPTED
            and number in _retried_numbers(study))


def requeue_interrupted(study: optuna.Study, numbers: set[int]) -> list[int]:
    """End trials `numbers` that an interruption left (RUNNING, or FAIL "interrupted") as FAIL
    "interrupted", and queue each again with its params: the retry resumes from its
    checkpoints. A trial already retried is not queued twice. The numbers queued."""
    if not numbers:
        return []
    storage = storage_of(study)
    on_proxy = getattr(storage, "requeue_on_proxy", None)
    if on_proxy is not None:  # the proxy queues them itself, under its budget lock
        return on_proxy(study_id_of(study), sorted(numbers))
    done = _retried_numbers(study)
    with quiet_experimental():
        retry = RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
    queued = []
    for t in study.get_trials(deepcopy=False):
        if t.number not in numbers or t.number in done:
            continue
        if t.state == TrialState.RUNNING:
            try:
                storage.set_trial_user_attr(trial_id_of(t), "ended", INTERRUPTED)
                storage.set_trial_state_values(trial_id_of(t), state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its worker finished it after all: nothing to resume
            t = storage.get_trial(trial_id_of(t))
        if t.state != TrialState.FAIL or t.user_attrs.get("ended") != INTERRUPTED:
            continue
        t = copy.copy(t)
        t.user_attrs = {k: v for k, v in t.user_attrs.items() if k not in OOM_ATTRS}
        retry(study, t)
        queued.append(t.number)
    return queued


def requeue_left(study: optuna.Study, lock: Any) -> list[int]:
    """Queue again every trial left FAIL "interrupted" without a retry, under the budget lock
    (another machine's worker may be queueing its own); the numbers queued."""
    lock.bind(study)  # PostgreSQL: held in the storage's own transaction
    lock.acquire()
    try:
        left = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.user_attrs.get("ended") == INTERRUPTED}
        return requeue_interrupted(study, left)
    finally:
        lock.release()


def delete_study(name: str, storage: optuna.storages.BaseStorage, *,
                 checkpoint_root: Path | None) -> dict[str, int]:
    """Delete study `name` from `storage` with its trials' artifacts, its checkpoints under
    `checkpoint_root` (None: kept elsewhere, a bucket) and its budget lock file; what was
    removed, counted."""
    study = optuna.load_study(study_name=name, storage=storage)
    url = storage_url_of(storage)
    removed = {"trials": 0, "artifacts": 0, "checkpoint_folders": 0, "lock_files": 0}
    location = artifact_location(url)
    store = open_artifact_store(location) if location else None
    for t in study.get_trials(deepcopy=False):
        removed["trials"] += 1
        if store is None:
            continue
        for key in t.system_attrs:
            if key.startswith(_compat.ARTIFACTS_ATTR_PREFIX):
                try:
                    store.remove(key[len(_compat.ARTIFACTS_ATTR_PREFIX):])
                    removed["artifacts"] += 1
                except Exception:  # noqa: BLE001 - already gone: nothing to remove
                    pass
    optuna.delete_study(study_name=name, storage=storage)
    folder = checkpoint_root / name if checkpoint_root is not None else None
    if folder is not None and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        removed["checkpoint_folders"] += 1
    if url is not None:
        lock = budget_lock(url, name)
        path = getattr(lock, "path", None)
        if path is not None and Path(path).exists():
            Path(path).unlink()
            removed["lock_files"] += 1
    return removed


def remove_finished_checkpoints(study: optuna.Study, checkpoint_root: Path,
                                keep: bool) -> bool:
    """Remove a study's checkpoint folder once nothing of it runs or waits (what is left there
    belongs to failed trials that will not be resumed); True when removed."""
    folder = checkpoint_root / study.study_name
    if keep or not folder.is_dir():
        return False
    active = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    if active:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
