"""The quick start as a newcomer runs it: does the whole budget finish inside its time box, and is
the best trial one the search found?

Runs `bash scripts/quickstart.sh` (setup, then `hpsearch run studies/fashion_mlp.yaml`: 40
trials, `timeout_s: 330`, the enqueued hand-tuned config as trial 0) `--runs` times, each into a
fresh SQLite storage, one after another, and reads each study back:

- `finished`: COMPLETE + PRUNED trials of the 40 when the run ended, and its wall time from launch;
- `best`: the best trial's number and final validation loss, against trial 0's (the enqueued
  configuration): `found_by_search` when the best is another trial with a lower val loss.

Goals (issue 33): the whole budget inside the time box in every run, and the best trial found by
the search in at least 2 of 3.

    .venv/bin/python benchmarks/quickstart.py [--runs 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(out: Path, index: int) -> dict[str, float | int | bool]:
    """One quick start into a fresh storage; what it finished and chose."""
    import optuna
    from optuna.trial import TrialState

    url = f"sqlite:///{out / f'quickstart-{index}.db'}"
    started = time.monotonic()
    with (out / f"quickstart-{index}.log").open("w") as log:
        code = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), "--storage", url],
                              stdout=log, stderr=subprocess.STDOUT, cwd=out).returncode
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"quick start {index} exited {code}; see {out}")
    study = optuna.load_study(study_name="fashion-mlp", storage=url)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    first = next(t for t in trials if t.number == 0)
    best = study.best_trial
    baseline = first.value if first.state == TrialState.COMPLETE else float("inf")
    return {"finished": finished, "wall_s": wall, "best_trial": best.number,
            "best_val_loss": best.value, "trial0_val_loss": baseline,
            "found_by_search": best.number != 0 and best.value < baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="folder for the storages and logs (default: a new one)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    out = Path(args.out or tempfile.mkdtemp(prefix="quickstart-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(args.runs):
        r = one_run(out, i)
        runs.append(r)
        print(f"run {i}: finished={r['finished']}/40 wall_s={r['wall_s']:.0f} "
              f"best_trial={r['best_trial']} best_val_loss={r['best_val_loss']:.4f} "
              f"trial0_val_loss={r['trial0_val_loss']:.4f} "
              f"found_by_search={'yes' if r['found_by_search'] else 'no'}", flush=True)
    walls = [r["wall_s"] for r in runs]
    print(f"quickstart_all_40: {sum(r['finished'] >= 40 for r in runs)} of {len(runs)}")
    print(f"quickstart_found_by_search: {sum(bool(r['found_by_search']) for r in runs)} of "
          f"{len(runs)}")
    print(f"quickstart_wall_s: {statistics.median(walls):.0f} ({min(walls):.0f}-{max(walls):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
