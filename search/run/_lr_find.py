"""The LR range test for a study: which runs, the lr range they suggest, plots, and `auto` lr.

`hpsearch lr-find STUDY.yaml` runs `trainers.lr_range_test` for each optimizer of the space at
the study's batch size (each searched batch size when there are at most three; else the
smallest, middle and largest) and prints what each suggests. `space.lr: {auto: true}`, or
`hpsearch run --lr-find`, runs the same tests when the study is created and stores a spec whose
lr range is theirs: the union of the suggested ranges, widened by `WIDEN` on each side, cut to
the file's range if it gave one, and stretched over any enqueued lr. Workers elsewhere read
that stored range; the tests' results are the study's user attribute ``hpsearch_lr_find``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

import trainers
from search._errors import SpecError
from search.spec import (
    ChoicesEntry,
    GridEntry,
    Pow2Entry,
    RangeEntry,
    StudySpec,
    auto_lr_key,
    base_train_config,
    canonical,
    lr_key,
    parse_spec,
    show,
)
from search.storage import LR_FIND_ATTR
from trainers import OPTIMIZERS, unscale_lr

WIDEN = 2.0  # the suggestions are read off one noisy run: leave the sampler some room
MAX_BATCH_SIZES = 3  # more searched batch sizes than this: test the smallest, middle, largest

def _space_values(spec: StudySpec, knob: str) -> list[Any] | None:
    """Every value a discrete space entry for trainer setting `knob` can take, else None."""
    key = next((k for k in spec.space if canonical(k) == knob), None)
    if key is None:
        return None
    entry = spec.space[key]
    if isinstance(entry, ChoicesEntry):
        return list(entry.choices)
    if isinstance(entry, GridEntry):
        return list(entry.grid_values)
    if isinstance(entry, Pow2Entry):
        return [entry.to_real(v) for v in entry.grid()]
    if isinstance(entry, RangeEntry) and entry.is_int:
        return entry.grid()
    return None

def plan_tests(spec: StudySpec, *, optimizer: str | None = None
               ) -> tuple[list[str], list[int], str]:
    """(optimizers, batch sizes, a line saying how the batch sizes were chosen) to test."""

    base = base_train_config(spec)
    if optimizer is not None:
        if optimizer not in OPTIMIZERS:
            raise SpecError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, "
                            f"got {optimizer!r}")
        optimizers = [optimizer]
    else:
        optimizers = [str(v) for v in _space_values(spec, "optimizer.name")
                      or [base.optimizer.name]]
    sizes = _space_values(spec, "batch_size")
    if sizes is None:
        return optimizers, [base.batch_size], f"at the study's batch size {base.batch_size}"
    sizes = sorted(int(s) for s in sizes)
    if len(sizes) <= MAX_BATCH_SIZES:
        return optimizers, sizes, "at each searched batch size"
    picked = [sizes[0], sizes[len(sizes) // 2], sizes[-1]]
    return optimizers, picked, (f"at the smallest, middle and largest of the {len(sizes)} "
                                "searched batch sizes")

def run_tests(
    spec: StudySpec,
    *,
    optimizer: str | None = None,
    device: str | None = None,
    on_result: Callable[[trainers.LRFindResult], None] | None = None,
    **test_args: Any,
) -> tuple[list[trainers.LRFindResult], str]:
    """Run the range test for every (optimizer, batch size) of `plan`; results and the note.

    Other searched settings (momentum, weight decay, …) stay at the study's constants or the
    trainer's defaults. `test_args` go to `trainers.lr_range_test`.
    """

    optimizers, sizes, note = plan_tests(spec, optimizer=optimizer)
    base = base_train_config(spec)
    if device:
        base = base.replace(device=device)
    results = []
    for name in optimizers:
        for size in sizes:
            config = base.replace(optimizer=name, batch_size=size)
            try:
                result = trainers.lr_range_test(config, **test_args)
            except trainers.ConfigError as e:
                raise SpecError(f"lr range test ({name}, batch {size}): {e}") from e
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results, note

def _sig(value: float) -> float:
    return float(f"{value:.3g}")

def narrowed_range(spec: StudySpec, key: str, results: list[trainers.LRFindResult]
                   ) -> tuple[float, float]:
    """The lr range the study searches after the tests (see the module docstring)."""
    entry = spec.space[key]
    per_batch = getattr(entry, "per_batch", None)
    low = min(unscale_lr(r.suggested_min, r.batch_size, per_batch) for r in results) / WIDEN
    high = max(unscale_lr(r.suggested_max, r.batch_size, per_batch) for r in results) * WIDEN
    if isinstance(entry, RangeEntry):  # `run --lr-find` narrows the file's range, never widens
        if low >= entry.high or high <= entry.low:
            raise SpecError(f"space.{key}: the LR range test suggests [{low:.3g}, {high:.3g}], "
                            f"outside the file's range [{show(entry.low)}, {show(entry.high)}]; "
                            f"widen space.{key} or run without --lr-find")
        low, high = max(low, entry.low), min(high, entry.high)
    for i, config in enumerate(spec.enqueue):
        value = config.get(key)
        if isinstance(value, (int, float)):  # an enqueued lr stays inside what is searched
            low, high = min(low, value), max(high, value)
        elif value is not None:
            raise SpecError(f"enqueue[{i}].{key}: expected a number, got {show(value)}")
    return _sig(low), _sig(high)

def resolve(spec: StudySpec, results: list[trainers.LRFindResult], *, note: str,
            settings: dict[str, Any]) -> tuple[StudySpec, dict[str, Any]]:
    """The spec with its lr range from the tests (validated again), and the record to store."""

    key = lr_key(spec)
    if key is None:
        raise SpecError("space: the LR range test narrows the lr range, and lr is not searched "
                        "(add space.lr: {auto: true})")
    entry = spec.space[key]
    per_batch = getattr(entry, "per_batch", None)
    low, high = narrowed_range(spec, key, results)
    data = spec.model_dump(mode="json")
    resolved: dict[str, Any] = {"low": low, "high": high, "log": True}
    if per_batch is not None:
        resolved["per_batch"] = per_batch
    if entry.when is not None:
        resolved["when"] = entry.when
    data["space"][key] = resolved
    new = parse_spec(data, source="<lr range test>")
    record = {
        "key": key,
        "requested": spec.space[key].model_dump(mode="json"),
        "range": [low, high],
        "per_batch": per_batch,
        "widen": WIDEN,
        "rule": results[0].rule_text,
        "batch_sizes": note,
        **settings,
        "tests": [summary(r, per_batch) for r in results],
    }
    return new, record

def summary(result: trainers.LRFindResult, per_batch: int | None = None) -> dict[str, Any]:
    """One test's suggestion without its curve (what the study attribute keeps)."""
    out = {
        "optimizer": result.optimizer,
        "batch_size": result.batch_size,
        "suggested_min": _sig(result.suggested_min),
        "suggested_max": _sig(result.suggested_max),
        "steepest_lr": _sig(result.steepest_lr),
        "min_loss_lr": _sig(result.min_loss_lr),
        "stopped": result.stopped,
        "seconds": round(result.seconds, 2),
    }
    if per_batch:
        out[f"per_{per_batch}"] = [
            _sig(unscale_lr(result.suggested_min, result.batch_size, per_batch)),
            _sig(unscale_lr(result.suggested_max, result.batch_size, per_batch))]
    return out

def needs_test(spec: StudySpec, *, force: bool) -> bool:
    """Whether creating this study runs the LR range test first."""
    return force or auto_lr_key(spec) is not None

def table(results: list[trainers.LRFindResult], per_batch: int | None) -> list[str]:
    """The suggestions as aligned text lines, one per test."""
    extra = f"  {'min/max per ' + str(per_batch):>21}" if per_batch else ""
    lines = [f"{'optimizer':<10} {'batch':>5}  {'suggested min':>13}  {'suggested max':>13}  "
             f"{'steepest':>9}  {'loss min':>9}{extra}  stopped"]
    for r in results:
        scaled = ""
        if per_batch:
            lo = unscale_lr(r.suggested_min, r.batch_size, per_batch)
            hi = unscale_lr(r.suggested_max, r.batch_size, per_batch)
            scaled = f"  {lo:>10.3g} {hi:>10.3g}"
        lines.append(f"{r.optimizer:<10} {r.batch_size:>5}  {r.suggested_min:>13.3g}  "
                     f"{r.suggested_max:>13.3g}  {r.steepest_lr:>9.3g}  {r.min_loss_lr:>9.3g}"
                     f"{scaled}  {r.stopped}")
    return lines

def save_outputs(results: list[trainers.LRFindResult], out: Path, *, study: str) -> list[Path]:
    """A PNG plot per test (when matplotlib is installed) and every curve as JSON; the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "lr_find.json"]
    written[0].write_text(json.dumps({"study": study, "tests": [r.to_dict() for r in results]}))
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a training host
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    for r in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(r.lrs, r.losses, color="0.75", lw=0.8, label="loss (per batch)")
        ax.plot(r.lrs, r.smoothed, color="tab:orange", lw=1, label="running average (stop rule)")
        ax.plot(r.lrs, r.centered, color="tab:blue", lw=1.8, label="zero-lag average")
        ax.axvspan(r.suggested_min, r.suggested_max, color="tab:green", alpha=0.15,
                   label=f"suggested {r.suggested_min:.3g} … {r.suggested_max:.3g}")
        ax.axvline(r.steepest_lr, color="tab:red", ls=":", lw=1,
                   label=f"steepest fall {r.steepest_lr:.3g}")
        ax.set_xscale("log")
        top = max(r.centered[0], min(r.losses)) * 1.6
        ax.set_ylim(max(0.0, min(min(r.losses), min(r.centered)) * 0.9),
                    top if math.isfinite(top) else None)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(f"{study}: LR range test, {r.optimizer}, batch {r.batch_size}\n"
                     f"rule {r.rule}", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out / f"{r.optimizer}-batch{r.batch_size}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

DEFAULTS = {"start_lr": 1e-7, "end_lr": 10.0, "iterations": 300, "rule": "minimum"}

def run_and_report(spec: StudySpec, settings: dict[str, Any], *, out: Path,
                   optimizer: str | None = None, device: str | None = None
                   ) -> tuple[list[trainers.LRFindResult], str]:
    """Run the tests with `settings` (`DEFAULTS`' keys), print the table, save plots."""
    optimizers, sizes, note = plan_tests(spec, optimizer=optimizer)
    print(f"LR range test for study {spec.name!r}: lr {settings['start_lr']:g} → "
          f"{settings['end_lr']:g} over {settings['iterations']} steps, {len(optimizers)} "
          f"optimizer(s) {note} ({', '.join(str(s) for s in sizes)}); other searched settings "
          "at the study's constants or the trainer's defaults", flush=True)
    results, note = run_tests(spec, optimizer=optimizer, device=device, **settings)
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

def lr_find(spec: StudySpec, settings: dict[str, Any], *, out: Path | None = None,
            optimizer: str | None = None, device: str | None = None) -> None:
    """`hpsearch lr-find`: run the tests, report them, and say the lr range they suggest."""
    out = out or Path(f"lr-find-{spec.name}")
    results, note = run_and_report(spec, settings, out=out, optimizer=optimizer, device=device)
    if lr_key(spec) is not None:
        _, record = resolve(spec, results, note=note, settings=settings)
        low, high = record["range"]
        print(f"for the study: lr {{low: {low:g}, high: {high:g}, log: true}} (the union "
              f"of the suggestions, widened {WIDEN:g}x on each side"
              + (", within the file's range" if auto_lr_key(spec) is None else "") + ")")

def for_new_study(spec: StudySpec, storage: Any, *, device: str | None
                  ) -> tuple[StudySpec, dict[str, Any] | None]:
    """`run`: the spec with its lr range from the range test, and the record, for a study
    about to be created; an existing study keeps the range it was created with."""
    if lr_key(spec) is None:
        raise SpecError("--lr-find: narrows the lr range, and this study does not search lr "
                        "(add space.lr: {auto: true} or a range)")
    if spec.name in optuna.get_all_study_names(storage):
        print(f"study {spec.name!r} exists: its lr range was set when it was created; "
              "no LR range test")
        return spec, None
    results, note = run_and_report(spec, DEFAULTS, out=Path(f"lr-find-{spec.name}"),
                                   device=device)
    new, record = resolve(spec, results, note=note, settings=dict(DEFAULTS))
    key, (low, high) = record["key"], record["range"]
    print(f"space.{key} for study {spec.name!r}: {{low: {low:g}, high: {high:g}, log: true"
          + (f", per_batch: {record['per_batch']}" if record["per_batch"] else "")
          + f"}} (stored with the study as {LR_FIND_ATTR})", flush=True)
    return new, record
