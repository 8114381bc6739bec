"""The training loop: `train(config, on_epoch, checkpoint)`.

Data that fits sits on the device as whole tensors and batches are slices of a shuffled index
(airbench's habit): no DataLoader, no per-sample Python. Data that does not is streamed in the
same order through a DataLoader (`trainers._streaming`). The loop knows nothing of studies:
progress leaves through `on_epoch`, which may raise `StopTraining` to end the run after that
epoch. Given a `Shard`, the run is one rank of a data-parallel run (`trainers._distributed`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers._checkpoint import CheckpointStore
from trainers._config import TrainConfig, config_from_dict
from trainers._data import Data, Split, augment_batch, load_data
from trainers._distributed import Shard, trained_ids
from trainers._optimizers import OPTIMIZERS, current_momentum, group_lrs, set_momentum
from trainers._results import EpochMetrics, StopTraining, TrainResult
from trainers._setup import RunSetup, checkpoint_state, prepare_run, resolve_device

DIVERGENCE_CHECK_EVERY = 16  # steps between loss checks: a host sync on CUDA, so not every step
GRAD_NORM_EVERY = 8  # steps between per-layer gradient-norm samples


Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass(frozen=True)
class _Compute:
    """How a run computes its batches: the forward (compiled or not), autocast, and the loss
    scaler of float16 mixed precision (None otherwise)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    autocast: Autocast
    scaler: torch.amp.GradScaler | None
    evaluate: Callable[[torch.Tensor], torch.Tensor]  # validation's: never DDP's wrapper
    shard: Shard | None = None
    trained: frozenset[int] = frozenset()  # the parameters DDP was wrapped around


@dataclass(frozen=True)
class _Pass:
    """One epoch's training pass: per-batch values kept on the device and counted once, at the
    epoch's end (a count per step was two more kernel launches in a launch-bound step)."""

    losses: list[torch.Tensor]  # each batch's mean loss
    predicted: list[torch.Tensor]
    labels: list[torch.Tensor]
    layers: list[tuple[str, torch.Tensor]]  # the trained weight layers (`_weight_layers`)
    norm_sum: torch.Tensor  # each layer's gradient norm, summed over the samples
    norm_samples: int
    last_lr: float
    diverged: str  # why the run diverged in this pass, or ""


def train(
    config: TrainConfig | dict[str, Any],
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    checkpoint: CheckpointStore | None = None,
    *,
    evaluate_test: bool = False,
    merge_val: bool = False,
    shard: Shard | None = None,
) -> TrainResult:
    """Train one configuration and report every epoch.

    `checkpoint`, when given, is written after every epoch and, if it already holds a state,
    the run resumes from it: a resumed run gives the same metrics as one never interrupted.
    `evaluate_test` touches the test set once, at the end (for `hpsearch retrain` only);
    `merge_val` trains on train+validation (the final fit after the search). With `shard`,
    this process is one rank of a data-parallel run (`trainers._distributed`): every rank
    loads the checkpoint, rank 0 alone writes it, and `on_epoch` is called on every rank
    with the same metrics (raising `StopTraining` on one rank alone would leave the others
    waiting: the caller decides for all).
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    run = prepare_run(config, checkpoint, include_test=evaluate_test, merge_val=merge_val)
    if shard is not None and not shard.is_main:
        checkpoint = None  # loaded above; rank 0 writes it
    compute = _compute(run, shard)
    status, reason = "completed", f"trained {config.epochs} epochs"
    for epoch in range(run.start_epoch, config.epochs):
        t0 = time.perf_counter()
        compute = _start_epoch(run, compute, epoch)
        done = _train_pass(run, compute, epoch)
        if done.diverged:
            status, reason = "diverged", done.diverged
            break
        metrics = _end_epoch(run, compute, epoch, done, t0)
        run.history.append(metrics)
        if checkpoint is not None and not checkpoint.save_or_warn(checkpoint_state(
                config, run.model, run.optimizer, run.plan.schedule, run.order, run.history,
                run.first_loss, run.device)):
            checkpoint = None  # a full disk: the run goes on without checkpoints
        if on_epoch is not None:
            try:
                on_epoch(metrics)
            except StopTraining as stop:
                status, reason = "stopped", str(stop) or f"stopped after epoch {epoch + 1}"
                break
    return _result(run, compute, status, reason, evaluate_test=evaluate_test)


def _compute(run: RunSetup, shard: Shard | None = None) -> _Compute:
    """On CUDA, `compile` and `amp` as configured (bfloat16 where supported: no loss scaler);
    on the CPU, the plain model. A shard's model is wrapped in DDP for training."""
    module = run.model if shard is None else shard.wrap(run.model, run.device)
    forward: Callable[[torch.Tensor], torch.Tensor] = module
    autocast: Autocast = contextlib.nullcontext
    scaler = None
    if run.device.type == "cuda":
        if run.config.compile:
            forward = torch.compile(module)
        if run.config.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
            if dtype == torch.float16:
                scaler = torch.amp.GradScaler("cuda")
    evaluate = forward if shard is None else run.model
    trained = trained_ids(run.model) if shard is not None else frozenset()
    return _Compute(forward, autocast, scaler, evaluate, shard, trained)


def _start_epoch(run: RunSetup, compute: _Compute, epoch: int) -> _Compute:
    """The model in training mode with the epoch's layers trained; a shard's DDP wrapped
    again when unfreezing changed what it trains."""
    run.model.train()
    run.freezer.start_epoch(epoch)
    if compute.shard is not None and trained_ids(run.model) != compute.trained:
        return _compute(run, compute.shard)
    return compute


def _train_pass(run: RunSetup, compute: _Compute, epoch: int) -> _Pass:
    """One epoch's optimizer steps, at the lr plan's lr; the loss is checked for divergence
    every `DIVERGENCE_CHECK_EVERY` steps and at the last (the check syncs with the device)."""
    config, model, optimizer, order = run.config, run.model, run.optimizer, run.order
    base_lr, steps_per_epoch, schedule = (run.plan.base_lr, run.plan.steps_per_epoch,
                                          run.plan.schedule)
    forward, autocast, scaler = compute.forward, compute.autocast, compute.scaler
    info = OPTIMIZERS.get(config.optimizer.name)
    channels_last, first_loss = run.channels_last, run.first_loss
    shard = compute.shard
    layers = _weight_layers(model)  # the trained ones: unfreezing adds some
    perm = torch.randperm(len(run.data.train), generator=order)
    losses: list[torch.Tensor] = []
    predicted: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    norm_sum = torch.zeros(len(layers), device=run.device)
    norm_samples = 0
    last_lr = math.nan
    diverged = ""
    for i, (xb, yb) in enumerate(run.data.train.batches(perm, config.batch_size)):
        t = epoch * steps_per_epoch + i
        lr = base_lr * schedule.factor(t)  # `LRPlan.lr(t)`, without the call on the hot path
        if lr != last_lr:  # most schedules hold the lr for many steps: skip the writes
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            last_lr = lr
        momentum = schedule.momentum(t)
        if momentum is not None:
            set_momentum(optimizer, info, momentum)
        if config.data.augment:  # the whole batch, as one process: one augmentation stream
            xb = augment_batch(xb, config.data.augment, order)
        n = len(yb)
        if shard is not None:
            part = shard.part(n)
            xb, yb = xb[part], yb[part]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = forward(xb)
            if shard is None:
                loss = F.cross_entropy(out, yb)
            else:  # DDP averages over ranks: each sums its share over the global batch
                loss = F.cross_entropy(out, yb, reduction="sum") * (shard.world_size / n)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.max_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if layers and i % GRAD_NORM_EVERY == 0:
            # Sampled, not every step: a per-layer trend for spotting vanishing gradients
            # costs ~7% of a small model's step if taken each time.
            norm_sum += torch.stack(torch._foreach_norm([w.grad for _, w in layers]))
            norm_samples += 1
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        # The batch's mean loss; a shard's share of it (summed over the ranks at the epoch's end).
        losses.append(loss.detach() if shard is None else loss.detach() / shard.world_size)
        predicted.append(out.detach().argmax(1))
        labels.append(yb)
        if i % DIVERGENCE_CHECK_EVERY == 0 or i == steps_per_epoch - 1:
            # Every rank decides on the global batch's loss: they stop together.
            value = (loss.item() if shard is None
                     else shard.total(losses[-1].reshape(1).clone()).item())
            first_loss = value if first_loss is None else first_loss
            diverged = _divergence(value, first_loss, config.divergence_factor)
            if diverged:
                diverged = f"{diverged} at epoch {epoch + 1}, step {i + 1}"
                break
    run.first_loss = first_loss
    return _Pass(losses, predicted, labels, layers, norm_sum, norm_samples, last_lr, diverged)


def _end_epoch(run: RunSetup, compute: _Compute, epoch: int, done: _Pass,
               t0: float) -> EpochMetrics:
    """Validate, let the schedule see the validation loss (plateau), and count the epoch's
    metrics; `t0` is when the epoch began."""
    config, n_train = run.config, len(run.data.train)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    train_seconds = time.perf_counter() - t0
    shard = compute.shard
    val_loss = val_acc = math.nan
    if shard is None or shard.is_main:
        val_loss, val_acc = evaluate(compute.evaluate, run.data.val, config.eval_batch_size,
                                     compute.autocast)
    if shard is not None:  # rank 0's, everywhere: a plateau schedule sees the same value
        val_loss, val_acc = shard.from_main([val_loss, val_acc], run.device)
    run.plan.schedule.end_epoch(val_loss, run.plan.base_lr)
    seconds = time.perf_counter() - t0
    norms = (done.norm_sum / max(1, done.norm_samples)).tolist()
    # Every batch has batch_size examples but the last, which holds the remainder.
    sizes = torch.full((len(done.losses),), float(config.batch_size), device=run.device)
    sizes[-1] = n_train - config.batch_size * (len(done.losses) - 1)
    batch_losses = torch.stack(done.losses).float()
    correct = (torch.cat(done.predicted) == torch.cat(done.labels)).sum()
    if shard is not None:  # each rank holds its share of every batch: summed over ranks
        summed = shard.total(torch.cat([batch_losses.double(), correct.double().reshape(1)]))
        batch_losses, correct = summed[:-1].float(), summed[-1]
    train_loss = float((batch_losses * sizes).sum()) / n_train
    train_correct = int(correct.item())
    return EpochMetrics(
        epoch=epoch + 1,
        train_loss=train_loss,
        train_accuracy=train_correct / n_train,
        val_loss=val_loss,
        val_accuracy=val_acc,
        lr=done.last_lr,
        momentum=current_momentum(run.optimizer, OPTIMIZERS.get(config.optimizer.name)),
        grad_norms={name: norms[k] for k, (name, _) in enumerate(done.layers)},
        epoch_seconds=seconds,
        train_seconds=train_seconds,
        samples_per_second=n_train / train_seconds if train_seconds > 0 else math.inf,
        group_lrs=group_lrs(run.optimizer),
        trained_parameters=run.freezer.trained_parameters(),
    )


def _result(run: RunSetup, compute: _Compute, status: str, reason: str, *,
            evaluate_test: bool) -> TrainResult:
    """The run's result; with `evaluate_test`, after one pass over the test set (not for a run
    that diverged)."""
    test_loss = test_acc = None
    if evaluate_test and run.data.test is not None and status != "diverged":
        test_loss, test_acc = evaluate(compute.evaluate, run.data.test,
                                       run.config.eval_batch_size, compute.autocast)
    history = run.history
    return TrainResult(
        status=status,
        reason=reason,
        history=tuple(history),
        seconds=time.perf_counter() - run.started,
        resumed_from_epoch=run.start_epoch,
        parameters=sum(p.numel() for p in run.model.parameters()),
        trained_parameters=history[-1].trained_parameters if history else 0,
        device=str(run.device),
        test_loss=test_loss,
        test_accuracy=test_acc,
        notes=run.prepared.notes,
        train_examples=len(run.data.train),
        model=run.model,
    )


def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    split: Split | None,
    batch_size: int,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[float, float]:
    """Mean loss and accuracy over a split (nan, nan when there is none)."""
    if split is None or len(split) == 0:
        return math.nan, math.nan
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    loss_sum = correct = None
    with torch.no_grad(), autocast():
        for xb, yb in split.batches(None, batch_size):
            out = model(xb)
            loss = F.cross_entropy(out.float(), yb, reduction="sum")
            hits = (out.argmax(1) == yb).sum()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            correct = hits if correct is None else correct + hits
    if module is not None and was_training:
        module.train()
    n = len(split)
    return loss_sum.item() / n, correct.item() / n


def _divergence(loss: float, first: float, factor: float) -> str:
    if not math.isfinite(loss):
        return f"diverged: loss is {loss}"
    if loss > factor * max(first, 1e-8):
        return f"diverged: loss {loss:.4g} exceeds {factor:g}x its first value {first:.4g}"
    return ""


def _weight_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of each trained Linear/Conv layer: 'linear1', 'conv2d2', … in forward
    order; frozen layers keep their numbers, so a name means one layer throughout a run."""
    counts: dict[str, int] = {}
    layers = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = type(module).__name__.lower()
            counts[kind] = counts.get(kind, 0) + 1
            if module.weight.requires_grad:
                layers.append((f"{kind}{counts[kind]}", module.weight))
    return layers


def data_for(config: TrainConfig) -> Data:
    """The data a config trains on (cached per process), for tools that need it outside `train`."""
    return load_data(config.data, device=resolve_device(config.device))
