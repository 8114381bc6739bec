"""A run's setup: what `train` and a pack member hold before their first epoch, and its checkpoint.

`prepare_run` is the one way a run starts, alone (`train`) or packed (`Pack.add`): the device
and CPU settings, the data, the seeded network (the seed fixes the init and, through its own
generator, the data order), the optimizer and the lr plan, and, where the checkpoint holds a
state, everything resumed from it. `checkpoint_state` is that state as both write it, so a run
resumes packed or alone whichever way it was interrupted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainers._checkpoint import CheckpointStore
from trainers._config import TrainConfig
from trainers._data import Data, load_data
from trainers._errors import ConfigError
from trainers._finetune import FrozenParts, Prepared, prepare_model
from trainers._lr_plan import LRPlan, lr_plan
from trainers._optimizers import build_optimizer, keep_implementation
from trainers._results import EpochMetrics
from trainers._schedules import Schedule


def configure_cpu(config: TrainConfig) -> None:
    """Process-wide CPU settings a run asks for: intra-op threads, denormal flushing."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(config.flush_denormal)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where present, else CPU; a CUDA request without CUDA is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        # Name the GPU: trials record where they ran ("cuda:0" inside CUDA_VISIBLE_DEVICES).
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def network_and_data(config: TrainConfig, *, include_test: bool = False,
                     merge_val: bool = False) -> tuple[torch.device, Data, Prepared]:
    """The device (the CPU settings applied), the data, and the network as every run of
    `config` starts it: built right after seeding with `config.seed`, so the init is the
    seed's, and still on the CPU (the caller moves it). `include_test` and `merge_val` go to
    `load_data`."""
    device = resolve_device(config.device)
    configure_cpu(config)
    data = load_data(config.data, device=device, include_test=include_test, merge_val=merge_val)
    torch.manual_seed(config.seed)
    return device, data, prepare_model(config.model, config.init, data.input_shape,
                                       data.num_classes)


@dataclass(eq=False)
class RunSetup:
    """A run ready for its first epoch, fresh or resumed (then `history` and the rest say how
    far it got)."""

    config: TrainConfig
    device: torch.device
    data: Data
    prepared: Prepared  # the network, what is frozen and what is head, notes on its weights
    freezer: FrozenParts
    channels_last: bool  # the network, and so each batch, in channels-last memory format
    optimizer: torch.optim.Optimizer
    plan: LRPlan
    order: torch.Generator  # data order and augmentation: apart from the init and dropout
    started: float  # `time.perf_counter()` as the setup began: a run's seconds count from it
    # The global RNG state the run continues from (after the init, or the checkpoint's): a pack
    # keeps one per member, as each member's run alone would have it.
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    history: list[EpochMetrics] = field(default_factory=list)
    first_loss: float | None = None  # the divergence check's reference
    start_epoch: int = 0

    @property
    def model(self) -> nn.Module:
        return self.prepared.model


def prepare_run(config: TrainConfig, checkpoint: CheckpointStore | None = None, *,
                include_test: bool = False, merge_val: bool = False) -> RunSetup:
    """Set up a run of `config`, resumed from `checkpoint` where it holds a state (written by
    a run of the same configuration, else ConfigError); the global RNG is left where the run
    continues from. `include_test` and `merge_val` go to `load_data`."""
    started = time.perf_counter()
    device, data, prepared = network_and_data(config, include_test=include_test,
                                              merge_val=merge_val)
    model = prepared.model
    channels_last = config.channels_last and device.type == "cuda" and len(data.input_shape) == 3
    if channels_last:
        model.to(device, memory_format=torch.channels_last)
    else:
        model.to(device)
    plan = lr_plan(config, len(data.train))
    optimizer = build_optimizer(model, config.optimizer, lr=plan.base_lr, head=prepared.head,
                                frozen=prepared.frozen,
                                unfreezes=config.model.unfreeze_after is not None)
    run = RunSetup(
        config=config, device=device, data=data, prepared=prepared,
        freezer=FrozenParts(model, prepared.frozen, config.model), channels_last=channels_last,
        optimizer=optimizer, plan=plan, order=torch.Generator().manual_seed(config.seed),
        started=started, rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    )
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        if _resumable(state["config"]) != _resumable(config.to_dict()):
            raise ConfigError(f"{checkpoint}: the checkpoint was written by another configuration")
        _resume(run, state)
    return run


def _resume(run: RunSetup, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    keep_implementation(run.optimizer, state["optimizer"])
    run.plan.schedule.load_state_dict(state["schedule"])
    run.order.set_state(state["rng_order"])
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], run.device)
    run.rng_cpu, run.rng_cuda = state["rng_cpu"], state.get("rng_cuda", run.rng_cuda)
    run.history = [EpochMetrics(**m) for m in state["history"]]
    run.first_loss = state["first_loss"]
    run.start_epoch = int(state["epoch"])


# Where and how a run executes may change across a resume (a retry on another worker, another
# GPU, more threads, more DataLoader workers); what it trains may not.
_EXECUTION_FIELDS = ("device", "threads", "amp", "compile", "channels_last", "flush_denormal",
                     "eval_batch_size")
_READING_FIELDS = ("num_workers", "pin_memory", "persistent_workers")


def _resumable(config: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in config.items() if k not in _EXECUTION_FIELDS}
    kept["data"] = {k: v for k, v in kept["data"].items() if k not in _READING_FIELDS}
    return kept


def checkpoint_state(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    order: torch.Generator,
    history: list[EpochMetrics],
    first_loss: float | None,
    device: torch.device,
) -> dict[str, Any]:
    """What a checkpoint holds after an epoch: all `prepare_run` needs to resume the run."""
    state: dict[str, Any] = {
        "epoch": len(history),
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_order": order.get_state(),
        "history": [m.to_dict() for m in history],
        "first_loss": first_loss,
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state
