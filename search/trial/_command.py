"""`trainer: {command: [...]}`: a process per trial, its params substituted into its
arguments and environment, its ``@hpsearch`` report lines fed to the trial's `Trial.report`.

A command's ``{placeholders}`` name the trial's params and these fields, each also in its
environment (`_api.ENV`; every param is in ``HPSEARCH_PARAMS`` as JSON):

    {trial_number}    HPSEARCH_TRIAL_NUMBER
    {study_name}      HPSEARCH_STUDY
    {checkpoint_dir}  HPSEARCH_CHECKPOINT_DIR
    {epochs}          HPSEARCH_EPOCHS
    {device}          HPSEARCH_DEVICE        "cuda:0", "cpu"
    {nproc}           HPSEARCH_NPROC         processes a trial (``resources``; 1 by default)
    {gpus}            HPSEARCH_GPUS          the trial's GPU ids as CUDA_VISIBLE_DEVICES lists
                                             them ("2,3"); "" on the CPU
    {master_port}     HPSEARCH_MASTER_PORT   a loopback port free as the trial starts
                      HPSEARCH_FINAL, HPSEARCH_SEED (under `hpsearch retrain`)

so ``[torchrun, --nproc-per-node, "{nproc}", --master-port, "{master_port}", train.py]`` runs
as it does by hand. torchrun merges its ranks' output: `search.report` puts the rank in its line
and only rank 0's reports are the trial's. A command that fails before its first report saying
its port was in use is started again on another port (PORT_TRIES starts in all).

A command is stopped, SIGTERM then SIGKILL after `kill_grace_s`, when its trial is pruned or
times out, and dies with its worker. One process a trial: its process group is stopped, and
util-linux's setpriv gives it the parent-death signal. A trial of several processes (torchrun
gives each rank a session of its own, out of reach of its group) runs on Linux under a small
supervisor (`_supervise`, the worker's Python running this module): the subreaper of every
process the command starts, which ends them all when the command exits, when it is stopped
and when the worker dies. The tails of the command's output are the trial's artifact.
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
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from search._log import logger
from search._process import die_with_parent, free_port
from search.trial import _api
from search.trial._api import Trial

if TYPE_CHECKING:
    from search.spec import StudySpec

# A command's program named so runs as the worker's own Python (its virtualenv), whatever
# `python` is first on PATH.
LOG = logger("trial")
PYTHON_NAMES = ("python", "python3")
OUTPUT_TAIL_LINES = 200  # of a command's stdout and of its stderr, kept as the trial's artifact
PORT_TRIES = 3  # starts of a command whose port was taken, each on a new free port
# What torchrun (c10d's TCPStore) and most servers print when their port is taken.
PORT_CLASH = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)
# torch's gloo threads torn down with the interpreter (DDP keeps the group alive past
# destroy_process_group): the script trained, then aborted as it exited.
EXIT_ABORT = re.compile(r"terminate called without an active exception")
# Launch variables of a process group the worker may sit in: a command starts its own.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT")
# A trial of several processes runs under the supervisor where it can (its Python start costs
# ~50 ms a trial, a third more than a small command's whole overhead: not for one process).
CAN_SUPERVISE = sys.platform == "linux" and os.path.isdir("/proc")
KILL_WAIT_S = 5.0  # after SIGKILL, for the processes to go
_ROOT = str(Path(__file__).resolve().parents[2])  # where `search` is imported from
# The worker's Python, deaf to the command's PYTHON* settings (-I) and without site (-S): the
# supervisor needs the standard library and this module alone.
_SUPERVISOR = [sys.executable, "-I", "-S", "-c",
               f"import sys; sys.path.insert(0, {_ROOT!r}); "
               "from search.trial._command import _supervise; _supervise()"]


class TrialFailed(Exception):
    """A user's trial ended without a usable result; the message is the trial's reason."""

    def __init__(self, reason: str, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.attrs = attrs or {}


def trial_gpus(device: str) -> str:
    """The GPU ids of a trial on `device`, as CUDA_VISIBLE_DEVICES lists them ("" on the CPU):
    the worker's CUDA_VISIBLE_DEVICES (a trial of N GPUs is pinned to its N), else the
    device's index."""
    if not device.startswith("cuda"):
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible if visible else (device.partition(":")[2] or "0")


def command_fields(spec: StudySpec, user: Trial, *, master_port: int | None = None
                   ) -> dict[str, Any]:
    """What a command's `{placeholders}` may name: the params and the trial's own fields
    (`master_port`: a free port when not given)."""
    return {**user.params, "trial_number": user.number, "study_name": user.study_name,
            "checkpoint_dir": str(user.checkpoint_dir or ""), "epochs": user.epochs,
            "device": user.device, "nproc": spec.resources.width,
            "gpus": trial_gpus(user.device),
            "master_port": free_port() if master_port is None else master_port}


def command_argv(spec: StudySpec, user: Trial, *, master_port: int | None = None) -> list[str]:
    assert spec.trainer is not None and spec.trainer.command is not None
    fields = command_fields(spec, user, master_port=master_port)

    def text(value: Any) -> str:
        return json.dumps(value) if isinstance(value, (bool, list, dict)) or value is None \
            else str(value)

    argv = [_PLACEHOLDER_RE.sub(lambda m: text(fields[m.group(1)]), str(part))
            for part in spec.trainer.command]
    if argv[0] in PYTHON_NAMES:
        argv[0] = sys.executable  # the worker's own interpreter: `import search` works there
    return argv


_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def command_env(spec: StudySpec, user: Trial, *, master_port: int | None = None
                ) -> dict[str, str]:
    assert spec.trainer is not None
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({**spec.trainer.env, "PYTHONUNBUFFERED": "1",
                _api.PARAMS_ENV: json.dumps(user.params)})
    named = command_fields(spec, user, master_port=master_port)
    fields = {k: named[k] for k in ("trial_number", "study_name", "checkpoint_dir", "device",
                                    "epochs", "nproc", "gpus", "master_port")}
    fields.update(final="1" if user.final else "0", seed="" if user.seed is None else user.seed)
    env.update({_api.ENV[k]: str(v) for k, v in fields.items()})
    if user.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU trial's script sees no GPU
    if user.threads:  # per rank in a trial of several processes
        env.setdefault("OMP_NUM_THREADS", str(user.threads))
    return env


def run_command(spec: StudySpec, user: Trial, output: dict[str, str]) -> None:
    """Run the trial's command to its end, feeding rank 0's report lines to `user.report`.

    `output` gets the tails of its stdout and stderr. Pruned (every process of the command is
    stopped: SIGTERM, then SIGKILL after `kill_grace_s`) raises Pruned; a timeout or a
    non-zero exit raises TrialFailed. A port clash before the first report starts it again.
    """
    assert spec.trainer is not None
    if user.checkpoint_dir is not None:
        user.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_TRIES + 1):
        port = free_port()
        try:
            _run(spec, user, output, port, retry_on_clash=attempt < PORT_TRIES)
            return
        except _PortClash:
            LOG.info(f"trial #{user.number}: port {port} was in use as its command started; "
                     "starting it again on another port")


class _PortClash(Exception):
    pass


class _TimedOut(Exception):
    pass


def _run(spec: StudySpec, user: Trial, output: dict[str, str], port: int, *,
         retry_on_clash: bool) -> None:
    """One start of the trial's command on `port`; _PortClash when `retry_on_clash` and it
    failed, before any report, saying that its port was in use."""
    trainer = spec.trainer
    assert trainer is not None
    command = _Command(command_argv(spec, user, master_port=port),
                       command_env(spec, user, master_port=port), trainer.kill_grace_s,
                       supervised=CAN_SUPERVISE and spec.resources.width > 1)
    deadline = (time.monotonic() + trainer.trial_timeout_s if trainer.trial_timeout_s
                else math.inf)
    reported = False
    try:
        for name, line in command.output(deadline):
            if name != "stdout":
                continue
            try:
                parsed = _api.parse_line(line)  # None for other ranks' reports
                if parsed is not None:
                    reported = True
                    user.report(parsed[0], **parsed[1])  # Pruned: the command is stopped
            except ValueError as e:
                raise TrialFailed(f"error: {e}", {"output_tail": command.tail()}) from None
        code = command.process.wait()
    except _TimedOut:
        raise TrialFailed(f"timed out after {trainer.trial_timeout_s:g} s "
                          "(trainer.trial_timeout_s)", {"output_tail": command.tail()}) from None
    finally:
        command.close(output)  # pruned, interrupted or failed: no orphan keeps training
    if code == 0:
        return
    if retry_on_clash and not reported and command.says(PORT_CLASH):
        raise _PortClash
    last = next((line for line in reversed(command.tails["stderr"]) if line.strip()), "")
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if reported and command.says(EXIT_ABORT):
        last = ("a rank aborted as Python exited (torch's gloo threads, pytorch#190489): end "
                "the script with os._exit(0) after destroy_process_group(); see "
                "docs/own-training.md")
    raise TrialFailed(f"command failed ({how}){': ' + last if last else ''}"[:500],
                      {"output_tail": command.tail()})


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform == "linux" else None


def _die_with_worker() -> None:
    """Runs in the command's process before exec: SIGKILL it when its worker dies (Linux), so
    a killed worker leaves no script training on, holding the GPU its retry needs."""
    die_with_parent(signal.SIGKILL)


class _Command:
    """One start of a command: its process (`supervised`: under the supervisor), its output
    read line by line and the tails of it kept, stopped as a whole."""

    def __init__(self, argv: list[str], env: dict[str, str], grace_s: float, *,
                 supervised: bool) -> None:
        self.grace_s = grace_s
        self.supervised = supervised
        if shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
            raise TrialFailed(f"cannot start {argv[0]}: no such program (or not executable)")
        preexec = None
        if supervised:
            launch = [*_SUPERVISOR, str(os.getpid()), f"{grace_s:g}", *argv]
        elif setpriv := _setpriv():
            # util-linux's setpriv sets the parent-death signal and execs the command, where a
            # preexec_fn would make Python fork the whole worker, torch loaded, every trial
            # instead of vfork it.
            launch = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        else:
            launch, preexec = argv, _die_with_worker
        try:
            self.process = subprocess.Popen(
                launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, text=True, bufsize=1, env=env, start_new_session=True,
                preexec_fn=preexec)
        except OSError as e:
            raise TrialFailed(f"cannot start {launch[0]}: {e.strerror or e}") from None
        self._lines: queue.Queue = queue.Queue()
        self.tails = {"stdout": collections.deque(maxlen=OUTPUT_TAIL_LINES),
                      "stderr": collections.deque(maxlen=OUTPUT_TAIL_LINES)}
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                         for name in self.tails]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        for line in iter(getattr(self.process, name).readline, ""):
            self.tails[name].append(line.rstrip("\n"))
            self._lines.put((name, line))
        self._lines.put((name, None))

    def output(self, deadline: float) -> Iterator[tuple[str, str]]:
        """(stream, line) as the command prints them until it has closed both streams;
        _TimedOut once `deadline` (time.monotonic) has passed."""
        open_streams = len(self.tails)
        while open_streams:
            try:
                name, line = self._lines.get(
                    timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise _TimedOut from None
                continue
            if line is None:
                open_streams -= 1
            else:
                yield name, line

    def says(self, pattern: re.Pattern) -> bool:
        return any(pattern.search(line) for tail in self.tails.values() for line in tail)

    def tail(self, chars: int = 4000) -> str:
        text = "\n".join(f"[{name}] {line}" for name, tail in self.tails.items()
                         for line in tail)
        return text[-chars:]

    def stop(self) -> None:
        """SIGTERM to every process of the command (the supervisor passes it on), SIGKILL to
        its process group if it is still there when its grace period is over."""
        first = os.kill if self.supervised else os.killpg
        # under the supervisor: its grace, its SIGKILL, and a second to exit
        grace = self.grace_s + (KILL_WAIT_S + 1.0 if self.supervised else 0.0)
        for send, sig, wait in ((first, signal.SIGTERM, grace),
                                (os.killpg, signal.SIGKILL, KILL_WAIT_S)):
            if self.process.poll() is not None:
                return
            try:
                send(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self, output: dict[str, str]) -> None:
        self.stop()
        for reader in self._readers:
            reader.join(timeout=1)
        output.update({name: "\n".join(tail) for name, tail in self.tails.items()})


# ------------------------------------------------------------------- the supervisor (Linux)

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_STOPS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _supervise() -> NoReturn:
    """``python -c`` entry: ``WORKER_PID GRACE_S ARGV...``. Runs ARGV as its child, then ends
    every process left below it (SIGTERM, SIGKILL after GRACE_S) and exits as the child did.
    A stop signal, or its worker's death, ends them all at once."""
    worker, grace_s, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans below it become its children
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, {*_STOPS, signal.SIGCHLD})  # read by sigwait
    status: int | None = None
    if os.getppid() == worker:  # else its worker died before the parent-death signal was set
        try:
            child = os.posix_spawnp(argv[0], argv, os.environ, setsigmask=(),
                                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError as e:
            print(f"cannot start {argv[0]}: {e.strerror or e}", file=sys.stderr, flush=True)
            os._exit(127)
        status = _wait_child(child, worker)
    _end_tree(grace_s)
    _exit_as(status)


def _wait_child(child: int, worker: int) -> int | None:
    """The child's wait status once it exited; None when a stop signal came first or the
    worker is gone."""
    while True:
        info = signal.sigtimedwait({*_STOPS, signal.SIGCHLD}, 1.0)
        if (info is not None and info.si_signo in _STOPS) or os.getppid() != worker:
            return None
        for pid, status in _reaped():
            if pid == child:
                return status


def _reaped() -> Iterator[tuple[int, int]]:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _descendants(root: int) -> set[int]:
    """Every living process below `root`, by /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(b")") + 2:].split(maxsplit=2)[:2]
        if state != b"Z":
            children.setdefault(int(ppid), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.add(pid)
            todo.append(pid)
    return found


def _end_tree(grace_s: float) -> None:
    """SIGTERM to every process below this one (each once, late comers too), SIGKILL to
    those left after `grace_s`; returns when none is left, or KILL_WAIT_S after that."""
    start = time.monotonic()
    termed: set[int] = set()
    while True:
        for _ in _reaped():
            pass
        alive = _descendants(os.getpid())
        waited = time.monotonic() - start
        if not alive or waited > grace_s + KILL_WAIT_S:
            return
        killing = waited > grace_s
        for pid in alive if killing else alive - termed:
            try:
                os.kill(pid, signal.SIGKILL if killing else signal.SIGTERM)
            except ProcessLookupError:
                pass
        termed |= alive
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)  # a child's exit, or 50 ms


def _exit_as(status: int | None) -> NoReturn:
    """Exit with the child's code, or die of its signal (SIGTERM when it was stopped)."""
    if status is not None and os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status) if status is not None else signal.SIGTERM
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the child's core, if any, is enough
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
