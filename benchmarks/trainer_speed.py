"""Trainer speed, side by side in one run: our trainer vs the textbook pipeline vs a bare loop.

FashionMNIST, the seed network (784-128-56-10), SGD, all cores. Per training epoch (no
validation), median over the timed epochs after one warm-up epoch:
  (a) `trainers.train`
  (b) the textbook pipeline: torchvision's FashionMNIST with ToTensor() and a shuffling DataLoader
  (c) a bare hand-written loop over preloaded, normalized tensors
Ends with `name: value` lines. Ratios are the result; absolute times on this noisy machine are
context only.

    .venv/bin/python benchmarks/trainer_speed.py [--epochs 3] [--batch-sizes 256,32,1024]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import trainers
from trainers._data import find_data_dir

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def seed_network() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 56),
                         nn.ReLU(), nn.Linear(56, 10))


def ours(batch: int, epochs: int) -> list[float]:
    times: list[float] = []
    trainers.train(
        {"dataset": "fashion_mnist", "hidden": [128, 56], "optimizer": "sgd", "lr": 0.1,
         "batch_size": batch, "epochs": epochs + 1, "device": "cpu"},
        lambda m: times.append(m.train_seconds),
    )
    return times[1:]


def textbook(batch: int, epochs: int, root: Path) -> list[float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    ds = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    # The same 80% the trainer trains on, so every pipeline does the same work per epoch.
    n_train = int(len(ds) * 0.8)
    subset = torch.utils.data.Subset(ds, range(n_train))
    loader = DataLoader(subset, batch_size=batch, shuffle=True)
    torch.manual_seed(0)
    model = seed_network()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    times = []
    for _ in range(epochs + 1):
        t0 = time.perf_counter()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def bare(batch: int, epochs: int) -> list[float]:
    data = trainers.load_data(trainers.DataConfig(dataset="fashion_mnist"))
    x, y = data.train.x, data.train.y
    torch.manual_seed(0)
    model = seed_network()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    times = []
    for _ in range(epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def torchvision_root() -> Path:
    """torchvision wants the uncompressed idx files under <root>/FashionMNIST/raw/."""
    src = find_data_dir("fashion_mnist", None)
    root = Path(tempfile.mkdtemp(prefix="hpsearch-bench-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        gz = src / f"{name}.gz"
        if gz.exists():
            with gzip.open(gz, "rb") as f_in, open(raw / name, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            shutil.copy(src / name, raw / name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per pipeline")
    parser.add_argument("--batch-sizes", default="256,32,1024")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = torchvision_root()
    results: dict[int, dict[str, float]] = {}
    try:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            row = {}
            # Interleaved in one process, so drift in machine load hits all three alike.
            row["ours"] = statistics.median(ours(batch, args.epochs))
            row["bare"] = statistics.median(bare(batch, args.epochs))
            row["textbook"] = statistics.median(textbook(batch, max(1, args.epochs - 1), root))
            results[batch] = row
            print(f"batch {batch:>5}: ours {row['ours']:.3f} s/epoch, bare loop "
                  f"{row['bare']:.3f} s, textbook {row['textbook']:.3f} s  "
                  f"(ours/bare {row['ours'] / row['bare']:.2f}x, "
                  f"textbook/ours {row['textbook'] / row['ours']:.1f}x)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    main_batch = 256 if 256 in results else next(iter(results))
    row = results[main_batch]
    print(f"threads: {torch.get_num_threads()}")
    print(f"seconds_per_epoch_ours: {row['ours']:.3f}")
    print(f"seconds_per_epoch_bare_loop: {row['bare']:.3f}")
    print(f"seconds_per_epoch_textbook: {row['textbook']:.3f}")
    for batch, r in results.items():
        print(f"ratio_to_bare_loop_batch_{batch}: {r['ours'] / r['bare']:.3f}")
        print(f"speedup_vs_textbook_batch_{batch}: {r['textbook'] / r['ours']:.2f}")
    print(f"speedup_vs_textbook: {row['textbook'] / row['ours']:.2f}")
    print(f"ratio_to_bare_loop: {row['ours'] / row['bare']:.3f}")


if __name__ == "__main__":
    main()
