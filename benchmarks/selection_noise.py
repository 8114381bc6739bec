"""Selection noise: how far a search's test accuracy moves with which near-best trial it picks.

A search is judged by one number: its best trial by validation loss, trained again on
train+val and tested once. This measures the noise in that number on a finished study (for
example an arm of `search_efficiency.py`, whose storages are in its `--out` folder): the K
trials with the lowest validation loss are each retrained with S seeds (`search.run.retrain`,
as `hpsearch retrain --trial N --seeds S` does) and tested. It prints, per trial, its val loss
and test accuracy per seed, then:

- `selection_sd`: the standard deviation of the K trials' mean test accuracies: how much the
  pick among near-equal val losses moves the figure;
- `seed_sd`: the pooled standard deviation over seeds of one trial: the noise of one retrain;
- `rank_correlation`: Spearman's between val loss and mean test accuracy over the K trials
  (-1: lower val loss, higher accuracy throughout; 0: unrelated);
- `best_by_val_test_acc`: the best trial's first-seed accuracy, the number the search reports.

The test set is read K x S times here, on purpose: this is a study of the measurement, not a
search's figure. Ends with `name: value` lines.

    .venv/bin/python benchmarks/selection_noise.py --storage sqlite:///DIR/hpsearch-0.db \\
        --study fashion-mlp-cold-0 [--top 5] [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the study's storage URL")
    parser.add_argument("--study", required=True, help="the study's name")
    parser.add_argument("--top", type=int, default=5, help="trials by val loss (default 5)")
    parser.add_argument("--seeds", type=int, default=3, help="retrain seeds a trial (default 3)")
    parser.add_argument("--out", help="folder for the retrained models (default: a new "
                                      "temporary folder)")
    args = parser.parse_args(argv)
    if args.top < 2 or args.seeds < 2:
        parser.error("--top and --seeds must be at least 2 (a spread needs two)")

    from optuna.trial import TrialState
    from scipy.stats import spearmanr

    from search import SearchError
    from search.run import load, retrain
    from search.storage import open_storage

    try:
        study, spec = load(args.study, open_storage(args.storage, must_exist=True))
    except SearchError as e:  # no database, no such study, a server away: one line, exit 2
        parser.error(str(e))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    top = sorted(complete, key=lambda t: (t.value, t.number))[:args.top]
    if len(top) < 2:
        parser.error(f"study {args.study!r} has {len(complete)} completed trial(s): need 2")
    out = Path(args.out or tempfile.mkdtemp(prefix="selection-noise-")).absolute()
    print(f"selection noise: the {len(top)} best of {len(complete)} completed trials of "
          f"{args.study!r} by val loss, {args.seeds} retrain seeds each; files in {out}",
          flush=True)
    means, variances, first = [], [], None
    for t in top:
        s = retrain(study, spec, out=out / f"trial-{t.number}", seeds=args.seeds,
                    trial=t.number)
        accs = s["test_accuracy"]["per_seed"]
        first = accs[0] if first is None else first
        means.append(statistics.fmean(accs))
        variances.append(statistics.variance(accs))
        print(f"trial number={t.number} val_loss={t.value:.4f} "
              f"test_acc={','.join(f'{a:.4f}' for a in accs)} mean={means[-1]:.4f}",
              flush=True)
    print(f"selection_sd: {statistics.stdev(means):.4f}")
    print(f"seed_sd: {math.sqrt(statistics.fmean(variances)):.4f}")
    print(f"rank_correlation: {spearmanr([t.value for t in top], means).statistic:.2f}")
    print(f"best_by_val_test_acc: {first:.4f}")
    print(f"test_acc_range: {min(means):.4f}-{max(means):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
