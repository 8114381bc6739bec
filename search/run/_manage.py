"""`hpsearch stop` and `hpsearch delete`: a study paused cleanly, or removed with what it left.

Stopping is a flag in the storage that every worker, on every machine, sees at its next
heartbeat: each checkpoints its trial at the next epoch, queues it again and exits; the next
`run` or `worker` resumes the study. Deleting removes the study, its trials' artifacts, its
checkpoints and its lock file, which `optuna delete-study` leaves behind.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from search._errors import SearchError, SpecError
from search._urls import redact, resolve_url
from search.run._studies import load
from search.storage import (
    checkpoint_location,
    count_trials,
    delete_study,
    is_remote,
    open_storage,
    request_stop,
)


def stop_study(name: str, storage: str | None, *, wait_s: float | None = None) -> int:
    """Ask every worker of study `name` to stop; with `wait_s`, wait until none runs."""
    study, spec = load(name, open_storage(storage, must_exist=True))
    request_stop(study)
    running = count_trials(study).running
    interval = spec.run.heartbeat_interval
    print(f"asked the workers of {name!r} to stop ({running} trial(s) running): each sees it "
          f"within {interval} s (its heartbeat), checkpoints its trial at the next epoch, "
          f"queues it again and exits; `hpsearch run` or `hpsearch worker` resumes the study",
          flush=True)
    if wait_s is None:
        return 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            print("no trial is running: the study is stopped", flush=True)
            return 0
        time.sleep(1.0)
    left = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    raise SearchError(f"--wait: {left} trial(s) still running after {wait_s:g} s (a worker "
                      f"may be in a long epoch, or dead: its trial is retried after "
                      f"{spec.run.grace_period} s without a heartbeat)")


def delete_study_files(name: str, storage: str | None, *, yes: bool = False) -> int:
    """Delete study `name` with its artifacts, checkpoints and lock file (asks unless `yes`)."""
    url = resolve_url(storage)
    opened = open_storage(url, must_exist=True)
    study, spec = load(name, opened)
    counts = count_trials(study)
    location = checkpoint_location(spec.run.checkpoint_dir, url)
    remote = None
    if is_remote(location):  # its module loads the trainer (torch): only for a bucket
        from search.trial import RemoteCheckpoints

        remote = RemoteCheckpoints.open(location)
    if counts.running:
        raise SpecError(f"study {name!r} has {counts.running} running trial(s): stop it first "
                        f"(`hpsearch stop {name} --wait`)")
    if not yes:
        if not sys.stdin.isatty():
            raise SpecError(f"delete: confirm with --yes (deleting {name!r} from "
                            f"{redact(url)} cannot be undone)")
        answer = input(f"delete study {name!r} ({counts.complete + counts.pruned + counts.failed}"
                       f" trials) from {redact(url)}, with its artifacts and checkpoints "
                       f"under {location.rstrip('/')}/{name}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    in_bucket = None
    if remote is not None:  # each trial's copy, first: a bucket out of reach deletes nothing
        numbers = [t.number for t in study.get_trials(deepcopy=False)]
        try:
            in_bucket = remote.remove_study(name, numbers)
        except Exception as e:  # noqa: BLE001 - botocore's errors: one line, the study kept
            raise SearchError(f"{location}: cannot remove the study's checkpoints there "
                              f"({type(e).__name__}: {e}); the study was not deleted") from e
    removed = delete_study(name, opened,
                           checkpoint_root=None if remote else Path(location))
    checkpoints = (f"{removed['checkpoint_folders']} checkpoint folder(s)" if in_bucket is None
                   else f"{in_bucket} checkpoint file(s) in {location}")
    print(f"deleted study {name!r}: {removed['trials']} trials, {removed['artifacts']} "
          f"artifact files, {checkpoints}, {removed['lock_files']} lock file(s)")
    return 0
