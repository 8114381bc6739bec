"""What every process hpsearch starts shares: dying with the process that started it, and a
free loopback port for a process group to meet on."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have Linux send this process `signum` when its parent dies (PR_SET_PDEATHSIG), so no
    child of a dead worker trains on; a no-op elsewhere. Call it in the child (a preexec_fn,
    or first thing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def free_port() -> int:
    """A loopback port free now (another process may take it before a trial's rank 0, or a
    command's torchrun, binds it: a clash is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
