"""A study's own training code in place of the built-in trainer.

`trainer: pkg.module:fit` runs ``fit(params, trial) -> float | dict | None`` in the worker;
`trainer: {command: [...]}` runs a process per trial that reports by printing lines
(`search._reporting`). Either way the trial's reports go through `Trial.report`: stored as the
trial's history, given to the pruner, and turned into `Pruned` when the trial should stop.
Checkpoints live in the trial's folder, which a dead trial's retry inherits, so the user's loop
resumes where it died.
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
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

import trainers
from search import _reporting
from search.run._objective import (
    Objective,
    StopRequested,
    TakenOver,
    TrialOutcome,
    placement_attrs,
    report_or_taken_over,
)
from search.spec import check_trainer, suggest
from search.storage import INTERRUPTED, with_retry

if TYPE_CHECKING:
    from collections.abc import Callable

    from search.spec import StudySpec

# A command's program named so runs as the worker's own Python (its virtualenv), whatever
# `python` is first on PATH.
PYTHON_NAMES = ("python", "python3")
OUTPUT_TAIL_LINES = 200  # of a command's stdout and of its stderr, kept as the trial's artifact
HISTORY_FILE = "hpsearch-history.json"  # beside the user's checkpoint: what was reported
STATE_FILE = "state.pt"


class Pruned(Exception):  # noqa: N818 - a signal, as optuna.TrialPruned
    """Raised by `Trial.report` when the trial should stop (the pruner said so, or a reported
    objective value is NaN or infinite). Let it propagate out of your function."""


@dataclass(frozen=True)
class Reported:
    """One `report` as the progress display sees it."""

    epoch: int
    metrics: dict[str, float]


class Trial:
    """What your training function gets besides its params: where to run, how to report and
    checkpoint. Optuna-free: hpsearch's pruning, storage and retries stay behind it.

    Attributes: `number`, `study_name`, `params` (a copy), `device` ("cuda:0", "cpu"),
    `threads` (CPU threads this worker may use, or None), `epochs` (budget.epochs, the most
    a trial trains), `final` (True under `hpsearch retrain`: train on everything you tune on
    and return the test metrics), `seed` (the retrain seed, else None), `checkpoint_dir`.
    """

    def __init__(self, *, number: int, study_name: str, params: dict[str, Any],
                 device: str = "cpu", threads: int | None = None, epochs: int = 1,
                 checkpoint_dir: Path | None = None, final: bool = False,
                 seed: int | None = None,
                 on_report: Callable[[int, dict[str, float]], str | None] | None = None,
                 stop: Callable[[], bool] | None = None,
                 ) -> None:
        self.number = number
        self.study_name = study_name
        self.params = dict(params)
        self.device = device
        self.threads = threads
        self.epochs = epochs
        self.final = final
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self._on_report = on_report
        self._stop = stop or (lambda: False)
        self._checkpointed = False  # save_checkpoint was called in this run
        self._history: list[dict[str, float]] = []
        self._resumed = False
        # The epoch the loop resumed after (its first report's epoch - 1) on a dead trial's
        # retry; 0 when it started from scratch.
        self.resumed_from_epoch = 0
        self.stopped: str | None = None  # why report raised Pruned, once it has
        self._warned = False
        if checkpoint_dir is not None and (checkpoint_dir / HISTORY_FILE).is_file():
            try:
                self._history = json.loads((checkpoint_dir / HISTORY_FILE).read_text())
                self._resumed = bool(self._history)
            except (OSError, ValueError):
                self._history = []

    @property
    def history(self) -> list[dict[str, float]]:
        """Every report so far, as ``{"epoch": …, metric: value, …}`` (a retry's includes the
        dead trial's reports up to its checkpoint)."""
        return [dict(r) for r in self._history]

    @property
    def last_epoch(self) -> int | None:
        return int(self._history[-1]["epoch"]) if self._history else None

    def report(self, epoch: int, **metrics: float) -> None:
        """Report an epoch's metrics (numbers). Raises `Pruned` when the trial should stop;
        ValueError when the epoch does not follow the last one or a value is not a number."""
        last = self.last_epoch
        if self._resumed:
            # The first report after a resume may repeat epochs the dead trial reported (its
            # checkpoint was older, or there was none): those reports are replaced.
            self._resumed = False
            self._history = [r for r in self._history if r["epoch"] < epoch]
            self.resumed_from_epoch = max(0, epoch - 1) if self._history else 0
            last = self.last_epoch
        values = _reporting.check_report(epoch, metrics, last)
        self._history.append({"epoch": epoch, **values})
        self._save_history()
        if self._on_report is not None:
            verdict = self._on_report(epoch, values)
            if verdict:
                self.stopped = verdict
                raise Pruned(verdict)
        if not self._checkpointed and self._stop():  # code that never checkpoints stops here
            raise StopRequested(f"stopped at epoch {epoch} on request")

    def save_checkpoint(self, state: Any) -> None:
        """Save `state` (anything `torch.save` takes) as this trial's checkpoint: a retry of
        this trial after its worker died gets it back from `load_checkpoint`. A full disk is a
        warning, not a failure: the trial goes on without a checkpoint."""
        if self.checkpoint_dir is None:
            return
        import torch

        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".{STATE_FILE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_dir / STATE_FILE)
            self._save_history(force=True)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            self._warn(f"checkpoint not saved ({getattr(e, 'strerror', None) or e}): the trial "
                       "goes on without it")
            return
        self._checkpointed = True
        if self._stop():  # `hpsearch stop`: right after a checkpoint, so nothing is lost
            raise StopRequested("stopped on request after a checkpoint")

    def load_checkpoint(self) -> Any | None:
        """The last state `save_checkpoint` saved for this trial (or for the dead trial this
        one retries), else None."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / STATE_FILE).is_file():
            return None
        import torch

        # Written by this study's own workers into its checkpoint folder (see the trust
        # model in docs/operations.md); the user's state may hold any Python object.
        return torch.load(self.checkpoint_dir / STATE_FILE, map_location="cpu",
                          weights_only=False)

    def _save_history(self, *, force: bool = False) -> None:
        directory = self.checkpoint_dir
        if directory is None or not (force or directory.exists()):
            return
        try:
            tmp = directory / f".{HISTORY_FILE}.tmp"
            tmp.write_text(json.dumps(self._history))
            os.replace(tmp, directory / HISTORY_FILE)
        except OSError as e:
            self._warn(f"history not saved beside the checkpoint ({e.strerror or e})")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: trial #{self.number}: {message}", flush=True)


class TrialFailed(Exception):
    """A user's trial ended without a usable result; the message is the trial's reason."""

    def __init__(self, reason: str, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.attrs = attrs or {}


def fixed_params(spec: StudySpec) -> dict[str, Any]:
    """The `fixed:` settings as the user wrote them (a user trainer's params start there)."""
    return dict(spec.fixed)


class UserObjective(Objective):
    """The objective of a study with `trainer:`: runs the user's function or command."""

    def __init__(self, spec: StudySpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        assert spec.trainer is not None
        self.trainer = spec.trainer
        check_trainer(spec, source=f"study {spec.name!r}")  # on this machine, before a trial
        self.function = (trainers.load_plugin(self.trainer.function, "hpsearch.trainers",
                                              "trainer")
                         if self.trainer.function else None)

    def creation_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"host": self.host, "pid": os.getpid(), **placement_attrs()}
        try:
            attrs["device"] = self._device()
        except Exception:  # noqa: BLE001 - the trial reports it
            pass
        return attrs

    def _device(self) -> str:
        return str(trainers.resolve_device(self.device or "auto"))

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        start_attrs: dict[str, Any] = {}
        sampled = suggest(trial, self.spec, user_attrs=start_attrs)
        params = {**fixed_params(self.spec), **sampled}
        started = time.perf_counter()
        self.last = None
        self.current = trial.number
        single = len(self.metrics) == 1
        metric = self.metrics[0]

        def on_report(epoch: int, values: dict[str, float]) -> str | None:
            if self.on_epoch is not None:
                self.on_epoch(trial.number, Reported(epoch, values))  # type: ignore[arg-type]
            if metric not in values:
                return None
            value = values[metric]
            if not math.isfinite(value):
                return f"diverged: {metric} is {value} at epoch {epoch}"
            if single:
                report_or_taken_over(trial, value, epoch)
                if with_retry(trial.should_prune, what="asking the pruner"):
                    return f"pruned at epoch {epoch}"
            return None

        user: Trial | None = None
        try:
            device = self._device()
            start_attrs.update(host=self.host, pid=os.getpid(), device=device)
            retried_from = self.begin(trial, start_attrs)
            directory = self.checkpoint_directory(trial.number, retried_from)
            user = Trial(number=trial.number, study_name=self.spec.name, params=params,
                         device=device, threads=self.threads, epochs=self.spec.budget.epochs,
                         checkpoint_dir=directory, on_report=on_report, stop=self.stop)
            output: dict[str, str] = {}
            try:
                if self.function is not None:
                    returned = self.function(dict(params), user)
                else:
                    returned = run_command(self.spec, user, output)
            except Pruned:
                returned = None
            values, stopped = self._values(user, returned)
        except TakenOver:
            raise  # not this worker's trial any more: nothing of it to record
        except TrialFailed as e:
            extra = {**e.attrs, "history": user.history if user else []}
            self.record_failure(trial, str(e), start_attrs, params, started, extra)
            raise
        except Exception as e:
            lines = traceback.format_exception(e)
            extra = {"traceback": "".join(lines)[-8000:],
                     "history": user.history if user else []}
            # The traceback's last line, as Python prints it: the type and the message's
            # first line (the rest is in the traceback attr).
            message = next((line for line in str(e).splitlines() if line.strip()), "")
            reason = f"{type(e).__name__}: {message}" if message else type(e).__name__
            self.record_failure(trial, f"error: {reason}", start_attrs, params, started, extra)
            raise
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or `hpsearch stop`: queued again to resume
            self.record_failure(trial, INTERRUPTED, start_attrs, params, started,
                                {"history": user.history if user else []})
            raise

        seconds = round(time.perf_counter() - started, 3)
        history = user.history
        ended = stopped or "completed"
        end_attrs: dict[str, Any] = {"history": history, "epochs_run": len(history),
                                     "seconds": seconds, "ended": ended}
        if retried_from is not None:
            end_attrs["resumed_from_epoch"] = user.resumed_from_epoch
        links: dict[str, str] = {}
        if self.artifacts is not None:
            written = self.artifacts.write_user(trial, ended, history, params, output,
                                                self.spec.budget.epochs)
            if written is not None:
                end_attrs["artifact_seconds"] = round(written.seconds, 3)
                links = written.links
        self.record_result(trial, end_attrs, links)
        self.clear_later(directory, retried_from)
        last = next((r[metric] for r in reversed(history) if metric in r), None)
        self.last = TrialOutcome(trial.number, "COMPLETE" if values else "PRUNED", values,
                                 last, params, len(history), seconds, ended)
        if values is None:
            raise optuna.TrialPruned(ended)
        return values[0] if single else values

    def _values(self, user: Trial, returned: Any) -> tuple[list[float] | None, str | None]:
        """The objective values (None when stopped) and why the trial stopped."""
        if user.stopped:
            return None, user.stopped
        metrics = self.metrics
        given: dict[str, Any] = {}
        if isinstance(returned, dict):
            given = returned
        elif returned is not None:
            if len(metrics) > 1:
                raise TrialFailed(f"returned {returned!r}; with several objectives return a "
                                  f"mapping of {', '.join(metrics)}")
            given = {metrics[0]: returned}
        values = []
        for metric in metrics:
            if metric in given:
                number = _reporting.check_report(0, {metric: given[metric]}, None)[metric]
            else:
                number = next((r[metric] for r in reversed(user.history) if metric in r), None)
            if number is None:
                raise TrialFailed(f"never reported the objective metric {metric!r} (reported: "
                                  f"{', '.join(_reported(user.history)) or 'nothing'})")
            if not math.isfinite(number):
                return None, f"diverged: {metric} is {number}"
            values.append(number)
        return values, None


def _reported(history: list[dict[str, float]]) -> list[str]:
    return sorted({k for r in history for k in r if k != "epoch"})


# --------------------------------------------------------------------------- commands


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
           _reporting.PARAMS_ENV: json.dumps(user.params)}
    fields = {"trial_number": user.number, "study_name": user.study_name,
              "checkpoint_dir": str(user.checkpoint_dir or ""), "device": user.device,
              "epochs": user.epochs, "final": "1" if user.final else "0",
              "seed": "" if user.seed is None else user.seed}
    env.update({_reporting.ENV[k]: str(v) for k, v in fields.items()})
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
    # execs it, where a preexec_fn would make Python fork the whole worker (~13 ms a trial
    # with torch loaded) instead of vfork.
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
                parsed = _reporting.parse_line(line)
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
