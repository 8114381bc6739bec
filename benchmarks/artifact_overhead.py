"""What a trial's artifacts cost: charts + metrics.json uploaded vs. the trial's training time.

FashionMNIST and the seed MLP (784-128-56-10), as `studies/fashion_mlp.yaml` trains it: each
row trains one config for E epochs (the lengths Hyperband leaves trials at: pruned after 1 or 3,
completed at 8), then records its artifacts into a real SQLite study and file store, the same
call the objective makes. Recording is timed in-process (it adds exactly its own time to a
trial). Both sides are repeated and their minimum taken: on a shared 2-core machine another
process can stretch any single run several times over, and the minimum is the uncontended cost
(the medians are printed alongside).

    .venv/bin/python benchmarks/artifact_overhead.py [--epochs 1,3,8] [--batch 256] [--repeat 9]

Ends with `name: value` lines (artifact_ms_<E>ep, train_s_<E>ep, artifact_share_<E>ep) and
`artifact_share_study`: the share over a Hyperband-like mix (trials pruned at 1 and 2 epochs
and completed at 8, in the proportions of a quickstart run of studies/fashion_mlp.yaml on this
machine: 30 trials, 8 pruned at <= 1 epoch, 11 at 3, 11 completed at 8).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna

import trainers
from search.storage import open_artifact_store
from search.trial import ArtifactRecorder

# Trials of a quickstart fashion-mlp run by epochs run (Hyperband, 30 trials, 2026-11-22).
STUDY_MIX = {1: 8, 3: 11, 8: 11}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="1,3,8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=9, help="artifact recordings per row")
    parser.add_argument("--repeat-train", type=int, default=3, help="trainings per row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    lengths = [int(e) for e in args.epochs.split(",")]

    base = {"data": {"dataset": "fashion_mnist"}, "model": {"type": "mlp", "hidden": [128, 56]},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "schedule": {"name": "cosine"}, "batch_size": args.batch, "device": "cpu",
            "threads": args.threads}
    trainers.train(trainers.config_from_dict({**base, "epochs": 1}))  # load + cache the data

    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'bench.db'}"
        study = optuna.create_study(storage=storage)
        store_dir = Path(tmp) / "bench.db.artifacts"
        recorder = ArtifactRecorder(open_artifact_store(str(store_dir)), location=str(store_dir))
        results: dict[int, tuple[float, float]] = {}
        # The schedule spans the full budget; a pruned run stops partway.
        config = trainers.config_from_dict({**base, "epochs": max(lengths)})
        for epochs in lengths:

            def stop(m: trainers.EpochMetrics, stop_at: int = epochs) -> None:
                if stop_at <= m.epoch < config.epochs:
                    raise trainers.StopTraining(f"pruned at epoch {m.epoch}")

            runs = [trainers.train(config, stop) for _ in range(args.repeat_train)]
            result = min(runs, key=lambda r: r.seconds)
            train_times = [r.seconds for r in runs]
            times = []
            for _ in range(args.repeat):
                trial = study.ask()
                started = time.perf_counter()
                spent = recorder.record(trial, result, config)
                times.append(time.perf_counter() - started)
                assert spent is not None, "recording failed (see the warning above)"
                study.tell(trial, 0.0)
            results[epochs] = (min(times), min(train_times))
            print(f"{epochs} epoch(s): train min {min(train_times):.3f} s (median "
                  f"{statistics.median(train_times):.3f}), artifacts min {min(times) * 1000:.1f} "
                  f"ms (median {statistics.median(times) * 1000:.1f}) = "
                  f"{min(times) / min(train_times):.1%} of the trial")

    for epochs, (art, train) in results.items():
        print(f"artifact_ms_{epochs}ep: {art * 1000:.1f}")
        print(f"train_s_{epochs}ep: {train:.3f}")
        print(f"artifact_share_{epochs}ep: {art / train:.4f}")
    if set(STUDY_MIX) <= set(results):
        art = sum(n * results[e][0] for e, n in STUDY_MIX.items())
        train = sum(n * results[e][1] for e, n in STUDY_MIX.items())
        print(f"artifact_share_study: {art / train:.4f}")

if __name__ == "__main__":
    main()
