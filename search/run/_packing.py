"""Packed trials: one worker trains up to K trials of its study at once (`trainers.Pack`).

`run_worker` steps a `PackedTrials` in place of one trial at a time (`--pack K`, `run.pack`).
Each step fills the pack with trials asked under the budget lock, as an unpacked worker asks
for one (the budget check and the trial's creation in one transaction), trains the pack until
members end, and tells each ended member on its own: its epochs were reported, its pruner
asked and its checkpoint written per member by the same halves of `Objective` an unpacked trial
goes through, so its attrs, artifacts, retries and status are those of a trial run alone. A
member's slot is refilled at the next step (continuous batching of trials). Trials of other
networks (a space searching the hidden layers) share the pack, each network in stacks of its
own. A trial that cannot be packed (`trainers.pack_refusal`, other data or device than the
pack's, or under `auto` a large model) runs alone, and the worker says why once.

`--pack auto` starts at `AUTO_PACK` for a small model; a trial of a model of
`AUTO_MAX_PARAMETERS` or more runs alone. On a GPU the pack then grows: each time
a full pack has trained, its peak memory and the GPU's utilization are read (`PackMeter`) and
its capacity doubles while twice the pack still fits under the memory margin and the GPU is not
busy (`grown_capacity`, the margins of `--trials-per-gpu auto`); the first time it may not, its
size is settled. A pack that runs out of memory halves and grows no more.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import optuna
import torch
from optuna.trial import TrialState

import trainers
from search.run._gpu_fill import (
    BUSY_UTILIZATION,
    MEMORY_MARGIN,
    SimulatedGpus,
    oom_from_sharing,
)
from search.run._objective import (
    PackTooBig,
    StopRequested,
    TakenOver,
    is_out_of_memory,
    say_dropped,
)
from search.storage import (
    INTERRUPTED,
    BudgetReached,
    beat_written,
    set_user_attrs,
    trial_id_of,
    with_retry,
)

if TYPE_CHECKING:
    from search.run._objective import Objective, TrialOutcome, TrialStart
    from search.storage import DatabaseLock, FileLock, NullLock, WorkerHeartbeat

# `--pack auto`: measured on the 2-core CPU (benchmarks/packing.py), 32 fashion_mlp trials
# packed train 1.9-2.4x faster than one at a time; a model this large fills the machine alone.
AUTO_PACK = 32
AUTO_MAX_PARAMETERS = 1_000_000
PACK_MAX = 256


def auto_pack(config: trainers.TrainConfig) -> tuple[int, str]:
    """K for `--pack auto` from a packable trial's model (1: its network runs alone), and why."""
    data = trainers.data_for(config)
    model = trainers.prepare_model(config.model, config.init, data.input_shape,
                                   data.num_classes).model
    size = sum(p.numel() for p in model.parameters())
    if size < AUTO_MAX_PARAMETERS:
        return AUTO_PACK, f"--pack auto: {size:,} parameters, {AUTO_PACK} trials at once"
    return 1, (f"--pack auto: {size:,} parameters (at least {AUTO_MAX_PARAMETERS:,}): "
               "one trial at a time")


@dataclass(frozen=True)
class PackReading:
    """A GPU as a packing worker sees it after a full pack trained."""

    members: int  # the pack's size while it trained
    own_mb: float  # the pack's peak memory (this process's), since the last reading
    others_mb: float  # held on the device by everything else (other processes, CUDA contexts)
    total_mb: float
    utilization: float | None  # percent busy; None where the driver does not say


class PackMeter(Protocol):
    def read(self, members: int) -> PackReading: ...


MB = 2**20


class CudaMeter:
    """Readings of this process's CUDA device: torch's peak (reset at each reading), the
    device's free memory, and NVML's utilization where `pynvml` is installed."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def read(self, members: int) -> PackReading:
        own = torch.cuda.max_memory_reserved(self.device) / MB
        held = torch.cuda.memory_reserved(self.device) / MB
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = (x / MB for x in torch.cuda.mem_get_info(self.device))
        try:
            utilization: float | None = float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - no pynvml, or a driver that does not say
            utilization = None
        return PackReading(members, own, max(0.0, total - free - held), total, utilization)


class SimulatedMeter:
    """`$HPSEARCH_FAKE_GPU_MEMORY`'s device, a member of the pack standing for a worker: for
    tests on machines without a GPU."""

    def __init__(self, gpus: SimulatedGpus) -> None:
        self.gpus = gpus

    def read(self, members: int) -> PackReading:
        reading = self.gpus.read({"0": members})["0"]
        own = members * self.gpus.per_worker_mb
        return PackReading(members, own, reading.memory_used_mb - own, reading.memory_total_mb,
                           reading.utilization)


def meter_for(device: str) -> PackMeter | None:
    """How a pack on `device` is measured: the simulated device where tests set one, CUDA's
    own counters on a GPU, else None (a CPU pack keeps its size)."""
    simulated = SimulatedGpus.from_env()
    if simulated is not None:
        return SimulatedMeter(simulated)
    return CudaMeter(device) if device.startswith("cuda") else None


def grown_capacity(capacity: int, reading: PackReading) -> tuple[int, str]:
    """The pack's next capacity after a full pack's `reading`, and why (empty: unchanged)."""
    if reading.members < capacity or capacity >= PACK_MAX:
        return capacity, ""  # not full (nothing learned), or as large as packs get
    busy = reading.utilization is not None and reading.utilization >= BUSY_UTILIZATION
    target = min(PACK_MAX, 2 * capacity)
    needed = reading.others_mb + reading.own_mb / reading.members * target
    seen = (f"a pack of {capacity} peaked at {reading.own_mb:,.0f} MiB, others hold "
            f"{reading.others_mb:,.0f} of {reading.total_mb:,.0f} MiB")
    if reading.utilization is not None:
        seen += f", GPU {reading.utilization:.0f}% busy"
    if busy:
        return capacity, f"--pack auto: {seen}: the pack stays at {capacity} (GPU busy)"
    if needed > MEMORY_MARGIN * reading.total_mb:
        return capacity, (f"--pack auto: {seen}: the pack stays at {capacity} ({target} would "
                          f"need {needed:,.0f} MiB, over {MEMORY_MARGIN:.0%})")
    return target, f"--pack auto: {seen}: packs of {target} now"


class PackedTrials:
    """A worker's pack of trials between `step`s; `interrupted`: the trials an interruption
    ended (FAIL "interrupted"), for the worker to queue again."""

    def __init__(self, objective: Objective, study: optuna.Study, heartbeat: WorkerHeartbeat,
                 lock: NullLock | FileLock | DatabaseLock, capacity: int | str,
                 room: Callable[[], None]) -> None:
        """`study`: the worker's budget-admitting view (`worker_study`); `room`: raises
        BudgetReached where the storage does not admit trials itself; `capacity`: K or
        "auto"."""
        self.objective = objective
        self.study = study
        self.heartbeat = heartbeat
        self.lock = lock
        self.room = room
        self.capacity: int | None = None if capacity == "auto" else int(capacity)
        self.auto = capacity == "auto"
        self.grows = self.auto  # by the meter's readings, until an out-of-memory
        self.meter: PackMeter | None = None  # set when `auto` takes its K
        self.pack = trainers.Pack(max(self.capacity or 1, 1))
        self.members: dict[int, TrialStart] = {}  # by the pack's member id
        self.live: dict[int, TrialStart] = {}  # every trial asked and not yet told, by number
        self.interrupted: set[int] = set()
        self._said: set[str] = set()
        # `auto`: by network key, why its trials run alone (None: they pack)
        self._large: dict[str, str | None] = {}

    def __len__(self) -> int:
        return len(self.members)

    def step(self, *, deadline: float = math.inf) -> list[TrialOutcome | None]:
        """Fill the pack while a new trial could end by `deadline` (the worker's timeout, on
        `time.monotonic`), train it until members end, and tell those; their outcomes. Where
        filling ended with a trial that ran alone and did not fail, only its outcome: the
        worker looks at it, and the next step fills the pack again before it trains. (After
        a failure the pack trains first, so a broken setup's failures in a row still meet
        the members' results.)

        BudgetReached when no trial could start and none is training; an interruption (Ctrl-C,
        SIGTERM, `hpsearch stop`) ends every trial of the pack FAIL "interrupted" (listed in
        `interrupted`) and is raised on."""
        try:
            if self.members and self.objective.stop():
                raise StopRequested("stopped at an epoch's end on request")
            outcomes = self._fill(deadline)
            if not self.members or (outcomes and all(o is not None and o.state != "FAIL"
                                                     for o in outcomes)):
                return outcomes
            self.lock.release()  # held from the worker's loop when nothing was asked
            size = len(self.pack)
            try:
                ended = self.pack.run_until_free()
            except Exception as e:  # noqa: BLE001 - training itself failed
                if (len(self.members) > 1 and is_out_of_memory(e)
                        and not oom_from_sharing(self._device())):
                    self._halve(e)  # raises PackTooBig: the members are queued again
                return outcomes + self._lose_all(e)  # every member is lost
            stop: KeyboardInterrupt | None = None
            for member, outcome in ended:
                begun = self.members.pop(member)
                if isinstance(outcome, KeyboardInterrupt):
                    self.objective.interrupted(begun)
                    self._end(begun, TrialState.FAIL)
                    self.interrupted.add(begun.trial.number)
                    stop = stop or outcome
                else:
                    outcomes.append(self._told(begun, outcome))
            if stop is not None:
                raise stop
            self._grow(size)
            return outcomes
        except KeyboardInterrupt:
            self._interrupt_all()
            raise

    def _fill(self, deadline: float) -> list[TrialOutcome | None]:
        """Ask for trials until the pack is full or a new one could not end by `deadline`; a
        trial that cannot be packed runs alone (and ends the filling: the worker looks at its
        outcome before the next)."""
        first = True
        while ((self.capacity is None or len(self.members) < self.capacity)
               and self._time_for_one_more(deadline)):
            try:
                begun = self._ask(first)
            except BudgetReached:
                if self.members:
                    return []  # the last trials are in the pack: train them
                raise
            first = False
            try:
                refusal = self.objective.guarded(begun, lambda b=begun: self._start(b))
            except TakenOver:
                self._drop(begun)
                return [None]
            except Exception:  # noqa: BLE001 - recorded as the trial's (`Objective.failed`)
                self._end(begun, TrialState.FAIL)
                return [self.objective.last]
            config = begun.config
            assert config is not None
            if refusal is None and not self.pack.fits(config):
                refusal = "its data or device differ from the pack's"
            if refusal is not None:
                self._say(f"--pack: trials that cannot be packed run one at a time ({refusal})")
                return [self._alone(begun)]
            try:
                member = self.objective.guarded(begun, lambda b=begun: self.pack.add(
                    b.config, on_epoch=b.report, checkpoint=b.store))
            except TakenOver:
                self._drop(begun)
                return [None]
            except Exception:  # noqa: BLE001 - recorded as the trial's
                self._end(begun, TrialState.FAIL)
                return [self.objective.last]
            self.members[member] = begun
        return []

    def _time_for_one_more(self, deadline: float) -> bool:
        """Whether a trial started now would end by `deadline` at the pack's pace: its full
        epochs at the last epoch's time. An unpacked worker lets its one last trial overrun
        the timeout; a pack refilled to the end would overrun by K such trials at 1/K speed
        each, so near the timeout its slots drain instead."""
        now = time.monotonic()
        if now >= deadline:
            return False
        return not self.members or now + self.pack.trial_seconds() <= deadline

    def _start(self, begun: TrialStart) -> str | None:
        """Trial `begun`'s config and start attrs (`Objective.start`); why it cannot be packed
        (None if it can). `auto` judges each network by its size (`auto_pack`, once per
        network) and takes K from the first small one."""
        self.objective.start(begun)
        assert begun.config is not None
        refusal = trainers.pack_refusal(begun.config)
        if refusal is None and self.auto:
            network = trainers.network_key(begun.config)
            if network not in self._large:
                k, why = auto_pack(begun.config)
                self._large[network] = None if k > 1 else "--pack auto: a large model"
                if k == 1 or self.capacity is None:
                    self._say(why)  # the size of the first network packed, or a large one
                if k > 1 and self.capacity is None:
                    self.capacity = k
                    self.pack = trainers.Pack(k)
                    self.meter = meter_for(begun.device or "cpu")
            refusal = self._large[network]
        return refusal

    def _grow(self, size: int) -> None:
        """After the pack trained with `size` members: `auto` doubles its capacity while the
        meter says twice the pack fits (`grown_capacity`)."""
        if not self.grows or self.meter is None or self.capacity is None or size < self.capacity:
            return  # a pack that was not full tells nothing of a fuller one: no reading
        capacity, why = grown_capacity(self.capacity, self.meter.read(size))
        if why:
            self._say(why)
        if why and capacity == self.capacity:
            self.grows = False  # settled: the GPU is full or busy at this size
        self.capacity = self.pack.capacity = capacity

    def _ask(self, locked: bool) -> TrialStart:
        """A new trial (or a queued one), under the budget lock from the check until it exists
        (the worker holds it already when `locked`); its first beat, its params."""
        if not locked:
            with_retry(self.lock.acquire, what="taking the budget lock")
        try:
            self.room()
            trial = self.study.ask()
        finally:
            self.lock.release()  # the new trial exists: others may count it now
        trial_id, written = trial_id_of(trial), beat_written(self.study, trial)
        with_retry(lambda: self.heartbeat.begin(trial_id, written=written),
                   what="starting a trial")
        begun = self.objective.prepare(trial)
        self.live[trial.number] = begun
        return begun

    def _alone(self, begun: TrialStart) -> TrialOutcome | None:
        """Trial `begun` trained by itself (`trainers.train`), then told."""
        try:
            result = self.objective.guarded(begun, lambda: trainers.train(
                begun.config, begun.report, begun.store))
        except TakenOver:
            self._drop(begun)
            return None
        except Exception:  # noqa: BLE001 - recorded as the trial's
            self._end(begun, TrialState.FAIL)
            return self.objective.last
        return self._told(begun, result)

    def _told(self, begun: TrialStart, outcome: trainers.TrainResult | BaseException
              ) -> TrialOutcome | None:
        """Tell an ended trial: its result (COMPLETE, or PRUNED when stopped by the pruner or
        diverged), or FAIL for the error its report raised."""
        if isinstance(outcome, TakenOver):
            self._drop(begun)
            return None
        if isinstance(outcome, BaseException):
            self.objective.failed(begun, outcome)  # type: ignore[arg-type]
            self._end(begun, TrialState.FAIL)
            return self.objective.last
        values = self.objective.finish(begun, outcome)
        outcome_state = self.objective.last
        if values is None:
            self._end(begun, TrialState.FAIL if outcome_state and outcome_state.state == "FAIL"
                      else TrialState.PRUNED)
        else:
            self._end(begun, TrialState.COMPLETE, values)
        # Told: its checkpoints (and those of the dead trial it resumed) are no longer needed.
        self.objective.clear_checkpoints(
            self.objective.checkpoints_of(begun.directory, begun.retried_from))
        return outcome_state

    def _end(self, begun: TrialStart, state: TrialState,
             values: list[float] | None = None) -> None:
        """Tell Optuna how trial `begun` ended and stop beating for it. A tell that fails
        leaves the trial RUNNING without beats: it goes stale and is retried."""
        trial = begun.trial
        try:
            with_retry(lambda: self.study.tell(trial, values, state=state,
                                               skip_if_finished=True),
                       what="telling a trial")
        finally:
            self.heartbeat.end(trial_id_of(trial))
            self.live.pop(trial.number, None)

    def _drop(self, begun: TrialStart) -> None:
        """Trial `begun` was failed as stale while this worker was paused and retried by
        another: its late result is dropped."""
        self.heartbeat.end(trial_id_of(begun.trial))
        self.live.pop(begun.trial.number, None)
        self.members = {k: v for k, v in self.members.items() if v is not begun}
        say_dropped(begun.trial.number)

    def _lose_all(self, error: Exception) -> list[TrialOutcome | None]:
        """Training the pack failed (out of memory, say): every member fails with the error."""
        outcomes: list[TrialOutcome | None] = []
        device = self._device()
        members, self.members = list(self.members.values()), {}
        self._empty(self.pack.capacity, device)
        for begun in members:
            # GpuFull (a shared GPU out of memory) is raised on: `step` interrupts them all.
            self.objective.failed(begun, error)
            self._end(begun, TrialState.FAIL)
            outcomes.append(self.objective.last)
        return outcomes

    def _device(self) -> str:
        begun = next(iter(self.members.values()), None)
        return begun.device if begun is not None and begun.device else "cpu"

    def _empty(self, capacity: int, device: str) -> None:
        """A new, empty pack; the old one's tensors go with it (and CUDA's cached blocks)."""
        self.pack = trainers.Pack(capacity)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _halve(self, error: Exception) -> None:
        """The pack ran out of memory on a device of its own: every member ends FAIL
        "interrupted" (to be queued again unchanged, resuming from its checkpoint), the pack's
        capacity halves, and PackTooBig tells the worker to queue them and go on."""
        n, device = len(self.members), self._device()
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        reason = f"out of memory in a pack of {n} on {device}: {first}"
        attrs = {"ended": INTERRUPTED, "oom_pack": reason}
        for begun in list(self.members.values()):
            with_retry(lambda b=begun: set_user_attrs(b.trial, attrs),
                       what="marking the trial")
        self._interrupt_all()
        self.capacity, self.grows = max(1, n // 2), False
        self._empty(self.capacity, device)
        line = (f"--pack: {reason}; its {n} trials are queued again and this worker goes on "
                f"with packs of {self.capacity}")
        print(line, file=sys.stderr, flush=True)
        raise PackTooBig(line) from error

    def _interrupt_all(self) -> None:
        """Every trial asked and not told ends FAIL "interrupted" (the worker queues them
        again: each resumes from its last epoch checkpoint)."""
        for begun in list(self.live.values()):
            try:
                self.objective.interrupted(begun)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # told already (an interruption during its tell)
            self._end(begun, TrialState.FAIL)
            self.interrupted.add(begun.trial.number)
        self.members = {}
        self.pack = trainers.Pack(self.pack.capacity)

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            print(line, file=sys.stderr, flush=True)
