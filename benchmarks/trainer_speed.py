"""Trainer speed, side by side in one run: our trainer vs the textbook pipeline vs a bare loop.

FashionMNIST, the seed network (784-128-56-10), SGD, all cores. Per training epoch (no
validation), median over the timed epochs after one warm-up epoch:
  (a) `trainers.train`
  (b) the textbook pipeline: torchvision's FashionMNIST with ToTensor() and a shuffling DataLoader
  (c) a bare hand-written loop over preloaded, normalized tensors
  (d) `trainers.train` with the same network as a user's own, by import path
      (`model.type: trainer_speed:seed_model`): the on-device path for users' models
Then the conv nets, on a seeded subset of the same training data (`--conv-subset`): the CBR
CNN of studies/fashion_cnn.yaml and resnet18 (small stem, 1x28x28), batch 128, SGD, ours against
a plain DataLoader loop (torchvision dataset, ToTensor + Normalize, the same network built by
`trainers`). Where CUDA is present, (a) and (c) also run on the GPU (`ratio_to_bare_loop_cuda_*`,
`speedup_cuda_over_cpu_*`), the conv nets train on the GPU, and ours also runs with
`channels_last` and with mixed precision (`amp`).
Ends with `name: value` lines. Ratios are the result; absolute times on this noisy machine are
context only.

    .venv/bin/python benchmarks/trainer_speed.py [--epochs 3] [--batch-sizes 256,32,1024]
        [--conv-models cnn,resnet18] [--conv-subset cnn=4096,resnet18=512]
"""

from __future__ import annotations

import argparse
import gzip
import math
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


def seed_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The seed network as a user's own builder (`model.type: trainer_speed:seed_model`)."""
    return seed_network()


def ours(batch: int, epochs: int, device: str = "cpu", model: str = "mlp") -> list[float]:
    times: list[float] = []
    network = {"type": "mlp", "hidden": [128, 56]} if model == "mlp" else {"type": model}
    trainers.train(
        {"dataset": "fashion_mnist", "model": network, "optimizer": "sgd", "lr": 0.1,
         "batch_size": batch, "epochs": epochs + 1, "device": device},
        lambda m: times.append(m.train_seconds),
    )
    return times[1:]


USER_MODEL = "trainer_speed:seed_model"


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


def bare(batch: int, epochs: int, device: str = "cpu") -> list[float]:
    data = trainers.load_data(trainers.DataConfig(dataset="fashion_mnist"),
                              device=torch.device(device))
    x, y = data.train.x, data.train.y
    torch.manual_seed(0)
    model = seed_network().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    times = []
    for _ in range(epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(x.shape[0], device=device)
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


CONV_NETS = {"cnn": {"type": "cnn", "widths": [32, 64], "blocks": 1},
             "resnet18": {"type": "resnet18"}}
CONV_BATCH = 128


def conv_config(name: str, subset: int, epochs: int, device: str, **execution) -> dict:
    return {"data": {"dataset": "fashion_mnist", "val_fraction": 0.0, "train_subset": subset},
            "model": CONV_NETS[name], "optimizer": "sgd", "lr": 0.05, "batch_size": CONV_BATCH,
            "epochs": epochs + 1, "device": device, **execution}


def ours_conv(name: str, subset: int, epochs: int, device: str, **execution) -> list[float]:
    times: list[float] = []
    trainers.train(conv_config(name, subset, epochs, device, **execution),
                   lambda m: times.append(m.train_seconds))
    return times[1:]


def dataloader_conv(name: str, subset: int, epochs: int, device: str, root: Path) -> list[float]:
    """What one writes by hand: a torchvision dataset, a DataLoader, batches moved per step."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from trainers._models import build_model

    config = trainers.config_from_dict(conv_config(name, subset, epochs, device))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))])
    ds = datasets.FashionMNIST(root, train=True, download=False, transform=tf)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:subset]
    loader = DataLoader(torch.utils.data.Subset(ds, order.tolist()), batch_size=CONV_BATCH,
                        shuffle=True, pin_memory=device == "cuda")
    torch.manual_seed(0)
    model = build_model(config.model, (1, 28, 28), 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return loader_epochs(loader, model, opt, device, epochs + 1)[1:]


def loader_epochs(loader: torch.utils.data.DataLoader, model: nn.Module,
                  optimizer: torch.optim.Optimizer, device: str, epochs: int) -> list[float]:
    """Seconds of each of `epochs` epochs of a hand-written loop over a DataLoader."""
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def conv_rows(models: list[str], subsets: dict[str, int], epochs: int, root: Path
              ) -> dict[str, dict[str, float]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {}
    for name in models:
        n = subsets[name]
        row = {"ours": statistics.median(ours_conv(name, n, epochs, device)),
               "dataloader": statistics.median(dataloader_conv(name, n, epochs, device, root))}
        if device == "cuda":
            row["ours_channels_last"] = statistics.median(
                ours_conv(name, n, epochs, device, channels_last=True))
            row["ours_amp"] = statistics.median(ours_conv(name, n, epochs, device, amp=True))
            row["ours_amp_channels_last"] = statistics.median(
                ours_conv(name, n, epochs, device, amp=True, channels_last=True))
        rows[name] = {**row, "images": n}
        extra = "".join(f", {k} {v:.3f} s" for k, v in row.items()
                        if k not in ("ours", "dataloader"))
        print(f"{name} on {device}, {n} images/epoch: ours {row['ours']:.3f} s/epoch "
              f"({n / row['ours']:.0f} img/s), DataLoader loop {row['dataloader']:.3f} s "
              f"(dataloader/ours {row['dataloader'] / row['ours']:.2f}x){extra}", flush=True)
    return rows


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
    parser.add_argument("--conv-models", default="cnn,resnet18",
                        help="conv nets to time against a DataLoader loop ('' for none)")
    parser.add_argument("--conv-subset", default="cnn=4096,resnet18=512",
                        help="training images per conv epoch, per model")
    args = parser.parse_args()
    subsets = {k: int(v) for k, v in (kv.split("=") for kv in args.conv_subset.split(","))}
    conv_models = [m for m in args.conv_models.split(",") if m]
    torch.set_num_threads(os.cpu_count() or 1)
    root = torchvision_root()
    results: dict[int, dict[str, float]] = {}
    n_train = trainers.load_data(trainers.DataConfig(dataset="fashion_mnist")).train.x.shape[0]
    try:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            row = {}
            # Interleaved in one process, so drift in machine load hits all three alike.
            row["ours"] = statistics.median(ours(batch, args.epochs))
            row["bare"] = statistics.median(bare(batch, args.epochs))
            row["user"] = statistics.median(ours(batch, args.epochs, model=USER_MODEL))
            row["textbook"] = statistics.median(textbook(batch, max(1, args.epochs - 1), root))
            if torch.cuda.is_available():
                row["ours_cuda"] = statistics.median(ours(batch, args.epochs, "cuda"))
                row["bare_cuda"] = statistics.median(bare(batch, args.epochs, "cuda"))
                row["user_cuda"] = statistics.median(ours(batch, args.epochs, "cuda",
                                                          model=USER_MODEL))
            results[batch] = row
            print(f"batch {batch:>5}: ours {row['ours']:.3f} s/epoch, bare loop "
                  f"{row['bare']:.3f} s, textbook {row['textbook']:.3f} s  "
                  f"(ours/bare {row['ours'] / row['bare']:.2f}x, "
                  f"textbook/ours {row['textbook'] / row['ours']:.1f}x); import-path model "
                  f"{row['user']:.3f} s (/bare {row['user'] / row['bare']:.2f}x)", flush=True)
            if "ours_cuda" in row:
                steps = math.ceil(n_train / batch)
                print(f"batch {batch:>5} on cuda: ours {row['ours_cuda']:.3f} s/epoch "
                      f"({1000 * row['ours_cuda'] / steps:.3f} ms/step), bare loop "
                      f"{row['bare_cuda']:.3f} s (ours/bare "
                      f"{row['ours_cuda'] / row['bare_cuda']:.2f}x, cpu/cuda "
                      f"{row['ours'] / row['ours_cuda']:.2f}x)", flush=True)
        conv = conv_rows(conv_models, subsets, max(1, args.epochs - 1), root)
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
        print(f"ratio_to_bare_loop_import_path_batch_{batch}: {r['user'] / r['bare']:.3f}")
        print(f"speedup_vs_textbook_batch_{batch}: {r['textbook'] / r['ours']:.2f}")
        if "ours_cuda" in r:
            print(f"ratio_to_bare_loop_cuda_batch_{batch}: {r['ours_cuda'] / r['bare_cuda']:.3f}")
            print(f"ratio_to_bare_loop_import_path_cuda_batch_{batch}: "
                  f"{r['user_cuda'] / r['bare_cuda']:.3f}")
            print(f"speedup_cuda_over_cpu_batch_{batch}: {r['ours'] / r['ours_cuda']:.2f}")
    for name, r in conv.items():
        print(f"seconds_per_epoch_{name}_ours: {r['ours']:.3f}")
        print(f"seconds_per_epoch_{name}_dataloader: {r['dataloader']:.3f}")
        print(f"speedup_vs_dataloader_{name}: {r['dataloader'] / r['ours']:.2f}")
        for key in ("ours_channels_last", "ours_amp", "ours_amp_channels_last"):
            if key in r:
                print(f"speedup_{key.removeprefix('ours_')}_{name}: {r['ours'] / r[key]:.2f}")
    print(f"speedup_vs_textbook: {row['textbook'] / row['ours']:.2f}")
    print(f"ratio_to_bare_loop: {row['ours'] / row['bare']:.3f}")


if __name__ == "__main__":
    main()
