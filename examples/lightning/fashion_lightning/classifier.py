"""A small MLP classifying FashionMNIST, trained by Lightning: `fit(params, trial)`.

hpsearch calls `fit` in a worker with one trial's params (the study's `space` and `fixed`
keys) and a `search.Trial`. Lightning runs the loop; `HpsearchCallback` reports each epoch's
logged metrics (the pruner may stop the fit there), checkpoints every epoch into the trial's
folder, and `ckpt_path=hp.resume_from` makes a retry after its worker died go on from there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

import trainers
from search.integrations.lightning import HpsearchCallback

if TYPE_CHECKING:
    import search

EVAL_BATCH = 1024


class Classifier(L.LightningModule):
    """784 → hidden → hidden → 10, ReLU and dropout between; AdamW with a cosine schedule."""

    def __init__(self, hidden: int, dropout: float, lr: float, weight_decay: float,
                 classes: int = 10, pixels: int = 28 * 28) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        accuracy = (logits.argmax(1) == y).float().mean()
        # on_epoch: averaged over the epoch, weighted by batch size (the last one is smaller)
        self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(f"{split}_accuracy", accuracy, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        # Decay the weight matrices only, not biases (nanoGPT's rule: parameters of 2+ dims).
        params = [{"params": [p for p in self.parameters() if p.dim() >= 2],
                   "weight_decay": self.weight_decay},
                  {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)
        return [optimizer], [schedule]


def loader(split: trainers.Split, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches sliced from the tensors already in memory: one index per batch, not per image
    (a DataLoader over single items spends more time collating than this MLP trains)."""
    data = TensorDataset(split.x, split.y)
    order = (RandomSampler(data, generator=torch.Generator().manual_seed(seed)) if shuffle
             else SequentialSampler(data))
    return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last=False),
                      batch_size=None)


def fit(params: dict[str, Any], trial: search.Trial) -> dict[str, float] | None:
    """Train for `trial.epochs` epochs (from the trial's last checkpoint, if it has one); the
    callback reports `val_accuracy`, `val_loss`, `train_accuracy` and `train_loss` each epoch.
    Under `hpsearch retrain` (`trial.final`) train on train+validation and return the test
    set's `test_accuracy` and `test_loss`."""
    if trial.threads:
        torch.set_num_threads(trial.threads)
    # Lightning's notes on each Trainer (devices, tips, "fit stopped") in every trial's output:
    # hpsearch prints each trial's line already. Its warnings still show.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = trainers.DataConfig(dataset="fashion_mnist", train_subset=params.get("train_subset"))
    # Normalized image tensors (on the CPU: Lightning moves each batch to the accelerator);
    # validation is a seeded 20% of the training set.
    data = trainers.load_data(config, include_test=trial.final, merge_val=trial.final)
    seed = trial.seed or 0  # the same start for every trial: differences are the params'
    torch.manual_seed(seed)
    model = Classifier(params["hidden"], params["dropout"], params["lr"], params["weight_decay"])
    hp = HpsearchCallback(trial)
    trainer = L.Trainer(max_epochs=trial.epochs, callbacks=[hp],
                        accelerator="gpu" if trial.device.startswith("cuda") else "cpu",
                        devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    val = loader(data.val, EVAL_BATCH, shuffle=False) if data.val is not None else None
    trainer.fit(model, loader(data.train, params["batch_size"], shuffle=True, seed=seed), val,
                ckpt_path=hp.resume_from)  # a retry's: where its dead trial got to
    if trial.final:
        test = loader(data.test, EVAL_BATCH, shuffle=False)
        return trainer.test(model, test, verbose=False)[0]
    return None  # the objective, val_accuracy, is the last epoch's report
