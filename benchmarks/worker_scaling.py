"""Worker scaling, side by side in one run.

1. The seed MLP on FashionMNIST (fixed epochs, no pruning): `hpsearch run --workers 1` (one
   process, all cores) vs `--workers 2` (two processes, one core each). Throughput is trials per
   minute from the first trial's start to the last trial's end (process start-up excluded).
2. 8 worker processes of a trivial trainer (sleeps per epoch) on PostgreSQL, directly and
   through the gRPC storage proxy: trials per second and errors.

    .venv/bin/python benchmarks/worker_scaling.py [--trials 24] [--epochs 4] [--skip-trivial]

Ends with `name: value` lines, including `speedup_2_workers`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
POSTGRES = os.environ.get("HPSEARCH_TEST_POSTGRES",
                          "postgresql+psycopg2://postgres@127.0.0.1:5432/test")

def seed_mlp_spec(name: str, trials: int, epochs: int, tmp: Path) -> Path:
    spec = {
        "name": name,
        "budget": {"trials": trials, "epochs": epochs},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "data": {"dataset": "fashion_mnist"},
        "model": {"type": "mlp", "hidden": [128, 56]},
        "space": {"lr": {"low": 0.01, "high": 0.2, "log": True}},
        "fixed": {"optimizer": "nesterov", "batch_size": 256},
        "run": {"checkpoint_dir": str(tmp / "ckpt")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path

def throughput(url: str, name: str) -> tuple[float, int, int]:
    """Trials per minute between the first start and the last end; (rate, finished, failed)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=url)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    failed = len(study.get_trials(states=(TrialState.FAIL,)))
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    return len(done) / span * 60, len(done), failed

def real_scaling(trials: int, epochs: int, tmp: Path) -> dict[str, float]:
    url = f"sqlite:///{tmp / 'scaling.db'}"
    out: dict[str, float] = {}
    for workers in (1, 2):
        name = f"scaling-{workers}w-{uuid.uuid4().hex[:6]}"
        path = seed_mlp_spec(name, trials, epochs, tmp)
        subprocess.run([HPSEARCH, "run", str(path), "--storage", url, "--workers",
                        str(workers), "--gpus", "none"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        rate, done, failed = throughput(url, name)
        out[f"trials_per_minute_{workers}_worker{'s' * (workers > 1)}"] = rate
        print(f"{workers} worker(s): {done} trials, {rate:.1f} trials/min, {failed} failed",
              flush=True)
    return out

TRIVIAL_WORKER = """
import sys, time
sys.path.insert(0, {bench!r})
import service_overhead as so
import trainers
from search.storage._locks import budget_lock
from search.storage._open import open_storage
from search.run import load, reseed
from search.storage import quiet_optuna_warnings
from search.workers import run_worker
quiet_optuna_warnings()
trainers.train = so.fake_train
url, name, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
study, spec = load(name, open_storage(url, heartbeat_interval=5, grace_period=30))
reseed(study, spec, index)
lock = budget_lock(url, name) if not url.startswith("grpc") else None
run_worker(study, spec, device="cpu", lock=lock)
"""

def trivial_many(url: str, label: str, n_workers: int, trials: int, tmp: Path,
                 create_url: str) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import service_overhead as so

    from search.run import create_or_load
    from search.spec import parse_spec
    from search.storage import open_storage

    name = f"many-{label}-{uuid.uuid4().hex[:6]}"
    spec = parse_spec({"name": name, "budget": {"trials": trials, "epochs": so.EPOCHS},
                       "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
                       "data": {"dataset": "synthetic"}, "model": {"hidden": [8]},
                       "space": so.SPACE, "run": {"checkpoint_dir": str(tmp / "ckpt")}})
    create_or_load(spec, open_storage(create_url))
    script = TRIVIAL_WORKER.format(bench=str(ROOT / "benchmarks"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", script, url, name, str(i)], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(n_workers)]
    errors = 0
    for p in procs:
        _, err = p.communicate(timeout=600)
        errors += p.returncode != 0
        if p.returncode != 0:
            print(err[-2000:], file=sys.stderr)
    wall = time.perf_counter() - t0
    per_s, done, failed = throughput(create_url, name)
    per_s /= 60
    print(f"{label}: {n_workers} workers, {done} trials in {wall:.1f} s wall, "
          f"{per_s:.1f} trials/s (first start to last end), {failed} failed trials, "
          f"{errors} worker errors", flush=True)
    return {f"trials_per_second_8_workers_{label}": per_s,
            f"errors_8_workers_{label}": float(errors + failed)}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trivial-trials", type=int, default=200)
    parser.add_argument("--skip-trivial", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-scaling-"))
    results = real_scaling(args.trials, args.epochs, tmp)
    results["speedup_2_workers"] = (results["trials_per_minute_2_workers"]
                                    / results["trials_per_minute_1_worker"])
    if not args.skip_trivial:
        results.update(trivial_many(POSTGRES, "postgres", 8, args.trivial_trials, tmp, POSTGRES))
        port = _free_port()
        proxy = subprocess.Popen([HPSEARCH, "storage-proxy", "--storage", POSTGRES, "--port",
                                  str(port)], stdout=subprocess.DEVNULL)
        try:
            time.sleep(3)
            results.update(trivial_many(f"grpc://127.0.0.1:{port}", "grpc", 8,
                                        args.trivial_trials, tmp, POSTGRES))
        finally:
            proxy.send_signal(signal.SIGINT)
            proxy.wait(timeout=15)
    for key, value in results.items():
        print(f"{key}: {value:.3f}")

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

if __name__ == "__main__":
    main()
