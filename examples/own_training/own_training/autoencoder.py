"""A fully-connected autoencoder on FashionMNIST, trained by its own loop: `fit(params, trial)`.

Not a classifier, so not something the built-in trainer does: the objective is `val_recon`,
the mean squared error per pixel (normalized units) of reconstructing validation images from
a `code`-number bottleneck. hpsearch calls `fit` in a worker with one trial's params (the
study's `space` and `fixed` keys) and a `search.Trial`; the loop reports every epoch (the
pruner may stop it there) and checkpoints every epoch, so a retry after its worker died goes on
from the last epoch it finished.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import trainers

if TYPE_CHECKING:
    import search

EVAL_BATCH = 1024


class Autoencoder(nn.Module):
    """784 → hidden → code → hidden → 784, ReLU between; the output has the input's shape."""

    def __init__(self, hidden: int, code: int, pixels: int = 28 * 28) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(),
                                     nn.Linear(hidden, code))
        self.decoder = nn.Sequential(nn.ReLU(), nn.Linear(code, hidden), nn.ReLU(),
                                     nn.Linear(hidden, pixels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view_as(x)


@torch.no_grad()
def reconstruction_loss(model: nn.Module, images: torch.Tensor) -> float:
    """Mean squared error per pixel over all of `images`."""
    model.eval()
    total = sum(nn.functional.mse_loss(model(x), x, reduction="sum").item()
                for x in images.split(EVAL_BATCH))
    model.train()
    return total / images.numel()


def fit(params: dict[str, Any], trial: search.Trial) -> dict[str, float] | None:
    """Train for `trial.epochs` epochs from the last checkpoint, reporting `train_recon` and
    `val_recon` each epoch. Under `hpsearch retrain` (`trial.final`) train on train+validation
    and return the test set's `test_recon`."""
    if trial.threads:
        torch.set_num_threads(trial.threads)
    config = trainers.DataConfig(dataset="fashion_mnist", train_subset=params.get("train_subset"))
    # Normalized image tensors, already on the device; validation is a seeded 20% of train.
    data = trainers.load_data(config, device=trial.device, include_test=trial.final,
                              merge_val=trial.final)
    # Every trial starts from the same weights and batch order (seed 0; retrain's seeds vary
    # them): differences between trials are the hyperparameters', not the luck of the draw.
    seed = trial.seed or 0
    torch.manual_seed(seed)
    model = Autoencoder(params["hidden"], params["code"]).to(trial.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params["lr"],
                                  weight_decay=params["weight_decay"])
    order = torch.Generator().manual_seed(seed)  # the batch order: its own RNG, checkpointed

    done = 0
    state = trial.load_checkpoint()  # a retry's: where its dead trial got to
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["order_rng"])
        done = state["epoch"]

    images = data.train.x  # [N, 1, 28, 28]; the labels (data.train.y) are not needed
    for epoch in range(done + 1, trial.epochs + 1):
        total = torch.zeros((), device=images.device)  # summed there: no sync per step
        shuffled = torch.randperm(len(images), generator=order).to(images.device)
        for batch in shuffled.split(params["batch_size"]):
            x = images[batch]
            loss = nn.functional.mse_loss(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(x)
        metrics = {"train_recon": total.item() / len(images)}
        if data.val is not None:
            metrics["val_recon"] = reconstruction_loss(model, data.val.x)
        # Report, then checkpoint: a worker that dies between the two leaves the epoch before,
        # and the retry's report of this epoch again replaces the dead trial's.
        trial.report(epoch, **metrics)  # raises search.Pruned when the pruner says stop
        trial.save_checkpoint({"epoch": epoch, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(),
                               "order_rng": order.get_state()})

    if trial.final:
        return {"test_recon": reconstruction_loss(model, data.test.x)}
    return None  # the objective, val_recon, is the last epoch's report
