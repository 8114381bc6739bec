"""Filling one GPU: the quick start's trials with packed trials against worker processes per GPU.

The shipped `studies/fashion_mlp.yaml` (seed MLP, 15 epochs, Hyperband), its trial budget set to
`--trials` (default 40) and its timeout lifted, run once per arm from a fresh storage, side by
side in one invocation:

- tpg1: `hpsearch run --trials-per-gpu 1` (one trial at a time on the GPU);
- tpg4: `--trials-per-gpu 4` (four worker processes share it);
- auto: `--trials-per-gpu auto` (the default: workers added while they fit);
- pack: `--trials-per-gpu 1 --pack auto` (one worker, up to 32 trials as one batched model).

Each arm's wall time is from its launch to its exit (imports and data loading included), and
`nvidia-smi` is read every half second meanwhile for the GPU's utilization (the share of time a
kernel ran). Ends with `name: value` lines: `seconds_ARM`, `gpu_busy_ARM` (mean utilization,
percent), `pack_speedup_vs_tpg4` (tpg4 seconds / pack seconds; goal >= 4) and `gpu_busy_pack`
(goal >= 70).

    python benchmarks/gpu_fill.py [--trials 40] [--arms tpg1,tpg4,auto,pack] [--out DIR]

`--device cpu` runs the same arms on CPU workers (`--gpus none`; tpgN becomes `--workers N`,
no utilization): a dry run of the script itself, not a measurement of anything GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
ARMS = {
    "tpg1": ["--trials-per-gpu", "1"],
    "tpg4": ["--trials-per-gpu", "4"],
    "auto": ["--trials-per-gpu", "auto"],
    "pack": ["--trials-per-gpu", "1", "--pack", "auto"],
}
CPU_ARMS = {  # --device cpu: the same shapes with CPU worker processes
    "tpg1": ["--gpus", "none", "--workers", "1"],
    "tpg4": ["--gpus", "none", "--workers", "4"],
    "auto": ["--gpus", "none"],
    "pack": ["--gpus", "none", "--workers", "1", "--pack", "auto"],
}


class Utilization:
    """Samples `nvidia-smi`'s utilization.gpu of GPU 0 every `every` seconds in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[float] = []
        self._smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Utilization:
        if self._smi:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        assert self._smi is not None
        while not self._stop.is_set():
            out = subprocess.run([self._smi, "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            try:
                self.samples.append(float(out.splitlines()[0]))
            except (ValueError, IndexError):
                pass
            self._stop.wait(self.every)

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def study_file(out: Path, arm: str, trials: int, epochs: int | None,
               dataset: str | None) -> Path:
    """The shipped quick-start study under the arm's name, `trials` trials, no timeout."""
    data = yaml.safe_load((ROOT / "studies" / "fashion_mlp.yaml").read_text())
    data["name"] = f"gpu-fill-{arm}"
    data["budget"] = {**data["budget"], "trials": trials}
    data["budget"].pop("timeout_s", None)
    if epochs is not None:
        data["budget"]["epochs"] = epochs
    if dataset is not None:  # the dry run's small data
        data["data"] = {"dataset": dataset, "size": 2048, "seed": 0}
        data["model"] = {"type": "mlp", "hidden": [32]}
    data.setdefault("run", {})["checkpoint_dir"] = str(out / f"ckpt-{arm}")
    path = out / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_arm(arm: str, flags: list[str], out: Path, trials: int, epochs: int | None,
            dataset: str | None) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    path = study_file(out, arm, trials, epochs, dataset)
    url = f"sqlite:///{out / (arm + '.db')}"
    log = out / f"{arm}.log"
    with Utilization() as util, log.open("w") as f:
        started = time.perf_counter()
        code = subprocess.run([HPSEARCH, "run", str(path), "--storage", url, *flags],
                              stdout=f, stderr=subprocess.STDOUT, cwd=out).returncode
        seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{arm}: hpsearch run failed with exit code {code}; see {log}")
    study = optuna.load_study(study_name=f"gpu-fill-{arm}", storage=url)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    best = min((t.value for t in done if t.value is not None), default=float("nan"))
    return {"seconds": seconds, "trials": len(done), "busy": util.mean(),
            "epochs": sum(len(t.intermediate_values) for t in done), "best": best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--arms", default="tpg1,tpg4,auto,pack",
                        help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--epochs", type=int, help="override the study's 15 epochs")
    parser.add_argument("--dataset", help=argparse.SUPPRESS)  # the test's synthetic data
    parser.add_argument("--out", help="folder for storages and logs (default: a new one)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: expected some of {', '.join(ARMS)}, got {', '.join(unknown)}")
    if args.device == "cuda" and not shutil.which("nvidia-smi"):
        parser.error("--device cuda: no nvidia-smi here (use --device cpu for a dry run)")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-fill-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    table = ARMS if args.device == "cuda" else CPU_ARMS
    print(f"gpu fill: {args.trials} trials of studies/fashion_mlp.yaml per arm on "
          f"{args.device}; files in {out}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        r = results[arm] = run_arm(arm, table[arm], out, args.trials, args.epochs,
                                   args.dataset)
        busy = "n/a" if r["busy"] is None else f"{r['busy']:.0f}%"
        print(f"{arm:<5} {' '.join(table[arm]):<40} {r['seconds']:7.1f} s  {r['trials']} trials "
              f"{r['epochs']} epochs  best val loss {r['best']:.4f}  GPU busy {busy}",
              flush=True)
    print()
    for arm, r in results.items():
        print(f"seconds_{arm}: {r['seconds']:.1f}")
        print(f"trials_{arm}: {r['trials']}")
        print(f"gpu_busy_{arm}: {'n/a' if r['busy'] is None else format(r['busy'], '.1f')}")
    if "pack" in results and "tpg4" in results:
        speedup = results["tpg4"]["seconds"] / results["pack"]["seconds"]
        print(f"pack_speedup_vs_tpg4: {speedup:.2f} (goal >= 4 on a GPU)")
    if "pack" in results and "tpg1" in results:
        speedup = results["tpg1"]["seconds"] / results["pack"]["seconds"]
        print(f"pack_speedup_vs_tpg1: {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
