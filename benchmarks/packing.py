"""Packed trials against one trial at a time, side by side in one run, over alternating rounds.

The shipped `studies/fashion_mlp.yaml` space (FashionMNIST, the 784-128-56-10 MLP; optimizer,
lr, batch size 32 … 1024, momentum, weight decay, init and schedule sampled), a fixed list of
configs drawn with a seeded RandomSampler, no pruning, so both arms train the same trials for the
same epochs:
  (a) alone: `trainers.train` on each config in turn (what a worker does without packing);
  (b) packed: one `trainers.Pack` of capacity K, refilled as members finish, in the configs'
      order (what a `--pack K` worker does).
`packing_speedup` = wall time (a) / wall time (b), per round; the arms alternate which runs first
from round to round (`--rounds`, at least 3 for a figure), and the median and range are printed.
Then, per batch size, K configs all at that batch size, packed against alone, one epoch each.

Equivalence, measured and stated as what it is: the share of trials whose outcome (completed or
diverged, and the epochs run) differs between the arms, and the share whose final validation loss
differs by more than `--tolerance` (relative). Packed and alone runs sum their GEMMs in another
order, and a chaotic trajectory (a high lr, a diverging run) carries that last-bit difference
far, so this is a measured share, not a claim of equality.

Other spaces: `--optimizers` replaces the space's optimizer choices (the brief's seven:
sgd,nesterov,adam,amsgrad,adamw,rmsprop,adagrad), `--hidden` searches the MLP's hidden layers
(choices such as `128,56/256,128/64`) and `--dropout` its dropout rate (a range such as
`0,0.5`). A config that cannot be packed runs alone in the packed arm, as in a `--pack` worker
(`packed_alone` counts them).

    .venv/bin/python benchmarks/packing.py [--rounds 3] [--trials 32] [--epochs 2] [--pack 32]
        [--threads 2] [--table-pack 8] [--batch-sizes 32,64,…] [--tolerance 1e-3]
        [--optimizers a,b,…] [--hidden 128,56/256,128/…] [--dropout LOW,HIGH]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import yaml

import trainers
from search import SpecError
from search.spec import drawn_configs, parse_spec

STUDY = Path(__file__).resolve().parent.parent / "studies" / "fashion_mlp.yaml"


def sample_configs(n: int, epochs: int, threads: int, seed: int = 0,
                   optimizers: list[str] | None = None,
                   hidden: list[list[int]] | None = None,
                   dropout: list[float] | None = None) -> list[trainers.TrainConfig]:
    """`n` configs of the study's space (its optimizer choices replaced by `optimizers`,
    `hidden` searched over these shapes and `dropout` in this range, if given), drawn by a
    seeded RandomSampler (`search.spec.drawn_configs`)."""
    data = yaml.safe_load(STUDY.read_text())
    if optimizers:
        data["space"]["optimizer"] = {"choices": optimizers}
    if hidden:
        data["space"]["hidden"] = {"choices": hidden}
        del data["model"]["hidden"]
    if dropout:
        data["space"]["dropout"] = {"low": dropout[0], "high": dropout[1]}
    spec = parse_spec(data, source=f"{STUDY} with this run's --optimizers/--hidden/--dropout")
    return [c.replace(epochs=epochs, device="cpu", threads=threads)
            for c in drawn_configs(spec, n, seed=seed)]


def _comma_list(kind: type, count: int | None = None):
    """An argparse type: comma-separated values of `kind` (exactly `count` of them, if given)."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} values, got {text!r}")
        return values
    return parse


def _shapes(text: str) -> list[list[int]]:
    return [_comma_list(int)(shape) for shape in text.split("/")]


def alone(configs: list[trainers.TrainConfig]) -> tuple[float, list[trainers.TrainResult]]:
    started = time.perf_counter()
    results = [trainers.train(c) for c in configs]
    return time.perf_counter() - started, results


def packed(configs: list[trainers.TrainConfig], capacity: int, spread: int | None = None
           ) -> tuple[float, list[trainers.TrainResult], int]:
    """A worker's loop: fill the pack in arrival order, refill a slot as soon as it frees; a
    config that cannot be packed runs alone when its turn comes. Also how many did."""
    started = time.perf_counter()
    pack = trainers.Pack(capacity) if spread is None else trainers.Pack(capacity, spread=spread)
    queue = collections.deque(enumerate(configs))
    results: dict[int, trainers.TrainResult] = {}
    owner: dict[int, int] = {}
    ran_alone = 0

    def refill() -> None:
        nonlocal ran_alone
        while queue and len(pack) < capacity:
            i, config = queue[0]
            if trainers.pack_refusal(config) is not None:
                queue.popleft()
                results[i] = trainers.train(config)  # runs alone
                ran_alone += 1
            elif pack.fits(config):
                queue.popleft()
                owner[pack.add(config)] = i
            else:
                return  # waits for a slot where it fits

    refill()
    while len(pack):
        for member, outcome in pack.run_until_free():
            assert isinstance(outcome, trainers.TrainResult), outcome
            results[owner.pop(member)] = outcome
        refill()
    return time.perf_counter() - started, [results[i] for i in range(len(configs))], ran_alone


def differences(configs: list[trainers.TrainConfig], a: list[trainers.TrainResult],
                b: list[trainers.TrainResult]) -> tuple[list[float], list[str], list[float]]:
    """Relative differences of the per-epoch train and validation losses, the trials whose
    outcome differs (a status, or the number of epochs), and per trial of the same outcome the
    relative difference of its final validation loss."""
    diffs: list[float] = []
    odd: list[str] = []
    finals: list[float] = []
    for c, x, y in zip(configs, a, b, strict=True):
        if x.status != y.status or x.epochs_run != y.epochs_run:
            odd.append(f"{c.optimizer.name} lr {effective(c):.3g} batch {c.batch_size} "
                       f"{c.schedule.name}: alone {x.reason!r}, packed {y.reason!r}")
            continue
        for mx, my in zip(x.history, y.history, strict=True):
            for u, v in ((mx.train_loss, my.train_loss), (mx.val_loss, my.val_loss)):
                diffs.append(_relative(u, v))
        if x.history:
            finals.append(_relative(x.history[-1].val_loss, y.history[-1].val_loss))
    return diffs, odd, finals


def _relative(u: float, v: float) -> float:
    if u == v:  # equal infinities too
        return 0.0
    return abs(u - v) / max(abs(u), 1e-12)


def effective(c: trainers.TrainConfig) -> float:
    return trainers.effective_lr(c.optimizer, c.batch_size)


def spread(values: list[float]) -> str:
    """Median and range, as every figure of the benchmarks is quoted."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def rounds(configs: list[trainers.TrainConfig], n: int, capacity: int, spread_: int | None
           ) -> tuple[list[float], list[trainers.TrainResult], list[trainers.TrainResult], int]:
    """`n` rounds of both arms, alone first in even rounds and packed first in odd ones;
    the speedup of each round, and the last round's results."""
    speedups: list[float] = []
    for i in range(n):
        if i % 2 == 0:
            t_alone, r_alone = alone(configs)
            t_packed, r_packed, ran_alone = packed(configs, capacity, spread_)
        else:
            t_packed, r_packed, ran_alone = packed(configs, capacity, spread_)
            t_alone, r_alone = alone(configs)
        speedups.append(t_alone / t_packed)
        first = "alone" if i % 2 == 0 else "packed"
        print(f"round {i + 1} ({first} first): alone {t_alone:.1f} s, packed {t_packed:.1f} s, "
              f"speedup {t_alone / t_packed:.2f}", flush=True)
    return speedups, r_alone, r_packed, ran_alone


def per_batch_table(args: argparse.Namespace) -> tuple[dict[int, float], list, list, list, int]:
    """K configs all at one batch size, packed against alone, one epoch each, per batch size."""
    print("\nper batch size: K configs at one batch size, one epoch each")
    print("| batch | alone (s) | packed (s) | speedup |")
    print("|------:|----------:|-----------:|--------:|")
    table, diffs, odd, finals, ran_alone = {}, [], [], [], 0
    for batch in (int(b) for b in args.batch_sizes.split(",") if b):
        group = [c.replace(batch_size=batch, epochs=1)
                 for c in sample_configs(args.table_pack, 1, args.threads, seed=batch,
                                         optimizers=args.optimizers, hidden=args.hidden,
                                         dropout=args.dropout)]
        ta, ra = alone(group)
        tp, rp, table_alone = packed(group, args.table_pack)
        ran_alone += table_alone
        more, odd_here, finals_here = differences(group, ra, rp)
        diffs += more
        odd += odd_here
        finals += finals_here
        table[batch] = ta / tp
        print(f"| {batch} | {ta:.2f} | {tp:.2f} | {ta / tp:.2f} |")
    return table, diffs, odd, finals, ran_alone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of both arms (at least 3 for a figure)")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pack", type=int, default=32, help="K: members of the pack")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of both arms (default 2: this machine's cores)")
    parser.add_argument("--table-pack", type=int, default=8, help="K of the per-batch table")
    parser.add_argument("--batch-sizes", default="32,64,128,256,512,1024",
                        help="the per-batch table's (empty: no table)")
    parser.add_argument("--spread", type=int, help="Pack's spread (default: its own)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="relative difference of a final val loss counted as differing")
    parser.add_argument("--optimizers", type=_comma_list(str),
                        help="the space's optimizer choices, comma-separated (default: the "
                             "study file's)")
    parser.add_argument("--hidden", type=_shapes,
                        help="search the MLP's hidden layers over these shapes, e.g. "
                             "128,56/256,128/64 (default: the study file's fixed shape)")
    parser.add_argument("--dropout", type=_comma_list(float, 2),
                        help="search the MLP's dropout rate in LOW,HIGH (default: none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.trials < 1 or args.pack < 1:
        parser.error("--rounds, --trials and --pack must be at least 1")

    try:
        configs = sample_configs(args.trials, args.epochs, args.threads,
                                 optimizers=args.optimizers, hidden=args.hidden,
                                 dropout=args.dropout)
    except SpecError as e:  # an unknown optimizer, a dropout outside [0, 1)…
        parser.error(str(e))
    trainers.train(configs[0].replace(epochs=1))  # loads the data (cached) and warms up
    sizes = collections.Counter(c.batch_size for c in configs)
    shapes = collections.Counter(",".join(map(str, c.model.hidden)) for c in configs)
    print(f"{len(configs)} configs of {STUDY.name}, {args.epochs} epochs each, batch sizes "
          f"{dict(sorted(sizes.items()))}, hidden {dict(shapes)}, {args.threads} threads, "
          f"pack K={args.pack}, {args.rounds} rounds")
    speedups, r_alone, r_packed, ran_alone = rounds(configs, args.rounds, args.pack,
                                                    args.spread)
    diffs, odd, finals = differences(configs, r_alone, r_packed)
    table, t_diffs, t_odd, t_finals, table_alone = per_batch_table(args)

    print()
    print(f"pack_k: {args.pack}")
    for batch, ratio in table.items():
        print(f"packing_speedup_batch_{batch}: {ratio:.2f}")
    # Float rounding differs between the arms (a wide GEMM, fused optimizer kernels); chaotic
    # trajectories (high lr, Adam over a thousand steps) amplify it as they amplify any change
    # in the last bit, so the tail is larger than the median.
    for line in odd + t_odd:
        print(f"outcome differs: {line}")
    every = sorted(diffs + t_diffs)
    print(f"median_relative_loss_difference: {every[len(every) // 2]:.1e}")
    print(f"share_within_1e-3: {sum(d <= 1e-3 for d in every) / len(every):.2f}")
    print(f"outcomes_differing: {len(odd)} of {len(configs)} "
          f"({len(odd) / len(configs):.0%}; per-batch table: {len(t_odd)})")
    beyond = sum(d > args.tolerance for d in finals)
    print(f"final_val_loss_differing: {beyond} of {len(finals)} "
          f"({beyond / max(len(finals), 1):.0%} beyond {args.tolerance:g} relative)")
    print(f"packed_alone: {ran_alone + table_alone}")
    print(f"packing_speedup: {spread(speedups)} (median, range of {len(speedups)} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
