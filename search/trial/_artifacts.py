"""What each trial leaves for the dashboard: charts, raw metrics, and the study's note.

Every trial that trained (completed, pruned or diverged; not one that raised) gets four Optuna
artifacts, which optuna-dashboard lists and shows under the trial:

- ``curves.svg``: train/validation loss and accuracy per epoch;
- ``lr.svg``: the lr (and momentum, where the optimizer has one) at every step;
- ``grad_norms.svg``: each layer's weight-gradient norm per epoch, on a log scale;
- ``metrics.json``: the raw per-epoch history, equal to the trial's ``history`` attribute.

They go to the study's artifact store (`search.storage.artifact_location`: next to the storage,
or where ``$HPSEARCH_ARTIFACTS`` says). Artifacts are a view, not the result: a failure to make
or store them prints one warning line and never fails the trial.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from search._log import logger
from search._urls import redact
from search.storage import (
    artifact_location,
    open_artifact_store,
    set_user_attrs,
    storage_of,
    storage_url_of,
    store_files,
)
from search.trial._charts import curves_svg, grad_norms_svg, lr_svg, metrics_svg
from search.trial._history import history_record
from trainers import data_for, lr_plan

if TYPE_CHECKING:
    import optuna

    import trainers
    from search.spec import StudySpec

LOG = logger("trial")
MAX_LR_POINTS = 800  # per-step lr drawn at most this many points: ~2 per pixel of width

def lr_per_step(config: trainers.TrainConfig, history: list[trainers.EpochMetrics],
                n_train: int, *, max_points: int = MAX_LR_POINTS
                ) -> tuple[list[float], list[float], list[float] | None]:
    """(x in epochs, lr, momentum or None) over the steps the run took, from its lr plan.

    Schedules are pure functions of the step, so the trajectory is recomputed
    (`trainers.lr_plan`, the plan the run followed) rather than logged on the hot path.
    Plateau's cuts depend on validation loss: each epoch is scaled to the lr the run recorded
    at its end.
    """
    plan = lr_plan(config, n_train)
    per_epoch, schedule = plan.steps_per_epoch, plan.schedule
    total = len(history) * per_epoch
    if total == 0:
        return [], [], None
    n = min(total, max_points)
    steps = sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)}
                   | {(e + 1) * per_epoch - 1 for e in range(len(history))})
    lr = [plan.lr(t) for t in steps]
    if config.schedule.name == "plateau":
        scale = []
        for e, m in enumerate(history):
            planned = plan.lr((e + 1) * per_epoch - 1)
            scale.append(m.lr / planned if planned > 0 else 1.0)
        lr = [v * scale[t // per_epoch] for t, v in zip(steps, lr, strict=True)]
    momentum: list[float] | None = None
    if history[0].momentum is not None:
        if schedule.cycles_momentum:
            momentum = [float(schedule.momentum(t) or 0.0) for t in steps]
        else:
            momentum = [float(history[t // per_epoch].momentum or 0.0) for t in steps]
    return [(t + 1) / per_epoch for t in steps], lr, momentum

def _warn(message: str) -> None:
    LOG.warning(message)

@dataclass(frozen=True)
class Written:
    """A trial's artifacts in the store: the seconds that took, and the links to write."""

    seconds: float
    links: dict[str, str]

class ArtifactRecorder:
    """Makes and stores a trial's artifacts; `write` and `record` never raise."""

    def __init__(self, store: Any, *, location: str) -> None:
        self.store = store
        self.location = location

    @classmethod
    def for_study(cls, study: optuna.Study) -> ArtifactRecorder | None:
        """The recorder for a study's storage (None when $HPSEARCH_ARTIFACTS is off)."""
        location = artifact_location(storage_url_of(storage_of(study)))
        if location is None:
            return None
        return cls(open_artifact_store(location), location=location)

    def write(self, trial: optuna.Trial, result: trainers.TrainResult,
              config: trainers.TrainConfig,
              history: list[dict[str, Any]] | None = None) -> Written | None:
        """Store the trial's artifacts; their links are for the caller to write with the
        trial's result (as system attrs). `history`: the result's `history_record`s, when the
        caller has made them. None (and a warning) on failure."""
        started = time.perf_counter()
        try:
            links = store_files(trial, self.store,
                                self._files(trial, result, config, history))
        except Exception as e:  # the trial's result matters more than its pictures
            self._failed(trial, e)
            return None
        return Written(time.perf_counter() - started, links)

    def write_user(self, trial: optuna.Trial, ended: str, history: list[dict[str, Any]],
                   params: dict[str, Any], output: dict[str, str],
                   epochs: int) -> Written | None:
        """`write` for a trial of a user's trainer: `metrics.json` (params and every report),
        `curves.svg` of the reported metrics, and the command's output tail (`output.txt`)."""
        started = time.perf_counter()
        try:
            head = json.dumps({"trial": trial.number, "ended": ended,
                               "epochs_run": len(history), "params": params})
            epochs_text = ",\n".join(json.dumps(h) for h in history)
            files = {"metrics.json": f'{head[:-1]},\n"history": [\n{epochs_text}\n]}}\n'
                     .encode()}
            if history:
                files["curves.svg"] = metrics_svg(
                    history, max(epochs, int(history[-1]["epoch"])),
                    f"trial #{trial.number}: {ended}").encode()
            if any(output.values()):
                files["output.txt"] = "".join(
                    f"--- {name} (last lines) ---\n{text}\n" for name, text in output.items()
                    if text).encode()
            links = store_files(trial, self.store, files)
        except Exception as e:  # the trial's result matters more than its pictures
            self._failed(trial, e)
            return None
        return Written(time.perf_counter() - started, links)

    def record(self, trial: optuna.Trial, result: trainers.TrainResult,
               config: trainers.TrainConfig) -> float | None:
        """Store and link the trial's artifacts; the seconds it took, or None (and a warning)."""

        started = time.perf_counter()
        written = self.write(trial, result, config)
        if written is None:
            return None
        try:
            if written.links:
                set_user_attrs(trial, {}, system_attrs=written.links)
        except Exception as e:
            self._failed(trial, e)
            return None
        return time.perf_counter() - started

    def _failed(self, trial: optuna.Trial, e: Exception) -> None:
        _warn(f"trial #{trial.number}: artifacts not recorded in {self.location} "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "the trial itself is unaffected")

    def _files(self, trial: optuna.Trial, result: trainers.TrainResult,
               config: trainers.TrainConfig,
               history: list[dict[str, Any]] | None = None) -> dict[str, bytes]:

        if history is None:  # the objective passes the records it already made
            history = [history_record(m) for m in result.history]
        ended = result.reason if result.status != "completed" else "completed"
        head = json.dumps({"trial": trial.number, "status": result.status, "ended": ended,
                           "epochs_run": result.epochs_run, "config": config.to_dict()})
        # One line per epoch: readable, and json's C encoder (`indent` takes the Python one).
        epochs = ",\n".join(json.dumps(h) for h in history)
        text = f'{head[:-1]},\n"history": [\n{epochs}\n]}}\n'
        files = {"metrics.json": text.encode()}
        if history:
            charts = self._draw(trial.number, ended, result, config, history)
            files.update((name, text.encode()) for name, text in charts.items())
        return files

    @staticmethod
    def _draw(number: int, ended: str, result: trainers.TrainResult,
              config: trainers.TrainConfig, history: list[dict[str, Any]]) -> dict[str, str]:

        epochs = config.epochs
        # The run's own count: a wide trial's data lives in its ranks, not in this worker.
        n_train = result.train_examples or len(data_for(config).train)
        x, lrs, momentum = lr_per_step(config, list(result.history), n_train)
        return {
            "curves.svg": curves_svg(history, epochs, f"trial #{number}: {ended}"),
            "lr.svg": lr_svg(x, lrs, momentum, epochs, f"trial #{number}: "
                             f"{config.optimizer.name}, {config.schedule.name} schedule"),
            "grad_norms.svg": grad_norms_svg(history, epochs,
                                             f"trial #{number}: gradient norm per layer"),
        }

def study_note(spec: StudySpec, storage_url: str | None) -> str:
    """The study's note (Markdown): what it searches, how, and how to reproduce it."""

    data = spec.model_dump(mode="json")
    objective = ", ".join(f"{m} ({d})" for m, d in zip(
        spec.objective.metric_names, spec.objective.direction_names, strict=True))
    storage = f" --storage {redact(storage_url)}" if storage_url else " --storage URL"
    space = spec.model_dump(mode="json", exclude_none=True).get("space") or {}
    flow = [(name, yaml.safe_dump(entry, default_flow_style=True, sort_keys=False).strip())
            for name, entry in space.items()]
    rows = "\n".join(f"| `{name}` | `{entry}` |" for name, entry in flow)
    fixed = data.get("fixed") or {}
    lines = [
        f"## {spec.name}",
        "",
        f"hpsearch study. Objective: {objective}. Budget: {spec.budget.trials} trials "
        f"(complete + pruned) of {spec.budget.epochs} epochs. Sampler: {spec.sampler.type}, "
        f"pruner: {spec.pruner.label}.",
        "",
        f"Data: `{json.dumps(data.get('data'))}`  ",
        f"Model: `{json.dumps(data.get('model'))}`"
        + (f"  \nFixed: `{json.dumps(fixed)}`" if fixed else ""),
        "",
        "### Search space",
        "",
        "| parameter | entry |",
        "|---|---|",
        rows,
        "",
        "Each trial carries `curves.svg`, `lr.svg`, `grad_norms.svg` and `metrics.json` "
        "(see the trial's artifacts) and the user attributes `history`, `ended`, `host`, "
        "`device`.",
        "",
        "### Reproduce",
        "",
        "```",
        f"hpsearch worker {spec.name}{storage}      # add a worker to this study",
        f"hpsearch status {spec.name}{storage}      # trials at a glance",
        f"hpsearch report {spec.name}{storage} --out report.html",
        f"hpsearch best {spec.name}{storage} --format yaml > best.yaml",
        "python -m trainers best.yaml                # train the best config, no study needed",
        "hpsearch run STUDY.yaml                     # a new study from the file below",
        "```",
        "",
        "### Study file",
        "",
        "```yaml",
        yaml.safe_dump(data, sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"

def write_study_note(study: optuna.Study, spec: StudySpec, *,
                     storage_url: str | None = None, overwrite: bool = False) -> bool:
    """Save the study note for optuna-dashboard unless one is there; True when written.

    A note edited in the dashboard is the user's: it is kept unless `overwrite`. Never raises:
    a missing note is a warning, not a reason to stop a worker.
    """
    try:
        from optuna_dashboard import get_note, save_note
    except ImportError:
        return False  # the dashboard extra is not installed: nobody would read the note
    try:
        if not overwrite and get_note(study).strip():
            return False
        url = storage_url or storage_url_of(storage_of(study))
        save_note(study, study_note(spec, url))
    except Exception as e:  # storage hiccups: the next worker to start tries again
        _warn(f"study note not written ({type(e).__name__}: {e})")
        return False
    return True
