"""Workers on Ray against local workers, side by side in one run.

The seed MLP on FashionMNIST (fixed trial budget, no pruning, PostgreSQL): `hpsearch run
--workers 2` (two local processes, one core each) against `hpsearch run --ray ADDRESS --workers
2` on a local Ray cluster of 2 CPUs (two actors of one CPU each, each running the same worker
process). Measured per run:

- throughput: trials per minute from the first trial's start to the last trial's end;
- start: seconds from the command's launch to each worker's first trial (mean of the workers);
  the Ray cluster is already running, as it is for a user who submits to one;
- memory: the peak resident memory of every process this script started (the run and its
  workers; with Ray also the cluster's GCS, raylet and actor processes), as RSS and PSS (PSS
  counts a shared page once, split between its users).

    .venv/bin/python benchmarks/cluster_overhead.py [--trials 24] [--epochs 4] [--rounds 2]

Ends with `name: value` lines, including `ray_throughput_ratio` (Ray / local, goal >= 0.9).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from worker_scaling import HPSEARCH, POSTGRES, seed_mlp_spec, throughput  # noqa: E402


def descendants(root: int) -> list[int]:
    """Every live process under `root` (read from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the ppid follows the last ")".
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; zeros once it is gone."""
    try:
        rollup = (Path(f"/proc/{pid}") / "smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if ":" in line}
    return fields.get("Rss", 0), fields.get("Pss", 0)


class PeakMemory:
    """Samples the summed memory of this script's descendants until stopped; keeps the peak."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.rss_kb, self.pss_kb = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [memory_kb(pid) for pid in descendants(os.getpid())]
            self.rss_kb = max(self.rss_kb, sum(r for r, _ in sizes))
            self.pss_kb = max(self.pss_kb, sum(p for _, p in sizes))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def first_trial_seconds(url: str, name: str, launched: dt.datetime) -> float:
    """Mean over the workers (by pid) of launch → their first trial's start."""
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    first: dict[int, dt.datetime] = {}
    for t in study.get_trials(deepcopy=False):
        pid = t.user_attrs.get("pid")
        if pid is not None and t.datetime_start is not None:
            first[pid] = min(first.get(pid, t.datetime_start), t.datetime_start)
    return sum((s - launched).total_seconds() for s in first.values()) / len(first)


def one_run(label: str, extra: list[str], trials: int, epochs: int,
            tmp: Path) -> dict[str, float]:
    name = f"cluster-{label}-{uuid.uuid4().hex[:6]}"
    path = seed_mlp_spec(name, trials, epochs, tmp)
    # Optuna stamps trials with the local clock, without a zone: compare like with like.
    launched = dt.datetime.now()
    with PeakMemory() as memory:
        subprocess.run([HPSEARCH, "run", str(path), "--storage", POSTGRES, "--workers", "2",
                        "--gpus", "none", *extra], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
    rate, done, failed = throughput(POSTGRES, name)
    start = first_trial_seconds(POSTGRES, name, launched)
    print(f"{label}: {done} trials, {rate:.1f} trials/min, {failed} failed, first trial "
          f"{start:.1f} s after launch, peak memory RSS {memory.rss_kb / 1024:.0f} MiB / PSS "
          f"{memory.pss_kb / 1024:.0f} MiB", flush=True)
    return {"rate": rate, "start_s": start, "rss_mib": memory.rss_kb / 1024,
            "pss_mib": memory.pss_kb / 1024}


def mean(runs: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2,
                        help="local and Ray runs, alternating (default 2 of each)")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="hpsearch-cluster-"))
    local: list[dict[str, float]] = []
    ray_runs: list[dict[str, float]] = []
    for _ in range(args.rounds):
        local.append(one_run("local", [], args.trials, args.epochs, tmp))
        # The cluster lives only while its run does, so the local runs pay nothing for it.
        started = time.perf_counter()
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 2, "include_dashboard": False})
        cluster.wait_for_nodes()
        print(f"Ray cluster of 2 CPUs up in {time.perf_counter() - started:.1f} s", flush=True)
        try:
            ray_runs.append(one_run("ray", ["--ray", cluster.address], args.trials,
                                    args.epochs, tmp))
        finally:
            cluster.shutdown()
    results = {
        "trials_per_minute_local": mean(local, "rate"),
        "trials_per_minute_ray": mean(ray_runs, "rate"),
        "ray_throughput_ratio": mean(ray_runs, "rate") / mean(local, "rate"),
        "first_trial_s_local": mean(local, "start_s"),
        "first_trial_s_ray": mean(ray_runs, "start_s"),
        "ray_start_extra_s": mean(ray_runs, "start_s") - mean(local, "start_s"),
        "peak_rss_mib_local": mean(local, "rss_mib"),
        "peak_rss_mib_ray": mean(ray_runs, "rss_mib"),
        "ray_added_rss_mib": mean(ray_runs, "rss_mib") - mean(local, "rss_mib"),
        "ray_added_pss_mib": mean(ray_runs, "pss_mib") - mean(local, "pss_mib"),
    }
    for key, value in results.items():
        print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
