"""`python -m trainers CONFIG.yaml`: train one configuration without any study, for debugging.

The file holds trainer knobs, nested (``optimizer: {name: sgd, lr: 0.1}``) or flat
(``optimizer: sgd``, ``lr: 0.1``); `hpsearch best NAME --format yaml` writes such a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file of trainer settings")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--checkpoint", help="directory to checkpoint into and resume from")
    parser.add_argument("--save", metavar="PATH",
                        help="write the trained weights (a state dict) here, e.g. to fine-tune "
                             "from them with model.weights")
    parser.add_argument("--test", action="store_true",
                        help="train on train+validation and evaluate the test set once at the end")
    args = parser.parse_args(argv)

    import yaml

    from trainers import CheckpointStore, TrainerError, config_from_dict, train

    try:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
            raw = raw["config"]  # the `hpsearch best` format: params under `config:`
        config = config_from_dict(raw)
        overrides = {k: v for k, v in (("epochs", args.epochs), ("device", args.device)) if v}
        config = config.replace(**overrides) if overrides else config
    except (OSError, yaml.YAMLError, TrainerError) as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2

    save = Path(args.save) if args.save else None
    if save is not None:
        try:  # before training, not after: a bad path must not cost a whole run
            save.parent.mkdir(parents=True, exist_ok=True)
            if save.is_dir() or not os.access(save.parent, os.W_OK):
                raise OSError(f"cannot write a file at {save}")
        except OSError as e:
            print(f"error: --save: {e}", file=sys.stderr)
            return 2

    print(f"training {config.model.type} on {config.data.dataset}: {config.optimizer.name} "
          f"lr={config.optimizer.lr:g}, batch {config.batch_size}, {config.schedule.name} "
          f"schedule, {config.epochs} epochs")
    print(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8} "
          f"{'lr':>9} {'sec':>6}")

    def show(m) -> None:
        print(f"{m.epoch:>5} {m.train_loss:>10.4f} {m.train_accuracy:>9.4f} {m.val_loss:>9.4f} "
              f"{m.val_accuracy:>8.4f} {m.lr:>9.3g} {m.epoch_seconds:>6.2f}", flush=True)

    store = CheckpointStore(args.checkpoint) if args.checkpoint else None
    if config.model.weights:
        print(f"starting from {config.model.weights}")
    try:
        result = train(config, show, store, evaluate_test=args.test, merge_val=args.test)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"  {note}")
    print(f"{result.status}: {result.reason} in {result.seconds:.1f} s")
    if save is not None and result.model is not None and result.status != "diverged":
        import torch

        tmp = save.with_name(save.name + ".tmp")
        torch.save(result.model.state_dict(), tmp)
        tmp.replace(save)  # whole or absent: a worker never reads a half-written file
        print(f"weights: {save}")
    if result.test_accuracy is not None:
        print(f"test: loss {result.test_loss:.4f}, accuracy {result.test_accuracy:.4f}")
    return 0 if result.status != "diverged" else 1


if __name__ == "__main__":
    sys.exit(main())
