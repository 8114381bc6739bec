"""`hpsearch retrain NAME`: the honest final test of a search.

The validation split chose the hyperparameters, so its accuracy flatters them. The best
configuration is trained again on train + validation and evaluated on the test set once per
seed; nothing before this command reads the test set. The weights (one state_dict per seed),
the full config and the test metrics go to a folder, and the summary to the study's user
attribute ``hpsearch_retrain``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from optuna.trial import TrialState

import trainers
from search._errors import SearchError, SpecError
from search.run._studies import load
from search.spec import best_trials, params_from_optuna, train_config_for
from search.storage import RETRAIN_ATTR, open_storage
from search.tracking import log_retrain

if TYPE_CHECKING:
    import optuna

    import trainers
    from search.spec import StudySpec

def _spread(values: list[float]) -> dict[str, Any]:
    # Sample standard deviation: the seeds are a sample of the run-to-run spread.
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "per_seed": values}

def final_test(
    config: trainers.TrainConfig,
    *,
    seeds: int = 1,
    out: Path | None = None,
    on_seed: Callable[[int, trainers.TrainResult], None] | None = None,
) -> dict[str, Any]:
    """Train `config` on train+val with seeds config.seed … config.seed+seeds-1, test each once.

    Returns {"test_accuracy": {mean, std, per_seed}, "test_loss": {…}, "seeds", "epochs",
    "seed_values", "seconds"}. With `out`, writes model-seed<s>.pt per seed and config.yaml.
    """

    accuracies, losses, seconds = [], [], 0.0
    seed_values = [config.seed + i for i in range(seeds)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    for seed in seed_values:
        result = trainers.train(config.replace(seed=seed), evaluate_test=True, merge_val=True)
        if result.test_accuracy is None or result.test_loss is None:
            raise SearchError(f"retrain: seed {seed} did not finish ({result.reason}); "
                              "no test result")
        accuracies.append(result.test_accuracy)
        losses.append(result.test_loss)
        seconds += result.seconds
        if out is not None and result.model is not None:
            torch.save(result.model.state_dict(), out / f"model-seed{seed}.pt")
        if on_seed is not None:
            on_seed(seed, result)
    return {"test_accuracy": _spread(accuracies), "test_loss": _spread(losses),
            "seeds": seeds, "epochs": config.epochs, "seed_values": seed_values,
            "seconds": round(seconds, 2)}

def chosen_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The best trial, or trial `number` (COMPLETE or PRUNED); SpecError/SearchError if none."""

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials or trials[0].state not in finished:
            raise SpecError(f"--trial: expected a finished trial of study {study.study_name!r}, "
                            f"got {number}")
        return trials[0]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SearchError(f"study {study.study_name!r} has no completed trial yet")
    best = best_trials(study)  # the feasible ones, under constraints
    if not best:
        raise SearchError(f"study {study.study_name!r}: none of its {len(complete)} complete "
                          "trials meets the constraints (`hpsearch status` shows each bound's "
                          "value); retrain one anyway with --trial N")
    if len(study.directions) > 1:
        numbers = ", ".join(f"#{t.number}" for t in best)
        raise SpecError(f"study {study.study_name!r} has several objectives: choose one of its "
                        f"best trials ({numbers}) with --trial")
    return best[0]

def retrain(
    study: optuna.Study,
    spec: StudySpec,
    *,
    out: Path,
    epochs: int | None = None,
    seeds: int = 1,
    trial: int | None = None,
    device: str | None = None,
    on_seed: Callable[[int, trainers.TrainResult], None] | None = None,
) -> dict[str, Any]:
    """Retrain the best (or the given) trial's config and test it; stored on the study too."""

    chosen = chosen_trial(study, trial)
    params = params_from_optuna(spec, chosen.params)
    config = train_config_for(spec, params)
    changes: dict[str, Any] = {"epochs": epochs or spec.budget.epochs}
    if device:
        changes["device"] = device
    config = config.replace(**changes)
    summary = final_test(config, seeds=seeds, out=out, on_seed=on_seed)
    summary.update(trial=chosen.number, out=str(out), params=params)
    (out / "results.json").write_text(json.dumps({"study": spec.name, **summary}, indent=2))
    study.set_user_attr(RETRAIN_ATTR, summary)
    log_retrain(study, spec, summary)
    return summary

def retrain_user(study: optuna.Study, spec: StudySpec, *, out: Path, epochs: int | None = None,
                 seeds: int = 1, trial: int | None = None, device: str | None = None,
                 on_seed: Callable[[int, dict[str, float]], None] | None = None,
                 ) -> dict[str, Any]:
    """`retrain` for a study with its own trainer: the chosen trial's params run once per
    seed with `trial.final` True (HPSEARCH_FINAL=1 for a command); what the run returns, or
    its last report, is its test result."""
    from search.trial import Trial, fixed_params, run_command

    chosen = chosen_trial(study, trial)
    params = {**fixed_params(spec), **params_from_optuna(spec, chosen.params)}
    assert spec.trainer is not None
    function = (trainers.load_plugin(spec.trainer.function, "hpsearch.trainers", "trainer")
                if spec.trainer.function else None)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {}
    seed_values = list(range(seeds))
    for seed in seed_values:
        user = Trial(number=chosen.number, study_name=spec.name, params=params,
                     device=str(trainers.resolve_device(device or "auto")),
                     epochs=epochs or spec.budget.epochs, final=True, seed=seed)
        output: dict[str, str] = {}
        returned = function(dict(params), user) if function else run_command(spec, user,
                                                                              output)
        if isinstance(returned, dict):
            metrics = returned
        elif returned is not None:
            metrics = {spec.objective.metric_names[0]: returned}
        elif user.history:
            metrics = {k: v for k, v in user.history[-1].items() if k != "epoch"}
        else:
            raise SearchError(f"retrain: seed {seed}: {spec.trainer_name} returned nothing "
                              "and reported nothing: return the test metrics as a mapping")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results.setdefault(key, []).append(float(value))
        if on_seed is not None:
            on_seed(seed, {k: v[-1] for k, v in results.items()})
    summary: dict[str, Any] = {k: _spread(v) for k, v in results.items()}
    summary.update(seeds=seeds, seed_values=seed_values, epochs=epochs or spec.budget.epochs,
                   trial=chosen.number, out=str(out), params=params)
    (out / "results.json").write_text(json.dumps({"study": spec.name, **summary}, indent=2))
    study.set_user_attr(RETRAIN_ATTR, summary)
    log_retrain(study, spec, summary)
    return summary


def retrain_and_report(name: str, storage: str | None, *, out: Path | None = None,
                       epochs: int | None = None, seeds: int = 1, trial: int | None = None,
                       device: str | None = None) -> None:
    """`hpsearch retrain`: retrain a study's best (or chosen) trial and print the test result."""
    study, spec = load(name, open_storage(storage, must_exist=True))
    out = out or Path(f"retrain-{name}")
    chosen = chosen_trial(study, trial)
    epochs = epochs or spec.budget.epochs
    if spec.trainer is None:
        print(f"retraining trial #{chosen.number} of {name!r} on train+validation for "
              f"{epochs} epochs, {seeds} seed(s); the test set is read once per seed",
              flush=True)
    else:
        print(f"retraining trial #{chosen.number} of {name!r} with {spec.trainer_name}: "
              f"{seeds} run(s) with trial.final set (HPSEARCH_FINAL=1 for a command), "
              f"{epochs} epochs; what each returns or last reports is its test result",
              flush=True)

    if spec.trainer is not None:
        def shown(seed: int, metrics: dict[str, float]) -> None:
            print(f"  seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                  flush=True)

        s = retrain_user(study, spec, out=out, epochs=epochs, seeds=seeds, trial=chosen.number,
                         device=device, on_seed=shown)
        means = ", ".join(f"{k} {v['mean']:.4g}" for k, v in s.items()
                          if isinstance(v, dict) and "mean" in v)
        print(f"{means} (trial #{s['trial']}, {seeds} seed(s)); results.json in {out}/, "
              f"summary in study attr {RETRAIN_ATTR}")
        return

    def show(seed: int, result: trainers.TrainResult) -> None:
        print(f"  seed {seed}: test accuracy {result.test_accuracy:.4f}, loss "
              f"{result.test_loss:.4f} ({result.epochs_run} epochs, {result.seconds:.1f} s)",
              flush=True)

    s = retrain(study, spec, out=out, epochs=epochs, seeds=seeds, trial=chosen.number,
                device=device, on_seed=show)
    acc, loss = s["test_accuracy"], s["test_loss"]
    spread = f" ± {acc['std']:.4f}" if seeds > 1 else ""
    print(f"test accuracy {acc['mean']:.4f}{spread}, test loss {loss['mean']:.4f} "
          f"(trial #{s['trial']}, {epochs} epochs, {seeds} seed(s)); weights, config "
          f"and results.json in {out}/, summary in study attr {RETRAIN_ATTR}")
