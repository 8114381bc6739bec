"""The artifact store next to the study storage, and trial files linked as Optuna links them.

The store is a directory next to the storage (``<db file>.artifacts/`` for SQLite, else
``./hpsearch-artifacts``), or what ``$HPSEARCH_ARTIFACTS`` names: a directory (shared, for many
machines), ``s3://bucket/prefix`` (any S3-compatible service; boto3 reads the endpoint and keys
from its usual environment), or ``off``. On an RDB storage a trial's files are written here and
their links returned, to be written with the trial's result in one transaction, in the exact
form `optuna.artifacts.upload_artifact` writes them.
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, upload_artifact

from search._errors import SpecError, StorageError
from search._urls import redact, sqlite_path
from search.storage import _compat

ENV_VAR = "HPSEARCH_ARTIFACTS"
DEFAULT_DIR = "hpsearch-artifacts"
OFF = ("off", "none", "0", "false")

def artifact_location(storage_url: str | None) -> str | None:
    """Where artifacts go: $HPSEARCH_ARTIFACTS, else next to a SQLite file, else ./; None: off."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        return None if configured.lower() in OFF else configured
    path = sqlite_path(storage_url) if storage_url else None
    if path is not None:
        return f"{path}.artifacts"
    return DEFAULT_DIR

# `run.checkpoint_dir: artifact-store`: the checkpoints follow the artifact store.
ARTIFACT_STORE = "artifact-store"
# Checkpoint locations that are a bucket, not a folder (search.trial._remote_checkpoints).
REMOTE_SCHEMES = ("s3://",)


def is_remote(location: str | None) -> bool:
    """Whether `run.checkpoint_dir` (as `checkpoint_location` resolves it) names a remote store
    rather than a folder."""
    return location is not None and location.startswith(REMOTE_SCHEMES)


def checkpoint_location(configured: str | None, storage_url: str | None) -> str:
    """Where a study's checkpoints go: `run.checkpoint_dir` as written (./checkpoints when
    unset), and for `artifact-store` the artifact store's own place plus /checkpoints: under
    `$HPSEARCH_ARTIFACTS` (a shared folder or s3://bucket/prefix, so a retry on another node
    finds them), else next to the storage as the artifacts are."""
    if configured != ARTIFACT_STORE:
        return configured or "checkpoints"
    store = artifact_location(storage_url)
    if store is None:
        raise SpecError(f"run.checkpoint_dir: {ARTIFACT_STORE}, but the artifact store is off "
                        "($HPSEARCH_ARTIFACTS); name a folder or s3://bucket/prefix instead")
    return f"{store.rstrip('/')}/checkpoints"

class _PrefixedStore:
    """An artifact store whose keys all start with `prefix/` (s3://bucket/prefix)."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> IO[bytes]:
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)

def open_artifact_store(location: str) -> Any:
    """The Optuna artifact store at `location` (a directory, created if missing, or s3://)."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        if not bucket:
            raise SpecError(f"{ENV_VAR}: expected s3://bucket/prefix, got {location!r}")
        try:
            import boto3
        except ImportError:
            raise SpecError(f"{ENV_VAR}={location}: an s3:// artifact store needs boto3 "
                            "(pip install 'hpsearch[s3]')") from None

        store = Boto3ArtifactStore(bucket, client=boto3.client("s3"))
        return _PrefixedStore(store, prefix) if prefix.strip("/") else store
    if "://" in location:
        raise SpecError(f"{ENV_VAR}: expected a directory, s3://bucket/prefix or off, "
                        f"got {redact(location)!r}")
    try:
        Path(location).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the artifact directory {location}: {e}") from e
    return FileSystemArtifactStore(location)

def storage_url_of(storage: Any) -> str | None:
    """The URL of an RDB storage, looking through Optuna's cache wrapper (None for gRPC)."""
    url = getattr(_compat.backend_of(storage), "url", None)
    return url if isinstance(url, str) else None

def store_files(trial: optuna.Trial, store: Any, files: dict[str, bytes]) -> dict[str, str]:
    """Write files into the artifact store for a running trial; the links still to be written.

    Optuna's `upload_artifact` links each file with its own transaction (find the trial, check
    it, upsert, commit: a WAL flush each on PostgreSQL). On an RDB storage the bytes are written
    here and the links returned, to be written with the trial's result in one transaction
    (`set_user_attrs(..., system_attrs=links)`), in the exact form `upload_artifact` writes (a
    trial system attribute `artifacts:<id>` holding the JSON of its ArtifactMeta), so
    `get_all_artifact_meta` and optuna-dashboard read them as their own. Any other storage, or
    an Optuna whose internals moved, takes the public path and gets no links back.
    """
    if _compat.rdb_backend(trial.storage) is None:
        _upload(trial, store, files)
        return {}
    links = {}
    for name, data in files.items():
        artifact_id = str(uuid.uuid4())
        mimetype, encoding = mimetypes.guess_type(name)
        meta = _compat.ArtifactMeta(artifact_id=artifact_id, filename=name,
                                    mimetype=mimetype or _compat.DEFAULT_MIME_TYPE,
                                    encoding=encoding)
        store.write(artifact_id, io.BytesIO(data))  # the bytes first: a link never dangles
        # Stored as Optuna stores it: the attribute's value is the meta's JSON string.
        links[_compat.ARTIFACTS_ATTR_PREFIX + artifact_id] = json.dumps(asdict(meta))
    return links

def _upload(trial: optuna.Trial, store: Any, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="hpsearch-artifacts-") as tmp:
        for name, data in files.items():
            path = Path(tmp) / name
            path.write_bytes(data)
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
