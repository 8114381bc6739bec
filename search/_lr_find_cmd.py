"""`hpsearch lr-find` and `run --lr-find`: the LR range test's command line and output.

Light to import (the CLI lists commands without torch); the work is in `search._lr_find`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search._command import EXIT_OK, Command, _positive_float, _positive_int
from search._errors import SpecError
from search._study import LR_FIND_ATTR

if TYPE_CHECKING:
    import trainers
    from search._spec import StudySpec


def add_range_test_arguments(parser: argparse.ArgumentParser) -> None:
    """The range test's settings on `lr-find` (`run --lr-find` takes the defaults)."""
    parser.add_argument("--start-lr", type=_positive_float, default=1e-7,
                        help="first lr of the ramp (default 1e-7)")
    parser.add_argument("--end-lr", type=_positive_float, default=10.0,
                        help="last lr of the ramp (default 10)")
    parser.add_argument("--iterations", type=_positive_int, default=300,
                        help="optimizer steps of the ramp (default 300)")
    parser.add_argument("--rule", choices=("minimum", "steepest"), default="minimum",
                        help="max lr at the smoothed loss's minimum (default) or where it "
                             "falls fastest; min lr is max/10 either way")


def range_test_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `trainers.lr_range_test` keyword arguments the command line chose."""
    return {"start_lr": args.start_lr, "end_lr": args.end_lr, "iterations": args.iterations,
            "rule": args.rule}


def run_and_report(spec: StudySpec, args: argparse.Namespace, *, out: Path,
                   optimizer: str | None = None) -> tuple[list[trainers.LRFindResult], str]:
    """Run the tests with the command's settings, print the table, save plots; the results."""
    from search._lr_find import plan, run_tests, save_outputs, table
    from search._space import auto_lr_key, lr_key

    settings = range_test_settings(args)
    optimizers, sizes, note = plan(spec, optimizer=optimizer)
    print(f"LR range test for study {spec.name!r}: lr {args.start_lr:g} → {args.end_lr:g} over "
          f"{args.iterations} steps, {len(optimizers)} optimizer(s) {note} "
          f"({', '.join(str(s) for s in sizes)}); other searched settings at the study's "
          "constants or the trainer's defaults", flush=True)
    results, note = run_tests(spec, optimizer=optimizer, device=args.device, **settings)
    key = lr_key(spec) or auto_lr_key(spec)
    per_batch = getattr(spec.space[key], "per_batch", None) if key else None
    print(f"rule {results[0].rule_text}")
    for line in table(results, per_batch):
        print(line)
    written = save_outputs(results, out, study=spec.name)
    plots = [p for p in written if p.suffix == ".png"]
    print(f"curves: {written[0]}" + (f"; plots: {out}/*.png ({len(plots)})" if plots
                                       else " (no plots: matplotlib is not installed)"))
    return results, note


class LrFind(Command):
    """LR range test (Smith) for a study's model and data; suggests the lr range."""

    name = "lr-find"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", help="study file (YAML)")
        parser.add_argument("--optimizer", help="test only this optimizer (default: each in "
                                                "the space, or the study's)")
        add_range_test_arguments(parser)
        parser.add_argument("--out", help="folder for the plots and curves "
                                          "(default lr-find-<study name>)")
        parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")

    def run(self, args: argparse.Namespace) -> int:
        from search._lr_find import WIDEN, resolve
        from search._space import auto_lr_key, lr_key
        from search._spec import load_spec

        spec = load_spec(args.study)
        out = Path(args.out or f"lr-find-{spec.name}")
        results, note = run_and_report(spec, args, out=out, optimizer=args.optimizer)
        if lr_key(spec) is not None:
            _, record = resolve(spec, results, note=note, settings=range_test_settings(args))
            low, high = record["range"]
            print(f"for the study: lr {{low: {low:g}, high: {high:g}, log: true}} (the union "
                  f"of the suggestions, widened {WIDEN:g}x on each side"
                  + (", within the file's range" if auto_lr_key(spec) is None else "") + ")")
        return EXIT_OK


def for_new_study(spec: StudySpec, storage: Any, *, device: str | None
                  ) -> tuple[StudySpec, dict[str, Any] | None]:
    """`run`: the spec with its lr range from the range test, and the record, for a study
    about to be created; an existing study keeps the range it was created with."""
    import optuna

    from search._lr_find import resolve
    from search._space import lr_key

    if lr_key(spec) is None:
        raise SpecError("--lr-find: narrows the lr range, and this study does not search lr "
                        "(add space.lr: {auto: true} or a range)")
    if spec.name in optuna.get_all_study_names(storage):
        print(f"study {spec.name!r} exists: its lr range was set when it was created; "
              "no LR range test")
        return spec, None
    args = argparse.Namespace(start_lr=1e-7, end_lr=10.0, iterations=300, rule="minimum",
                              device=device)
    results, note = run_and_report(spec, args, out=Path(f"lr-find-{spec.name}"))
    new, record = resolve(spec, results, note=note, settings=range_test_settings(args))
    key, (low, high) = record["key"], record["range"]
    print(f"space.{key} for study {spec.name!r}: {{low: {low:g}, high: {high:g}, log: true"
          + (f", per_batch: {record['per_batch']}" if record["per_batch"] else "")
          + f"}} (stored with the study as {LR_FIND_ATTR})", flush=True)
    return new, record
