"""The streaming path, side by side in one run: `image_folder` against a hand DataLoader loop.

FashionMNIST's 60,000 training images are written as PNG files (one folder per class, by
examples/own_model/make_images.py) into a temporary folder; then, alternating in rounds:
  (a) ours: `trainers.train` on `data: {dataset: image_folder, root: ...}` with `num_workers`
      DataLoader workers, the whole folder as the train split (val_fraction 0);
  (b) hand: torchvision's `ImageFolder` over the same folder with Grayscale + ToTensor +
      Normalize, a shuffling `DataLoader` with the same workers and batch size, persistent
      workers, and the same network and optimizer, in a hand-written loop.
The network is the seed MLP (784-128-56-10), SGD. Per training epoch (no validation), the
median over the timed epochs (each round's first epoch is a warm-up). Ends with `name: value`
lines: `streaming_epoch_ratio` is ours / hand (goal <= 1.10). With CUDA present, `--device
cuda` runs both on the GPU with pinned memory.

    .venv/bin/python benchmarks/streaming_epoch.py [--images 60000] [--workers 2]
        [--batch-size 256] [--epochs 3] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from trainer_speed import loader_epochs, seed_network

import trainers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "own_model"))

from make_images import write  # noqa: E402 - the example's own writer of the PNG folder


def ours(root: Path, args: argparse.Namespace) -> list[float]:
    result = trainers.train({
        "data": {"dataset": "image_folder", "root": str(root), "val_fraction": 0.0,
                 "num_workers": args.workers},
        "model": {"type": "mlp", "hidden": [128, 56]}, "optimizer": "sgd", "lr": 0.1,
        "batch_size": args.batch_size, "epochs": args.epochs, "device": args.device,
        "seed": 0,
    })
    return [m.train_seconds for m in result.history[1:]]


def hand(root: Path, args: argparse.Namespace) -> list[float]:
    from torchvision import datasets, transforms

    device = torch.device(args.device)
    transform = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(),
                                    transforms.Normalize((0.2860,), (0.3530,))])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, persistent_workers=True,
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = seed_network().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return loader_epochs(loader, model, optimizer, args.device, args.epochs)[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="per round, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", help="an existing folder of the PNGs (else a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.folder or tmp)
        root = out / "train"
        if not root.is_dir():
            t0 = time.perf_counter()
            write(out, args.images, 0)
            print(f"wrote {args.images} PNGs in {time.perf_counter() - t0:.0f} s", flush=True)
        timings: dict[str, list[float]] = {"ours": [], "hand": []}
        for r in range(args.rounds):
            for name, run in (("ours", ours), ("hand", hand)):
                times = run(root, args)
                timings[name] += times
                print(f"round {r + 1} {name}: " + ", ".join(f"{t:.2f} s" for t in times),
                      flush=True)
        med = {k: statistics.median(v) for k, v in timings.items()}
        print(f"\n{args.images} PNGs, batch {args.batch_size}, {args.workers} DataLoader "
              f"workers, {args.device}, {torch.get_num_threads()} threads")
        print(f"{'':8} {'s/epoch':>8} {'images/s':>9}")
        for k, v in med.items():
            print(f"{k:8} {v:8.2f} {args.images / v:9.0f}")
        print(f"\nstreaming_epoch_ratio: {med['ours'] / med['hand']:.3f}")
        print(f"ours_seconds_per_epoch: {med['ours']:.2f}")
        print(f"hand_seconds_per_epoch: {med['hand']:.2f}")


if __name__ == "__main__":
    main()
