"""Per-run checkpoints: one file, replaced atomically after each epoch, loaded weights-only."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointStore:
    """A directory holding the latest epoch checkpoint of one run.

    Writes go to a temporary file that is renamed over the old one, so a worker killed mid-write
    leaves the previous checkpoint intact. Loading uses ``weights_only=True``: a checkpoint holds
    tensors, numbers, strings and containers of those, never pickled code.
    """

    FILENAME = "checkpoint.pt"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @property
    def path(self) -> Path:
        return self.directory / self.FILENAME

    def save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save_or_warn(self, state: dict[str, Any]) -> bool:
        """`save`, or one warning line on stderr where it cannot write (a full disk, a lost
        mount): a run must not fail for its checkpoint. Whether it was saved."""
        try:
            self.save(state)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            try:
                free = f"{shutil.disk_usage(self.directory).free:,} bytes free"
            except OSError:
                free = "free space unknown"
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"warning: checkpoint not written to {self.directory} ({reason}; {free}): "
                  "the run goes on without checkpoints", file=sys.stderr, flush=True)
            return False
        return True

    def load(self) -> dict[str, Any] | None:
        """The latest checkpoint, or None when there is none yet."""
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def clear(self) -> None:
        """Delete the checkpoint directory (a finished run needs it no more)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r})"
