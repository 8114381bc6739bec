"""Train an MLP classifier on FashionMNIST: a standalone script that hpsearch runs once per
trial (`trainer: {command: [python, train.py, ...]}` in study.yaml).

An ordinary script: `python train.py --lr 0.05 --epochs 3` trains and prints. Run by an
hpsearch worker it also reports each epoch to the worker (`search.report` prints a line
`@hpsearch {"epoch": 1, "val_loss": ...}` that the worker reads), keeps a checkpoint in
$HPSEARCH_CHECKPOINT_DIR so that the retry of a trial whose worker died goes on from its last
epoch, and under `hpsearch retrain` ($HPSEARCH_FINAL=1) trains on train+validation and reports
the test set's metrics with its last epoch.
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import search  # cheap: imports neither torch nor Optuna

MEAN, STD = 0.2860, 0.3530  # FashionMNIST's training pixels, in [0, 1] units
EVAL_BATCH = 2048


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: [N, 28, 28] images or [N] labels."""
    if not path.is_file():
        path = path.with_name(path.name + ".gz")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    dims = raw[3]  # the magic number's last byte: how many dimensions follow
    shape = np.frombuffer(raw, dtype=">u4", count=dims, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 784] normalized, labels [N]) of part "train" or "t10k"."""
    images = read_idx(data_dir / f"{part}-images-idx3-ubyte")
    labels = read_idx(data_dir / f"{part}-labels-idx1-ubyte")
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over all of x."""
    model.eval()
    loss = correct = 0.0
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH), strict=True):
        logits = model(xb)
        loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128, help="units of the hidden layer")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--subset", type=int, default=60000,
                   help="training images used, a seeded subset; a fifth are validation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="the four idx files, gzipped or not (Debian's dataset-fashion-mnist)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    final = search.is_final()  # under `hpsearch retrain`: fit train+validation, then test
    seed = int(os.environ.get("HPSEARCH_SEED") or 0)  # retrain's seeds; the search uses 0
    torch.manual_seed(seed)

    x, y = load(args.data_dir, "train")
    # The same seeded subset and split in every trial: trials differ only in their params.
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:args.subset]
    n_val = len(chosen) // 5
    train_idx = chosen if final else chosen[n_val:]
    x_train, y_train = x[train_idx].to(args.device), y[train_idx].to(args.device)
    if final:
        x_eval, y_eval = (t.to(args.device) for t in load(args.data_dir, "t10k"))
    else:
        x_eval, y_eval = x[chosen[:n_val]].to(args.device), y[chosen[:n_val]].to(args.device)

    model = nn.Sequential(nn.Linear(784, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, 10)).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    order = torch.Generator().manual_seed(seed)  # the batch order, checkpointed with the rest

    folder = search.checkpoint_dir()  # None when run by hand
    checkpoint = folder / "last.pt" if folder else None
    done = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=args.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["order_rng"])
        done = state["epoch"]
        print(f"resumed from the checkpoint of epoch {done}", flush=True)

    for epoch in range(done + 1, args.epochs + 1):
        total = torch.zeros((), device=args.device)  # summed there: no sync per step
        shuffled = torch.randperm(len(y_train), generator=order).to(args.device)
        for batch in shuffled.split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch)
        metrics = {"train_loss": total.item() / len(y_train)}
        if not final:
            metrics["val_loss"], metrics["val_accuracy"] = evaluate(model, x_eval, y_eval)
        elif epoch == args.epochs:  # retrain takes the last report as the test result
            metrics["test_loss"], metrics["test_accuracy"] = evaluate(model, x_eval, y_eval)
        search.report(epoch, **metrics)  # the worker may stop this process here (pruned)
        if checkpoint is not None:
            # Written aside, then renamed: a process killed mid-write leaves the last good one.
            torch.save({"epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "order_rng": order.get_state()},
                       checkpoint.with_suffix(".tmp"))
            os.replace(checkpoint.with_suffix(".tmp"), checkpoint)


if __name__ == "__main__":
    main()
