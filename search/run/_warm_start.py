"""`run --warm-start OTHER[:k]`: the best configurations of another study, tried first.

The top k COMPLETE trials of the source study (best first, by its own objective; those that
meet its `constraints:` before those that do not) are translated into this study's space and
enqueued; a trial whose params do not fit (a key this study holds constant at another value, a
value outside a range, a condition that does not hold) is skipped and counted. Settings are
matched by trainer path, so ``lr`` and ``optimizer.lr`` are one setting, and an lr sampled per
N examples (linear scaling) is converted between the studies' units. Each source is used once:
the study keeps what it enqueued from where in its user attribute ``hpsearch_warm_start``, and
a second `run` with the same source enqueues nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from search._errors import SpecError, StudyNotFoundError
from search.spec import (
    base_train_config,
    canonical,
    constant_values,
    constants_of,
    enqueue_params,
    is_feasible,
    params_from_optuna,
    same,
    spec_from_json,
)
from search.storage import SPEC_ATTR, WARM_START_ATTR
from trainers import scale_lr, unscale_lr

if TYPE_CHECKING:
    import optuna

    from search.spec import StudySpec

DEFAULT_K = 5

def parse_source(text: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:k`` → (name, k); study names cannot hold ':'."""
    name, sep, count = text.rpartition(":")
    if not sep:
        return text, DEFAULT_K
    if not name or not count.isdigit() or int(count) < 1:
        raise SpecError(f"--warm-start: expected STUDY or STUDY:k with k a positive integer, "
                        f"got {text!r}")
    return name, int(count)

@dataclass
class WarmStart:
    """What one warm start did."""

    source: str
    used: list[int] = field(default_factory=list)  # source trial numbers enqueued
    skipped: int = 0  # source trials whose params do not fit this space
    reasons: list[str] = field(default_factory=list)
    already: bool = False  # this source was used before: nothing enqueued

    def describe(self) -> str:
        if self.already:
            return f"warm start from {self.source!r} was done when the study was first run"
        text = (f"warm start: enqueued {len(self.used)} of the best trials of {self.source!r} "
                f"({', '.join(f'#{n}' for n in self.used) or 'none'})")
        if self.skipped:
            text += (f"; skipped {self.skipped} that do not fit this space (first: "
                     f"{self.reasons[0]})")
        return text

def _per_batch(spec: StudySpec | None) -> int | None:
    return None if spec is None else constant_values(spec).get("optimizer.lr_per_batch")

def translate(spec: StudySpec, flat: dict[str, Any], source: StudySpec | None) -> dict[str, Any]:
    """A source trial's settings (real values) as this study's enqueue params; SpecError when
    they do not fit."""

    keys = {canonical(k): k for k in spec.space}
    constants = constants_of(spec)
    ours: dict[str, Any] = {}
    for key, value in flat.items():
        where = canonical(key)
        if where in constants and where not in keys:
            if not same(constants[where][1], value):  # held at another value here
                raise SpecError(f"{key}: {value!r}, but this study holds "
                                f"{constants[where][0]} at {constants[where][1]!r}")
            continue
        ours[keys.get(where, key)] = value
    lr = keys.get("optimizer.lr")
    theirs_per, our_per = _per_batch(source), _per_batch(spec)
    if lr is not None and lr in ours and theirs_per != our_per:
        batch = _batch_size(spec, flat, source)
        ours[lr] = unscale_lr(scale_lr(ours[lr], batch, theirs_per), batch, our_per)
    return enqueue_params(spec, ours, path="trial")

def _batch_size(spec: StudySpec, flat: dict[str, Any], source: StudySpec | None) -> int:
    for key, value in flat.items():
        if canonical(key) == "batch_size":
            return int(value)

    return base_train_config(source or spec).batch_size

def _ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials best first: by the objective, or the Pareto front by number; the
    trials that meet the source's constraints before those that do not (all do without)."""

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}  # feasible, where there are constraints
        return sorted(complete, key=lambda t: (not is_feasible(t), t.number not in front,
                                               t.number))
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    return sorted(complete, key=lambda t: (not is_feasible(t), sign * t.values[0], t.number))

def load_source(name: str, storage: Any, *, target: str,
                storage_label: str | None = None) -> optuna.Study:
    """The study to warm-start from, checked before anything is created."""

    if name == target and storage_label is None:
        raise SpecError(f"--warm-start: study {name!r} cannot warm-start itself")
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise StudyNotFoundError(f"--warm-start: no study named {name!r} in "
                                 f"{storage_label or 'this storage'} (studies: "
                                 f"{', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)

def warm_start(study: optuna.Study, spec: StudySpec, source: optuna.Study, *,
               k: int = DEFAULT_K, storage_label: str | None = None) -> WarmStart:
    """Enqueue the top `k` fitting COMPLETE trials of `source` into `study`, once.

    `storage_label` names the source's storage in the record (a redacted URL; None for the
    study's own storage).
    """

    name = source.study_name
    done = list(study.user_attrs.get(WARM_START_ATTR, []))
    out = WarmStart(name)
    if any(r["study"] == name and r.get("storage") == storage_label for r in done):
        out.already = True
        return out
    stored = source.user_attrs.get(SPEC_ATTR)
    source_spec = spec_from_json(stored) if stored is not None else None
    for trial in _ranked(source):
        try:
            flat = (params_from_optuna(source_spec, trial.params) if source_spec is not None
                    else dict(trial.params))
            params = translate(spec, flat, source_spec)
        except SpecError as e:
            out.skipped += 1
            out.reasons.append(f"#{trial.number}: {e}")
            continue
        study.enqueue_trial(params, user_attrs={"enqueued": True,
                                                "warm_start": f"{name}#{trial.number}"},
                            skip_if_exists=True)
        out.used.append(trial.number)
        if len(out.used) == k:
            break
    done.append({"study": name, "storage": storage_label, "k": k, "trials": out.used,
                 "skipped": out.skipped})
    study.set_user_attr(WARM_START_ATTR, done)
    return out
