"""`status` and `best`: a study at a glance, as a table a person reads or as data."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import TrialState
from rich.table import Table

from search._text import finite, fmt
from search.run import load
from search.spec import best_trials, is_feasible, labels, measured, train_config_for
from search.storage import (
    RETRAIN_ATTR,
    budget_of,
    count_trials,
    open_storage,
)
from search.views._progress import flat_params, make_console

if TYPE_CHECKING:
    import optuna

    from search.spec import StudySpec

def best_record(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """The best trial (or the Pareto front) with real params and the config to train it."""

    out = []
    for trial in best_trials(study):  # the feasible ones, where the study has constraints:
        params = flat_params(spec, trial)
        history = trial.user_attrs.get("history") or []
        out.append({
            "trial": trial.number,
            "values": dict(zip(spec.objective.metric_names, trial.values, strict=True)),
            **({"constraints": measured(spec.constraints, trial.user_attrs)}
               if spec.constraints else {}),
            "val_accuracy": (history[-1].get("val_accuracy") if history else None),
            "params": params,
            **({"config": train_config_for(spec, params).to_dict()} if spec.trainer is None
               else {"trainer": spec.trainer.model_dump(exclude_defaults=True),
                     "fixed": dict(spec.fixed)}),
        })
    return out

def feasibility(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """The study's bounds and how many of its complete trials meet them all."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return {"bounds": labels(spec.constraints),
            "complete": len(complete), "feasible": sum(is_feasible(t) for t in complete)}


def no_best_text(data: dict[str, Any]) -> str:
    """Why `data` (`status_data`) has no best trial: none completed, or none feasible."""
    k = data.get("constraints")
    if not k or not k["complete"]:
        return "no trial completed yet"
    return (f"none of the {k['complete']} complete trials meets the constraints "
            f"({', '.join(k['bounds'])})")


def constraints_text(data: dict[str, Any]) -> str | None:
    """E.g. `constraints size <= 0.5: 7 of 10 complete trials feasible` (None without)."""
    k = data.get("constraints")
    if not k:
        return None
    return (f"constraints {', '.join(k['bounds'])}: {k['feasible']} of {k['complete']} "
            "complete trials feasible")


def status_data(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the `--json` form)."""

    counts = count_trials(study)
    trials = study.get_trials(deepcopy=False)
    now = dt.datetime.now()
    running, failures = [], []
    epochs_run = 0
    for t in trials:
        epochs_run += int(t.user_attrs.get("epochs_run", len(t.intermediate_values)))
        if t.state == TrialState.RUNNING:
            started = t.datetime_start or now
            running.append({
                "trial": t.number,
                "host": t.user_attrs.get("host"),
                "pid": t.user_attrs.get("pid"),
                "device": t.user_attrs.get("device"),
                "epoch": len(t.intermediate_values),
                "elapsed_s": round((now - started).total_seconds(), 1),
                "params": flat_params(spec, t),
            })
        elif t.state == TrialState.FAIL:
            failures.append({"trial": t.number,
                             "reason": t.user_attrs.get("ended") or "worker died (no heartbeat)",
                             "host": t.user_attrs.get("host")})
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    full = len(finished) * spec.budget.epochs
    run_epochs = sum(int(t.user_attrs.get("epochs_run", len(t.intermediate_values)))
                     for t in finished)
    return {
        "study": spec.name,
        "objective": dict(zip(spec.objective.metric_names, spec.objective.direction_names,
                           strict=True)),
        "budget": {"trials": budget_of(study, spec.budget.trials), "epochs": spec.budget.epochs},
        "counts": {"complete": counts.complete, "pruned": counts.pruned,
                   "failed": counts.failed, "running": counts.running,
                   "waiting": counts.waiting, "finished": counts.finished},
        "best": best_record(study, spec),
        "running": running,
        "failures": failures,
        "pruning": {
            "epochs_run": run_epochs,
            "epochs_full_budget": full,
            "epochs_saved": full - run_epochs,
            "saved_fraction": round(1 - run_epochs / full, 3) if full else 0.0,
        },
        "epochs_run_all_trials": epochs_run,
        "retrain": retrain_record(study),
        **({"constraints": feasibility(study, spec)} if spec.constraints else {}),
    }

def retrain_record(study: optuna.Study) -> dict[str, Any] | None:
    """The retrain result stored on the study (test metrics over seeds), if there is one."""
    record = study.user_attrs.get(RETRAIN_ATTR)
    return record if isinstance(record, dict) else None

def retrain_text(record: dict[str, Any]) -> str:
    """E.g. `trial #4, 8 epochs on train+val: test_accuracy 0.89 ± 0.002 … over 3 seeds`."""
    parts = []
    for key in ("test_accuracy", "test_loss"):
        value = record.get(key)
        if isinstance(value, dict) and value.get("mean") is not None:
            std = value.get("std")
            spread = f" ± {fmt(std)}" if std is not None else ""
            parts.append(f"{key} {fmt(value['mean'])}{spread}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key} {fmt(value)}")
    seeds = record.get("seeds")
    text = ", ".join(parts) or "recorded"
    if record.get("trial") is not None:
        epochs = f", {record['epochs']} epochs" if record.get("epochs") else ""
        text = f"trial #{record['trial']}{epochs} on train+val: {text}"
    if seeds:
        text += f" over {seeds} seed{'s' if seeds != 1 else ''}"
    if record.get("out"):
        text += f" (out: {record['out']})"
    return text

def render_status(data: dict[str, Any], console: Any) -> None:
    """`hpsearch status NAME` as a person reads it, from the data `--json` prints."""

    c = data["counts"]
    console.print(
        f"[bold]{data['study']}[/]  {c['finished']}/{data['budget']['trials']} trials finished: "
        f"[green]{c['complete']} complete[/], [yellow]{c['pruned']} pruned[/], "
        f"[red]{c['failed']} failed[/], {c['running']} running, {c['waiting']} waiting"
    )
    p = data["pruning"]
    if p["epochs_full_budget"]:
        console.print(f"pruning saved {p['epochs_saved']} of {p['epochs_full_budget']} epochs "
                      f"({p['saved_fraction']:.0%})")
    if constraints_text(data):
        console.print(constraints_text(data))
    for best in data["best"]:
        values = ", ".join(f"{k} {fmt(v)}" for k, v in best["values"].items())
        console.print(f"best: trial #{best['trial']}: {values}")
        console.print("      " + " ".join(f"{k}={fmt(v)}" for k, v in best["params"].items()))
        if best.get("constraints"):
            console.print("      feasible: " + ", ".join(
                f"{label} ({fmt(v)})" for label, v in best["constraints"].items()))
    if not data["best"]:
        console.print(f"best: {no_best_text(data)}")
    if data.get("retrain"):
        console.print(f"retrain: {retrain_text(data['retrain'])}")
    if data["running"]:
        table = Table(title="running", title_justify="left")
        for col in ("trial", "host", "device", "epoch", "elapsed"):
            table.add_column(col)
        for r in data["running"]:
            table.add_row(f"#{r['trial']}", str(r["host"]), str(r["device"]),
                          f"{r['epoch']}/{data['budget']['epochs']}", f"{r['elapsed_s']:.0f}s")
        console.print(table)
    if data["failures"]:
        table = Table(title="failures", title_justify="left")
        table.add_column("trial")
        table.add_column("host")
        table.add_column("reason")
        for f in data["failures"]:
            table.add_row(f"#{f['trial']}", str(f["host"]), f["reason"])
        console.print(table)

def studies_overview(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """Every study in the storage: name, trials by state, best value."""

    out = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=True):
        best = summary.best_trial
        if best is not None and not is_feasible(best):  # Optuna's pick ignores constraints
            feasible = best_trials(optuna.load_study(study_name=summary.study_name,
                                                     storage=storage))
            best = feasible[0] if feasible else None
        out.append({
            "study": summary.study_name,
            "trials": summary.n_trials,
            "best_value": finite(best.value) if best is not None and best.values
            and len(best.values) == 1 else None,
            "started": summary.datetime_start.isoformat() if summary.datetime_start else None,
            "hpsearch": "hpsearch_spec" in summary.user_attrs,
        })
    return out

def show_status(name: str | None, storage: str | None, *, as_json: bool = False) -> int:
    """`hpsearch status`: the studies in a storage, or one study; the exit code."""
    opened = open_storage(storage, must_exist=True)
    if name is None:
        rows = studies_overview(opened)
        if as_json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no studies in this storage")
        else:
            for r in rows:
                best = "" if r["best_value"] is None else f"  best {r['best_value']:.4g}"
                print(f"{r['study']:<30} {r['trials']:>5} trials{best}")
        return 0
    study, spec = load(name, opened)
    data = status_data(study, spec)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        render_status(data, make_console())
    return 0

def show_best(name: str, storage: str | None, *, as_format: str = "yaml") -> int:
    """`hpsearch best`: the best configuration, a file `python -m trainers` trains; exit code."""
    study, spec = load(name, open_storage(storage, must_exist=True))
    records = best_record(study, spec)
    if not records:
        k = feasibility(study, spec) if spec.constraints else None
        if k and k["complete"]:
            print(f"error: study {name!r}: {no_best_text({'constraints': k})}", file=sys.stderr)
        else:
            print(f"error: study {name!r} has no completed trial yet", file=sys.stderr)
        return 1
    out: Any = records[0] if len(records) == 1 else {"pareto_front": records}
    if isinstance(out, dict) and "config" in out:
        out = {"study": name, **out}
    if as_format == "json":
        print(json.dumps(out, indent=2))
    else:
        print(f"# best of study {name}; train it with: python -m trainers FILE.yaml")
        print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0
