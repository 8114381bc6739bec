"""Fine-tuning against training from scratch: the same network, subset, search and budget.

One invocation, FashionMNIST, measured side by side:

1. pretrain: the CNN of studies/pretrain/fashion_cnn_0to4.yaml on classes 0-4, written to
   weights/fashion_cnn_0to4.pt (skipped when that file exists, unless --pretrain);
2. finetune: `hpsearch run studies/fashion_finetune.yaml` as shipped: classes 5-9, 1,000
   training images, searching freeze depth, head lr multiplier, unfreezing, BN statistics, lr,
   schedule and batch size from the pretrained weights;
3. scratch: the same study file without `model.weights` and without the knobs that only mean
   something with them (freeze_blocks, unfreeze_after, bn_stats): same network, same subset,
   same sampler and seed, same trial and epoch budget;
4. each arm's best trial goes through `hpsearch retrain --seeds N` (its 1,000 images plus their
   share of validation, tested once per seed on the 5,000 test images of classes 5-9).

Ends with `name: value` lines.

    .venv/bin/python benchmarks/finetune_vs_scratch.py [--seeds 3] [--trials 24] [--epochs 15]
        [--subset 1000]
        [--pretrain]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "fashion_finetune.yaml"
PRETRAIN = ROOT / "studies" / "pretrain" / "fashion_cnn_0to4.yaml"
ONLY_WITH_WEIGHTS = ("freeze_blocks", "unfreeze_after", "bn_stats", "freeze")


def hpsearch(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("hpsearch")), *args]
    print("$", " ".join(args[:2]), "…", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def arm(name: str, study: dict[str, Any], storage: str, folder: Path, seeds: int
        ) -> dict[str, Any]:
    study = {**study, "run": {"checkpoint_dir": str(folder / "checkpoints")}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    started = time.perf_counter()
    hpsearch("run", str(path), "--storage", storage, "--quiet")
    searched = time.perf_counter() - started
    out = folder / f"retrain-{name}"
    hpsearch("retrain", study["name"], "--storage", storage, "--seeds", str(seeds),
             "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    import optuna

    best = optuna.load_study(study_name=study["name"], storage=storage).best_trial
    return {"search_seconds": searched, "best_val_loss": best.value,
            "best_val_accuracy": best.user_attrs["history"][-1]["val_accuracy"],
            "best_params": best.params, "test": results["test_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, help="trial budget of each arm (default: the file's)")
    parser.add_argument("--epochs", type=int,
                        help="epoch budget of each trial (default: the file's)")
    parser.add_argument("--subset", type=int,
                        help="training images of classes 5-9 (default: the file's 1000)")
    parser.add_argument("--pretrain", action="store_true", help="pretrain even if weights exist")
    args = parser.parse_args()
    for flag in ("seeds", "trials", "epochs", "subset"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag}: expected 1 or more, got {value}")

    finetune = yaml.safe_load(STUDY.read_text())
    weights = ROOT / finetune["model"]["weights"]
    if args.pretrain or not weights.exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainers", str(PRETRAIN), "--save", str(weights)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        print(f"pretrained {weights.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s")
    if args.trials:
        finetune["budget"]["trials"] = args.trials
    if args.epochs:
        finetune["budget"]["epochs"] = args.epochs
    if args.subset:
        finetune["data"]["train_subset"] = args.subset
    scratch = json.loads(json.dumps(finetune))
    scratch["name"] = "fashion-scratch"
    del scratch["model"]["weights"]
    for knob in ONLY_WITH_WEIGHTS:
        scratch["space"].pop(knob, None)

    results = {}
    with tempfile.TemporaryDirectory(prefix="hpsearch-finetune-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("HPSEARCH_ARTIFACTS", str(folder / "artifacts"))
        storage = f"sqlite:///{folder / 'bench.db'}"
        for name, study in (("finetune", finetune), ("scratch", scratch)):
            results[name] = arm(name, study, storage, folder, args.seeds)
            r = results[name]
            print(f"{name}: search {r['search_seconds']:.0f} s, best val loss "
                  f"{r['best_val_loss']:.4f} (val acc {r['best_val_accuracy']:.4f}), test acc "
                  f"{r['test']['mean']:.4f} ± {r['test']['std']:.4f} over {args.seeds} seeds; "
                  f"best {r['best_params']}", flush=True)

    ft, sc = results["finetune"], results["scratch"]
    print(f"\n# {dt.date.today()}, {os.cpu_count()} cores, {finetune['data']['train_subset']} "
          f"training images, budget {finetune['budget']['trials']} trials x "
          f"{finetune['budget']['epochs']} epochs per arm")
    lines = {
        "finetune_test_accuracy": ft["test"]["mean"],
        "finetune_test_accuracy_std": ft["test"]["std"],
        "scratch_test_accuracy": sc["test"]["mean"],
        "scratch_test_accuracy_std": sc["test"]["std"],
        "test_accuracy_gain": ft["test"]["mean"] - sc["test"]["mean"],
        "finetune_best_val_loss": ft["best_val_loss"],
        "scratch_best_val_loss": sc["best_val_loss"],
        "finetune_search_seconds": ft["search_seconds"],
        "scratch_search_seconds": sc["search_seconds"],
    }
    for key, value in lines.items():
        print(f"{key}: {value:.4f}" if "seconds" not in key else f"{key}: {value:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
