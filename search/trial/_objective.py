"""The built-in trial: a trial's sampled params → a trainer config → `trainers.train` → how it
ended (`Ended`), for the runner to tell.

Optuna stays on this side: the trainer reports through `on_epoch`, and this module turns the
pruner's verdict (and `hpsearch stop`) into `StopTraining` inside the trainer, the way the
Lightning pruning callback keeps Optuna out of training code. Its halves (`prepare`, `start`,
`finish`) are shared with the packed trials (`search.trial._packing`). A trial of several
processes (``resources``) trains in its ranks (`search.trial._ranks`), its reports served here.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
import torch

import trainers
from search._errors import SpecError
from search._log import logger
from search.spec import base_train_config, constraint_values, suggest, train_config_for
from search.storage import (
    INTERRUPTED,
    constraint_attrs,
    is_remote,
    retries_of,
    set_user_attrs,
    trial_id_of,
    with_result,
    with_retry,
    written_attrs,
)
from search.storage import retried_from as retry_link
from search.trial._gpu import oom_from_sharing
from search.trial._history import history_record
from search.trial._outcome import End, Ended, TrialOutcome, log_failure
from search.trial._ranks import (
    Placement,
    RankFailed,
    RankLost,
    TrainJob,
    Verdict,
    run_ranks,
    train_rank,
)
from search.trial._remote_checkpoints import RemoteCheckpoints, SyncedCheckpointStore, scratch_root

if TYPE_CHECKING:
    import optuna

    import trainers
    from search.spec import StudySpec
    from search.trial._artifacts import ArtifactRecorder

T = TypeVar("T")
LOG = logger("trial")
MAX_RANK_RETRIES = 3  # a trial that loses a rank this many retries in a row fails


# Set by the Ray launcher (`search.workers._ray`) in its workers' environment: recorded per trial.
RAY_ATTRS = {"ray_node": "HPSEARCH_RAY_NODE", "ray_gpu": "HPSEARCH_RAY_GPU"}


def placement_attrs() -> dict[str, str]:
    """Where a cluster engine placed this worker (Ray's node and GPU), for every trial."""
    return {attr: os.environ[env] for attr, env in RAY_ATTRS.items() if os.environ.get(env)}


class TakenOver(Exception):  # noqa: N818 - a state of the trial, not a fault
    """Raised out of the trainer when the trial was finished by others while its worker was
    paused (failed as stale and retried): its run ends `End.TAKEN_OVER`, and is dropped."""


def report_or_taken_over(trial: optuna.Trial, value: float, epoch: int) -> None:
    """`trial.report`, riding out a storage restart; TakenOver when the trial is no longer
    this worker's."""
    try:
        with_retry(lambda: trial.report(value, epoch), what="reporting")
    except optuna.exceptions.UpdateFinishedTrialError as e:
        raise TakenOver(f"trial #{trial.number} was finished by another worker") from e


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error: a trial too big, not a bug."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def metric_value(metric: str, history: list[trainers.EpochMetrics]) -> float:
    """An objective metric of a run: the last epoch's value, or the mean of epoch_seconds."""
    if metric == "epoch_seconds":
        return sum(m.epoch_seconds for m in history) / len(history)
    return float(getattr(history[-1], metric))

@dataclass
class TrialStart:
    """A trial between its two halves (`Objective.prepare`/`start` and `finish`): what the
    alone path and the packed one (`search.trial._packing`) share."""

    trial: optuna.Trial
    start_attrs: dict[str, Any]
    started: float  # perf_counter at the start
    params: dict[str, Any] = field(default_factory=dict)
    report: Callable[[trainers.EpochMetrics], None] | None = None
    config: trainers.TrainConfig | None = None
    device: str = ""
    retried_from: int | None = None
    store: trainers.CheckpointStore | None = None
    stop_requested: bool = False  # `hpsearch stop` ended its run at an epoch's end

    @property
    def directory(self) -> Path | None:
        return self.store.directory if self.store is not None else None

class Objective:
    """The built-in trainer's trials: `run` trains one asked trial and says how it ended."""

    def __init__(
        self,
        spec: StudySpec,
        *,
        device: str | None = None,
        threads: int | None = None,
        checkpoint_root: str | os.PathLike[str] | None = None,
        on_epoch: Callable[[int, trainers.EpochMetrics], None] | None = None,
        artifacts: ArtifactRecorder | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.stop = stop or (lambda: False)  # `hpsearch stop` was asked for
        self.device = device
        self.threads = threads
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        # s3://…: the trainer writes into a scratch folder, each save copied to the bucket
        # where a retry on any machine finds it.
        self.remote: RemoteCheckpoints | None = None
        if checkpoint_root is not None and is_remote(str(checkpoint_root)):
            if spec.trainer is not None:
                raise SpecError(f"run.checkpoint_dir: {checkpoint_root} holds the built-in "
                                "trainer's checkpoints; a study with its own trainer "
                                "checkpoints into a folder (a shared one for many machines)")
            self.remote = RemoteCheckpoints.open(str(checkpoint_root))
            self.checkpoint_root = scratch_root()
        self.on_epoch = on_epoch
        self.artifacts = artifacts
        self.metrics = spec.objective.metric_names
        self.host = socket.gethostname()
        # A worker placed by Ray: its node and the GPU Ray gave it (hosts may share a name).
        self.placed = placement_attrs()
        # A trial over GPUs of its own: cuda:0..N-1 of the worker's, named without touching
        # CUDA here (its ranks use them). A worker told to use the CPU (simulated GPUs in
        # tests) runs its ranks there.
        wide = spec.resources
        self.own_gpus = wide.gpus is not None and wide.width > 1 and device != "cpu"
        self.rank_gpus = (",".join(Placement.of(wide.width, "cuda", None, own_gpus=True).devices)
                          if self.own_gpus else None)

    def creation_attrs(self) -> dict[str, Any]:
        """The start attrs every trial of this worker shares (host, pid, and the device where
        the space does not choose it): written with the trial as it is created."""

        attrs: dict[str, Any] = {"host": self.host, "pid": os.getpid(), **self.placed}
        if self.rank_gpus is not None:
            attrs["device"] = self.rank_gpus
        elif "device" not in self.spec.space:
            try:
                device = self.device or base_train_config(self.spec).device
                attrs["device"] = str(trainers.resolve_device(device))
            except Exception:  # noqa: BLE001 - the trial reports it, with the trial's config
                pass
        return attrs

    def checkpoint_dir(self, number: int) -> Path | None:
        if self.checkpoint_root is None:
            return None
        return self.checkpoint_root / self.spec.name / f"trial-{number}"

    def run(self, trial: optuna.Trial) -> Ended:
        """Train `trial` (asked by the runner) and say how it ended."""
        begun = self.prepare(trial)
        result = self.guarded(begun, lambda: self.start(begun) or self._train(begun))
        if isinstance(result, Ended):
            return result
        return self.finish(begun, result)

    def guarded(self, begun: TrialStart, run: Callable[[], T]) -> T | Ended:
        """`run()` for trial `begun`, or how the trial ended when it raised: an error recorded
        as the trial's (`failed`), a trial taken over as it is (nothing of it to record). A
        Ctrl-C or SIGTERM is marked on the trial (`interrupted`) and raised on."""
        try:
            return run()
        except TakenOver:
            return Ended(End.TAKEN_OVER)
        except RankLost as e:
            return self.lost(begun, str(e))
        except Exception as e:  # noqa: BLE001 - the trial's own error, recorded as its reason
            return self.failed(begun, e)
        except KeyboardInterrupt:
            self.interrupted(begun)
            raise
        finally:
            if begun.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def prepare(self, trial: optuna.Trial) -> TrialStart:
        """A trial's first half that cannot fail on the trainer's side: its params (the
        sampler's suggestions) and its report callback (reports, the pruner, `hpsearch
        stop`)."""
        begun = TrialStart(trial, {}, time.perf_counter())
        begun.params = suggest(trial, self.spec, user_attrs=begun.start_attrs)
        single = len(self.metrics) == 1

        def report(m: trainers.EpochMetrics) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial.number, m)
            if single:
                value = getattr(m, self.metrics[0])
                if math.isfinite(value):
                    report_or_taken_over(trial, float(value), m.epoch)
                if with_retry(trial.should_prune, what="asking the pruner"):
                    raise trainers.StopTraining(f"pruned at epoch {m.epoch}")
            if self.stop():  # after the epoch's checkpoint: its retry resumes from here
                begun.stop_requested = True
                raise trainers.StopTraining(f"stopped at epoch {m.epoch} on request")

        begun.report = report
        return begun

    def start(self, begun: TrialStart) -> None:
        """The trial's config, its start attrs, and its checkpoint store (a retry's resumes
        from the dead trial's checkpoints); a failure here is the trial's (`failed`)."""
        config = train_config_for(self.spec, begun.params)
        overrides: dict[str, Any] = {}
        if self.device:
            overrides["device"] = self.device
        if self.threads:
            overrides["threads"] = self.threads
        begun.config = config = config.replace(**overrides) if overrides else config
        begun.start_attrs.update(host=self.host, pid=os.getpid(), device=config.device,
                                 **self.placed)
        begun.device = self.rank_gpus or str(trainers.resolve_device(config.device))
        begun.start_attrs["device"] = begun.device
        begun.retried_from = self.begin(begun.trial, begun.start_attrs)
        begun.store = self._checkpoint_store(begun.trial.number, begun.retried_from)

    def failed(self, begun: TrialStart, e: Exception) -> Ended:
        """Record why trial `begun` raised `e`: it ends FAILED, or GPU_FULL (marked to be
        queued again unchanged) for an out-of-memory on a GPU shared with other workers."""
        trial, config, device = begun.trial, begun.config, begun.device
        reason = f"error: {type(e).__name__}: {e}"
        extra = None
        if isinstance(e, RankFailed):  # the rank's error, its traceback from its process
            reason, extra = f"error: {e}", {"traceback": e.traceback}
        if is_out_of_memory(e):  # the worker empties the cache and goes on
            batch = f" at batch_size {config.batch_size}" if config is not None else ""
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = f"out of memory{batch} on {device or 'the device'}: {first}"
            if oom_from_sharing(device):
                attrs = {"ended": INTERRUPTED, "oom_shared": reason,
                         "seconds": round(time.perf_counter() - begun.started, 3)}
                with_retry(lambda: set_user_attrs(trial, attrs), what="marking the trial")
                return Ended(End.GPU_FULL, reason=f"{reason}; the GPU is shared, so the trial "
                             "is queued again unchanged and this worker leaves the GPU")
        log_failure(trial.number, e)
        shown = self.record_failure(trial, reason, begun.start_attrs, begun.params,
                                    begun.started, extra)
        return Ended.of(shown)

    def lost(self, begun: TrialStart, reason: str, extra: dict[str, Any] | None = None
             ) -> Ended:
        """A rank of trial `begun` died (`RankLost`): marked interrupted, to be queued again
        and resume from its checkpoint as a dead worker's trial does; after MAX_RANK_RETRIES
        retries that each lost a rank, it fails."""
        retries = with_retry(lambda: retries_of(begun.trial), what="reading the trial")
        if retries >= MAX_RANK_RETRIES:
            reason = f"{reason}; not retried again: {retries} retries lost a rank"
            return Ended.of(self.record_failure(begun.trial, reason, begun.start_attrs,
                                                begun.params, begun.started, extra))
        attrs = {**(extra or {}), "ended": INTERRUPTED, "rank_lost": reason,
                 "seconds": round(time.perf_counter() - begun.started, 3)}
        with_retry(lambda: set_user_attrs(begun.trial, attrs), what="marking the trial")
        return Ended(End.RANK_LOST, reason=f"{reason}: queued again to resume from its "
                     "last checkpoint")

    def placement(self, device: str) -> Placement:
        """Where a wide trial's ranks run: a GPU each (``gpus: N``) or all on `device`."""
        return Placement.of(self.spec.resources.width, device, self.threads,
                            own_gpus=self.own_gpus)

    def _train(self, begun: TrialStart) -> trainers.TrainResult:
        """The trial trained here, or in its ranks (rank 0's result)."""
        assert begun.config is not None and begun.report is not None
        if self.spec.resources.width == 1:
            return trainers.train(begun.config, begun.report, begun.store)
        job = TrainJob(begun.config.to_dict(),
                       str(begun.directory) if begun.directory is not None else None)
        return run_ranks(train_rank, job, self.placement(begun.device),
                         on_report=partial(self._verdict, begun),
                         label=f"trial #{begun.trial.number}")

    @staticmethod
    def _verdict(begun: TrialStart, metrics: trainers.EpochMetrics) -> Verdict:
        """Rank 0's report of an epoch, given to the trial's report: the verdict every rank
        acts on. Its checkpoint (written before the report) is copied to the bucket first."""
        if isinstance(begun.store, SyncedCheckpointStore):
            begun.store.push()
        assert begun.report is not None
        try:
            begun.report(metrics)
        except trainers.StopTraining as stop:
            return ("stop" if begun.stop_requested else "pruned", str(stop))
        return None

    @staticmethod
    def interrupted(begun: TrialStart) -> None:
        """Ctrl-C, SIGTERM or `hpsearch stop`: the worker queues the trial again, and its
        retry resumes from the last epoch checkpoint. The mark is what says so: it waits out
        SQLite's write lock (every worker is interrupted at once)."""
        attrs = {"ended": INTERRUPTED, "seconds": round(time.perf_counter() - begun.started, 3)}
        with_retry(lambda: set_user_attrs(begun.trial, attrs), what="marking the interruption")

    def finish(self, begun: TrialStart, result: trainers.TrainResult) -> Ended:
        """The trial's second half: its end attrs and artifacts, written with its result as it
        is told (`record_result`). Stopped by the pruner, or diverged, it ends PRUNED: a
        diverged run is a bad region, not a bug, the budget counts it and the sampler learns
        from it. Stopped by `hpsearch stop`, it ends INTERRUPTED (queued again to resume)."""
        trial, config = begun.trial, begun.config
        if begun.stop_requested:
            self.interrupted(begun)
            return Ended(End.INTERRUPTED)
        if begun.retried_from is not None and result.resumed_from_epoch:
            self.report_restored(trial, result)
        values = None
        if result.status == "completed":
            values = [metric_value(metric, list(result.history)) for metric in self.metrics]
        # A run that completed without a usable value (a validation metric without a
        # validation split, say) is a failure: Optuna stores it as FAIL, and the worker counts
        # it towards max_failures_in_row rather than run on into a loop of them.
        unusable = next((f"{m} is {v}" for m, v in zip(self.metrics, values or [], strict=False)
                         if not math.isfinite(v)), None)
        end_attrs: dict[str, Any] = {
            "history": [history_record(m) for m in result.history],
            "epochs_run": result.epochs_run,
            "seconds": round(result.seconds, 3),
            "parameters": result.parameters,
            "trained_parameters": result.trained_parameters,
            "ended": (f"failed: no usable value ({unusable})" if unusable
                      else result.reason if result.status != "completed" else "completed"),
        }
        if begun.retried_from is not None:
            end_attrs["resumed_from_epoch"] = result.resumed_from_epoch
        if result.notes:  # what loading model.weights did: which heads were re-initialized
            end_attrs["weights_notes"] = list(result.notes)
        links: dict[str, str] = {}
        if self.artifacts is not None:
            # Now, while the trial is live: Optuna attaches artifacts only to a running trial.
            # Their links are written with the result: one transaction.
            written = self.artifacts.write(trial, result, config, end_attrs["history"])
            if written is not None:
                end_attrs["artifact_seconds"] = round(written.seconds, 3)
                links = written.links
        self.record_result(trial, end_attrs, links)
        last = (float(getattr(result.history[-1], self.metrics[0])) if result.history
                else None)
        state = "FAIL" if unusable else "COMPLETE" if values else "PRUNED"
        shown = TrialOutcome(trial.number, state, values, last, begun.params,
                             result.epochs_run, end_attrs["seconds"], end_attrs["ended"])
        # Told, its checkpoints (and those of the dead trial it resumed) are no longer needed.
        return Ended.of(shown, clear=self.checkpoints_of(begun.directory, begun.retried_from))

    def report_restored(self, trial: optuna.Trial, result: trainers.TrainResult) -> None:
        """A retry resumed from the dead trial's checkpoint: the epochs that checkpoint holds
        but the trial's reports lack are reported now. The trainer saves an epoch's checkpoint
        before it reports the epoch, so a worker lost between the two (a node gone, kill -9)
        leaves a checkpoint one report ahead; the retry trains on from it and would leave a
        gap in the trial's curve."""
        if len(self.metrics) != 1:
            return  # several objectives are not reported
        frozen = with_retry(lambda: trial.storage.get_trial(trial_id_of(trial)),
                            what="reading the trial")
        for m in result.history[:result.resumed_from_epoch]:
            value = getattr(m, self.metrics[0])
            if m.epoch not in frozen.intermediate_values and math.isfinite(value):
                report_or_taken_over(trial, float(value), m.epoch)

    def begin(self, trial: optuna.Trial, start_attrs: dict[str, Any]) -> int | None:
        """Write what is left of a trial's start attrs; the number of the dead trial this one
        retries (and resumes from its checkpoints), if any."""
        retried_from = retry_link(trial)
        if retried_from is not None:
            start_attrs["retried_from"] = retried_from
        # What the storage wrote as it created the trial and set its parameters is not
        # written again: a trial this worker created needs no transaction here.
        written = written_attrs(trial)
        left = {k: v for k, v in start_attrs.items() if k not in written or written[k] != v}
        if left:
            with_retry(lambda: set_user_attrs(trial, left), what="starting a trial")
        return retried_from

    def record_failure(self, trial: optuna.Trial, ended: str, start_attrs: dict[str, Any],
                       params: dict[str, Any], started: float,
                       extra: dict[str, Any] | None = None) -> TrialOutcome:
        """A trial that raised: why (`ended`), and what it ran, before it is told FAIL."""
        ended = ended[:500]
        seconds = round(time.perf_counter() - started, 3)
        attrs = {**start_attrs, **(extra or {}), "ended": ended, "seconds": seconds}
        with_retry(lambda: set_user_attrs(trial, attrs), what="recording a failure")
        epochs = len(attrs.get("history") or [])
        return TrialOutcome(trial.number, "FAIL", None, None, params, epochs, seconds, ended)

    def record_result(self, trial: optuna.Trial, end_attrs: dict[str, Any],
                      links: dict[str, str]) -> None:
        """Written with the trial's state as Optuna tells it (one transaction) where the
        storage allows it, else now; with its constraint values where the study has
        `constraints:` (the samplers read them from the trial, as Optuna's set_constraint
        writes them)."""
        system_attrs: dict[str, Any] = dict(links)
        if self.spec.constraints:
            system_attrs.update(constraint_attrs(
                constraint_values(self.spec.constraints, end_attrs)))
        if not with_result(trial, end_attrs, system_attrs):
            with_retry(lambda: set_user_attrs(trial, end_attrs, system_attrs=system_attrs),
                       what="recording a result")

    def checkpoints_of(self, directory: Path | None, retried_from: int | None
                       ) -> tuple[Path | None, ...]:
        """The folders to delete once a trial is told: its own `directory` and the dead
        trial's it resumed (none when the study keeps its checkpoints)."""
        if directory is None or self.spec.run.keep_checkpoints:
            return ()
        return (directory, *(
            [self.checkpoint_dir(retried_from)] if retried_from is not None else []))

    def checkpoint_directory(self, number: int, retried_from: int | None) -> Path | None:
        """Trial `number`'s checkpoint folder: empty for a new trial, the dead trial's
        checkpoints for a retry."""
        directory = self.checkpoint_dir(number)
        if directory is None:
            return None
        if retried_from is None:
            # A new trial number resumes nothing: what is there was left by another study of
            # the same name (an earlier storage, a killed run) and must not be mistaken for ours.
            shutil.rmtree(directory, ignore_errors=True)
            return directory
        dead = self.checkpoint_dir(retried_from)
        if dead is not None and dead.exists() and not directory.exists():
            shutil.copytree(dead, directory)
        elif self.remote is not None and not directory.exists():
            # The dead trial ran on another machine: its checkpoint is in the bucket only.
            try:
                self.remote.fetch(self.spec.name, retried_from, directory)
            except Exception as e:  # noqa: BLE001 - a lost checkpoint costs epochs, not the trial
                LOG.warning(f"trial #{number}: the checkpoint of trial #{retried_from} not "
                            f"fetched from {self.remote.location} ({e}); it starts from epoch 0")
        return directory

    def _checkpoint_store(self, number: int, retried_from: int | None
                          ) -> trainers.CheckpointStore | None:
        directory = self.checkpoint_directory(number, retried_from)
        if directory is None:
            return None
        if self.remote is not None:
            return SyncedCheckpointStore(directory, self.remote, self.spec.name, number)
        return trainers.CheckpointStore(directory)

    def clear_checkpoints(self, directories: tuple[Path | None, ...]) -> None:
        """Delete a told trial's checkpoints (`Ended.clear`): its own, and the dead trial's it
        resumed. Not before it is told: if the storage fails first, the trial goes stale and
        its retry resumes from them."""
        for directory in directories:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
                if self.remote is not None:  # trial-<n>: the bucket's copy goes too
                    self.remote.remove(self.spec.name, int(directory.name.split("-")[-1]))
