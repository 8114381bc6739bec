"""`trainer: {command: [...]}`: a process per trial, its params substituted into its
arguments and environment, its ``@hpsearch`` report lines fed to the trial's `Trial.report`.

The command dies with its worker, is stopped (SIGTERM, then SIGKILL) when its trial is pruned or
times out, and leaves the tails of its output as the trial's artifact.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from search.trial import _api
from search.trial._api import Pruned, Trial

if TYPE_CHECKING:
    from search.spec import StudySpec

# A command's program named so runs as the worker's own Python (its virtualenv), whatever
# `python` is first on PATH.
PYTHON_NAMES = ("python", "python3")
OUTPUT_TAIL_LINES = 200  # of a command's stdout and of its stderr, kept as the trial's artifact


class TrialFailed(Exception):
    """A user's trial ended without a usable result; the message is the trial's reason."""

    def __init__(self, reason: str, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.attrs = attrs or {}



def command_fields(spec: StudySpec, user: Trial) -> dict[str, Any]:
    """What a command's `{placeholders}` may name: the params and the trial's own fields."""
    return {**user.params, "trial_number": user.number, "study_name": user.study_name,
            "checkpoint_dir": str(user.checkpoint_dir or ""), "epochs": user.epochs,
            "device": user.device}


def command_argv(spec: StudySpec, user: Trial) -> list[str]:
    assert spec.trainer is not None and spec.trainer.command is not None
    fields = command_fields(spec, user)

    def text(value: Any) -> str:
        return json.dumps(value) if isinstance(value, (bool, list, dict)) or value is None \
            else str(value)

    argv = [_PLACEHOLDER_RE.sub(lambda m: text(fields[m.group(1)]), str(part))
            for part in spec.trainer.command]
    if argv[0] in PYTHON_NAMES:
        argv[0] = sys.executable  # the worker's own interpreter: `import search` works there
    return argv


_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def command_env(spec: StudySpec, user: Trial) -> dict[str, str]:
    assert spec.trainer is not None
    env = {**os.environ, **spec.trainer.env, "PYTHONUNBUFFERED": "1",
           _api.PARAMS_ENV: json.dumps(user.params)}
    fields = {"trial_number": user.number, "study_name": user.study_name,
              "checkpoint_dir": str(user.checkpoint_dir or ""), "device": user.device,
              "epochs": user.epochs, "final": "1" if user.final else "0",
              "seed": "" if user.seed is None else user.seed}
    env.update({_api.ENV[k]: str(v) for k, v in fields.items()})
    if user.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU trial's script sees no GPU
    if user.threads:
        env.setdefault("OMP_NUM_THREADS", str(user.threads))
    return env


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform == "linux" else None


def _die_with_worker() -> None:
    """Runs in the command's process before exec: SIGKILL it when its worker dies (Linux), so
    a killed worker leaves no script training on, holding the GPU its retry needs."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _lines(stream: Any, into: queue.Queue, tail: collections.deque, name: str) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line.rstrip("\n"))
        into.put((name, line))
    into.put((name, None))


def _stop(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the command's process group, SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(spec: StudySpec, user: Trial, output: dict[str, str]) -> None:
    """Run the trial's command to its end, feeding its report lines to `user.report`.

    `output` gets the tails of its stdout and stderr. Pruned (SIGTERM, then SIGKILL after
    `kill_grace_s`) raises Pruned; a timeout or a non-zero exit raises TrialFailed.
    """
    assert spec.trainer is not None
    trainer = spec.trainer
    argv = command_argv(spec, user)
    if user.checkpoint_dir is not None:
        user.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # The command dies with its worker: util-linux's setpriv sets the parent-death signal and
    # execs it, where a preexec_fn would make Python fork the whole worker, torch loaded,
    # every trial instead of vfork.
    setpriv = _setpriv()
    launch = [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv
    try:
        process = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                   env=command_env(spec, user), start_new_session=True,
                                   preexec_fn=None if setpriv else _die_with_worker)
    except OSError as e:
        raise TrialFailed(f"cannot start {argv[0]}: {e.strerror or e}") from None
    lines: queue.Queue = queue.Queue()
    tails = {"stdout": collections.deque(maxlen=OUTPUT_TAIL_LINES),
             "stderr": collections.deque(maxlen=OUTPUT_TAIL_LINES)}
    readers = [threading.Thread(target=_lines, args=(getattr(process, name), lines, tails[name],
                                                     name), daemon=True) for name in tails]
    for reader in readers:
        reader.start()
    deadline = (time.monotonic() + trainer.trial_timeout_s if trainer.trial_timeout_s
                else math.inf)
    open_streams = 2
    try:
        while open_streams:
            try:
                name, line = lines.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    _stop(process, trainer.kill_grace_s)
                    raise TrialFailed(f"timed out after {trainer.trial_timeout_s:g} s "
                                      "(trainer.trial_timeout_s)",
                                      {"output_tail": _tail(tails)}) from None
                continue
            if line is None:
                open_streams -= 1
                continue
            if name != "stdout":
                continue
            try:
                parsed = _api.parse_line(line)
                if parsed is not None:
                    user.report(parsed[0], **parsed[1])
            except Pruned:
                _stop(process, trainer.kill_grace_s)
                raise
            except ValueError as e:
                _stop(process, trainer.kill_grace_s)
                raise TrialFailed(f"error: {e}", {"output_tail": _tail(tails)}) from None
        code = process.wait()
    finally:
        _stop(process, trainer.kill_grace_s)  # interrupted or failed: no orphan keeps training
        for reader in readers:
            reader.join(timeout=1)
        output.update({name: "\n".join(tail) for name, tail in tails.items()})
    if code != 0:
        last = next((line for line in reversed(tails["stderr"]) if line.strip()), "")
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise TrialFailed(f"command failed ({how}){': ' + last if last else ''}"[:500],
                          {"output_tail": _tail(tails)})


def _tail(tails: dict[str, collections.deque], chars: int = 4000) -> str:
    text = "\n".join(f"[{name}] {line}" for name, tail in tails.items() for line in tail)
    return text[-chars:]
