"""Checkpoints that outlive their machine: `run.checkpoint_dir: s3://bucket/prefix`.

A worker on a cluster (Ray, Slurm) may die with its node; its trial's retry runs on another
node and must find the dead trial's checkpoint there. The trainer knows only a local folder
(`trainers.CheckpointStore`; `trainers` never imports `search`), so the adapter lives here: the
trainer writes into a scratch folder of this worker process, every save is copied to the
bucket right after it, and a retry fetches the dead trial's file before it starts. The bucket
is reached as the `s3://` artifact store is (boto3: endpoint and keys from the environment).
A shared directory needs none of this: a plain `checkpoint_dir` path on it already works.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from optuna.artifacts.exceptions import ArtifactNotFound

import trainers
from search._errors import SpecError
from search._log import logger
from search.storage import open_artifact_store

LOG = logger("trial")


class RemoteCheckpoints:
    """The checkpoint files of a study's trials in a bucket: `<prefix>/<study>/trial-<n>/…`."""

    def __init__(self, location: str, store: Any) -> None:
        self.location = location
        self.store = store

    @classmethod
    def open(cls, location: str) -> RemoteCheckpoints:
        try:
            import boto3  # noqa: F401 - only to say what is missing, in this setting's name
        except ImportError:
            raise SpecError(f"run.checkpoint_dir: {location} needs boto3 "
                            "(pip install 'hpsearch[s3]')") from None
        return cls(location, open_artifact_store(location))

    @staticmethod
    def key(study: str, number: int, filename: str = trainers.CheckpointStore.FILENAME) -> str:
        return f"{study}/trial-{number}/{filename}"

    def push(self, study: str, number: int, path: Path) -> None:
        """Copy a trial's checkpoint file to the bucket (replacing its last one)."""
        with path.open("rb") as f:
            self.store.write(self.key(study, number), f)

    def fetch(self, study: str, number: int, directory: Path) -> bool:
        """Download trial `number`'s checkpoint into `directory`; whether there was one."""
        try:
            reader = self.store.open_reader(self.key(study, number))
        except ArtifactNotFound:
            return False
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / trainers.CheckpointStore.FILENAME
        partial = directory / f".fetch-{target.name}"
        with reader, partial.open("wb") as f:  # whole or not at all, as the trainer writes
            shutil.copyfileobj(reader, f)
        partial.replace(target)
        return True

    def remove(self, study: str, number: int) -> None:
        """Delete trial `number`'s checkpoint from the bucket (gone already is fine)."""
        try:
            self.store.remove(self.key(study, number))
        except Exception:  # noqa: BLE001 - a leftover file costs bytes, not a result
            pass

    def remove_study(self, study: str, numbers: list[int]) -> int:
        """Delete the checkpoints of trials `numbers` of `study` (`hpsearch delete`); how many
        there were."""
        removed = 0
        for number in numbers:
            try:
                self.store.open_reader(self.key(study, number)).close()
            except ArtifactNotFound:
                continue
            self.store.remove(self.key(study, number))
            removed += 1
        return removed

    def __repr__(self) -> str:
        return f"RemoteCheckpoints({self.location!r})"


class SyncedCheckpointStore(trainers.CheckpointStore):
    """A trainer's checkpoint folder whose every save is copied to the remote store.

    A copy that fails is reported as a failed save (an OSError): the trainer warns once and
    goes on without checkpoints, as it does on a full disk, rather than lose the trial.
    """

    def __init__(self, directory: Path, remote: RemoteCheckpoints, study: str,
                 number: int) -> None:
        super().__init__(directory)
        self.remote, self.study, self.number = remote, study, number

    def save(self, state: dict[str, Any]) -> None:
        super().save(state)
        try:
            self.remote.push(self.study, self.number, self.path)
        except Exception as e:  # botocore's errors are no OSError: make it one
            raise OSError(f"not copied to {self.remote.location}: {e}") from e

    def push(self) -> None:
        """Copy the checkpoint another process wrote into the folder (a wide trial's rank 0)
        to the remote store; a copy that fails is a warning, as a failed save is."""
        if not self.path.exists():
            return
        try:
            self.remote.push(self.study, self.number, self.path)
        except Exception as e:  # noqa: BLE001 - a lost copy costs a retry epochs, not the trial
            LOG.warning(f"trial #{self.number}: checkpoint not copied to "
                        f"{self.remote.location} ({e})")

    def __repr__(self) -> str:
        return f"SyncedCheckpointStore({str(self.directory)!r} -> {self.remote.location!r})"


def scratch_root() -> Path:
    """This worker process's local folder for checkpoints kept remotely; gone at its exit.

    Per process, not the shared ./checkpoints: two workers on one machine must not resume from
    each other's local copies where the bucket is the one place a retry may look.
    """
    root = Path(tempfile.mkdtemp(prefix="hpsearch-checkpoints-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
