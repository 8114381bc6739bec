"""The study file as a whole: read, validated in two passes, stored as JSON, and what it builds.

``load_spec`` reads YAML, ``parse_spec`` validates it in two passes — the shape with pydantic
(`_schema`), then every setting against the trainer's own config (``config_from_dict``) — and
reports the first problem as ``<file>: <key path>: <what was expected>, got <value>``. From a
spec come a trial's trainer config, the sampler and the pruner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import optuna
import yaml
from pydantic import ValidationError

import trainers
from search._errors import SpecError
from search.spec._algorithms import Settings, build, build_pruner_of
from search.spec._constraints import labels
from search.spec._knobs import (
    canonical,
    check_constants,
    constant_values,
    constants_of,
    plugins_of,
)
from search.spec._model import fail, from_pydantic, show
from search.spec._schema import StudySpec
from search.spec._space import (
    auto_lr_key,
    check_space,
    check_user_space,
    distributions,
    enqueue_params,
    grid_search_space,
    suggest,
)
from trainers import ConfigError, TrainConfig, TrainerError, config_from_dict

SPEC_VERSION = 1

def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> StudySpec:
    """Validate a study file's contents; raise one SpecError naming the first bad key."""
    try:
        if not isinstance(data, dict):
            raise fail("(top level)", f"expected a mapping of study settings, got {show(data)}")
        try:
            spec = StudySpec.model_validate(data)
        except ValidationError as e:
            raise from_pydantic(e) from e
        if spec.trainer is None:
            constants = check_constants(spec)
            check_space(spec, base_train_config(spec), constants)
            _check_validation_split(spec, base_train_config(spec))
            _check_global_batch(spec, base_train_config(spec))
        else:
            check_user_space(spec)
        for i, entry in enumerate(spec.enqueue):
            enqueue_params(spec, entry, path=f"enqueue[{i}]")
    except SpecError as e:
        raise SpecError(f"{source}: {e}", path=e.path) from e
    return spec

def _check_validation_split(spec: StudySpec, base: TrainConfig) -> None:
    """A validation metric needs a validation split: without one every trial would end
    without a value."""
    needs = [m for m in spec.objective.metric_names if m.startswith("val_")]
    searched = any(canonical(k) == "data.val_fraction" for k in spec.space)
    if needs and base.data.val_fraction == 0 and not searched:
        where = next((p for p, w, _ in _constant_paths(spec) if w == "data.val_fraction"),
                     "data.val_fraction")
        raise fail(where, f"the objective {needs[0]} needs a validation split: expected more "
                          "than 0, got 0")


def _check_global_batch(spec: StudySpec, base: TrainConfig) -> None:
    """A trial of N ranks splits each batch N ways (the study's batch size is the global
    batch): N must divide every batch size the space can draw, and each one enqueued."""
    width = spec.resources.width
    if width == 1:
        return
    key = next((k for k in spec.space if canonical(k) == "batch_size"), None)
    if key is not None and spec.space[key].discrete():
        entry = spec.space[key]
        sources = [(f"space.{key}", [entry.to_real(v) for v in entry.grid()])]
    elif key is not None:
        raise fail(f"space.{key}", f"a trial of {spec.resources.label} splits each batch "
                   f"{width} ways: expected pow2, choices or a grid of batch sizes it divides, "
                   "got a range")
    else:
        sources = [(next((p for p, w, _ in _constant_paths(spec) if w == "batch_size"),
                         "batch_size (the default)"), [base.batch_size])]
    sources += [(f"enqueue[{i}].batch_size", [entry["batch_size"]])
                for i, entry in enumerate(spec.enqueue) if "batch_size" in entry]
    for where, drawn in sources:
        bad = [b for b in drawn if isinstance(b, int) and b % width]
        if bad:
            raise fail(where, f"a trial of {spec.resources.label} splits each batch {width} "
                       f"ways (the study's batch size is the global batch): expected batch "
                       f"sizes {width} divides, got {', '.join(map(str, bad))}")


def _constant_paths(spec: StudySpec) -> list[tuple[str, str, Any]]:
    return [(path, where, value) for where, (path, value) in constants_of(spec).items()]


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a YAML study file; a missing file or bad YAML is a SpecError too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SpecError(f"{path}: no such study file") from e
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a UTF-8 text file (byte {e.start} is "
                        f"{e.object[e.start:e.start + 1]!r}); save the study file as UTF-8") from e
    except OSError as e:
        raise SpecError(f"{path}: cannot read the study file: {e.strerror}") from e
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{where}: invalid YAML: {problem}") from e
    if data is None:
        raise SpecError(f"{path}: the study file is empty")
    spec = parse_spec(data, source=str(path))
    if spec.trainer is None:
        _check_network(spec, path)
    else:
        check_trainer(spec, source=str(path))
    return spec


def check_trainer(spec: StudySpec, *, source: str) -> None:
    """A user's trainer is there to run: the function imports, the program exists (`python`
    is the worker's own interpreter). Run where the trials will run (`load_spec`, and each
    worker before it takes a trial)."""
    trainer = spec.trainer
    assert trainer is not None
    if trainer.function is not None:
        try:
            trainers.load_plugin(trainer.function, "hpsearch.trainers", "trainer")
        except TrainerError as e:
            raise SpecError(f"{source}: {e}", path="trainer") from e
        return
    program = str((trainer.command or [""])[0])
    if "{" in program:
        raise SpecError(f"{source}: trainer.command[0]: the program cannot be a placeholder, "
                        f"got {program!r}", path="trainer.command")
    if program not in ("python", "python3") and shutil.which(program) is None:
        where = ("an executable file" if "/" in program
                 else f"a program on PATH: {os.environ.get('PATH', '')}")
        raise SpecError(f"{source}: trainer.command[0]: {program}: not found (expected {where})",
                        path="trainer.command")

_FINE_TUNING = ("model.weights", "model.freeze", "model.freeze_blocks", "model.head")

def _check_network(spec: StudySpec, path: Path) -> None:
    """A user's model or dataset, an image folder, and a fine-tuning study's weights file and
    freeze settings, checked before a study starts.

    They depend on the network and the data, so only loading and building tells: the data is
    loaded and the network built (on the CPU, with the data's shape) with the weights and with
    each searched `freeze` and the deepest searched `freeze_blocks`, so a loader that returns the
    wrong shapes, a network that is not a Module, a file that does not fit or a prefix that names
    nothing is one error now, not a failure in every trial. Workers elsewhere need the same code
    and files.
    """
    base = base_train_config(spec)
    searched = {canonical(key): entry for key, entry in spec.space.items()}
    model = base.model
    if not (plugins_of(spec) or model.weights or model.freeze != "none" or model.freeze_blocks
            or model.head or any(knob in searched for knob in _FINE_TUNING)
            or base.data.dataset == "image_folder"):
        return
    if model.weights and not Path(model.weights).expanduser().is_file():
        raise SpecError(f"{path}: model.weights: {model.weights}: no such file (a relative path "
                        f"is read from the current directory, {Path.cwd()}); write it first, "
                        f"e.g. python -m trainers CONFIG.yaml --save {model.weights}",
                        path="model.weights")
    variants: list[dict[str, Any]] = [{}]
    for knob in ("model.freeze", "model.freeze_blocks"):
        entry = searched.get(knob)
        if entry is not None and entry.discrete():
            values = [entry.to_real(v) for v in entry.grid()]
            variants += ([{knob: max(values)}] if knob == "model.freeze_blocks"
                         else [{knob: v} for v in values])
    try:
        data = trainers.load_data(base.data)
        for variant in variants:
            config = base.replace(**variant, device="cpu")
            net = trainers.prepare_model(config.model, config.init, data.input_shape,
                                         data.num_classes)
            trainers.build_optimizer(net.model, config.optimizer, lr=config.optimizer.lr,
                                     head=net.head, frozen=net.frozen,
                                     unfreezes=config.model.unfreeze_after is not None)
    except TrainerError as e:
        raise SpecError(f"{path}: {e}", path=str(e).partition(":")[0]) from e

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a number (YAML 1.2) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # SafeLoader reports unhashable keys itself
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)(?:\.[\d_]*)?[eE][-+]?\d+$"),
    list("-+0123456789"),
)

def spec_to_json(spec: StudySpec) -> str:
    """The stored form of a spec: stable JSON text, versioned."""
    return json.dumps({"version": SPEC_VERSION, "spec": spec.model_dump(mode="json")})

def spec_from_json(text: str) -> StudySpec:
    """The spec stored with a study, validated again against this version of the trainer."""
    try:
        stored = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"<stored spec>: not valid JSON: {e}") from e
    version = stored.get("version") if isinstance(stored, dict) else None
    if version != SPEC_VERSION:
        raise SpecError(f"<stored spec>: expected spec version {SPEC_VERSION}, got "
                        f"{show(version)}; was the study written by another hpsearch?")
    return parse_spec(stored["spec"], source="<stored spec>")

def base_train_config(spec: StudySpec) -> TrainConfig:
    """The trainer config every trial starts from: data, model, fixed and budget.epochs."""
    try:
        return config_from_dict(constant_values(spec))
    except ConfigError as e:
        raise SpecError(f"the study's constant settings: {e}") from e

def train_config_for(spec: StudySpec, params: dict[str, Any]) -> TrainConfig:
    """The trainer config of one trial: the base plus its flat params (real values)."""
    try:
        return config_from_dict(params, base=base_train_config(spec))
    except ConfigError as e:
        raise SpecError(f"trial params {show(params)}: {e}") from e

def build_sampler(spec: StudySpec, *, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler; options the sampler rejects are a SpecError naming them.

    `salt` shifts the seed: parallel workers, and a resumed study, must not replay the same
    random draws as the first worker of the first run.
    """
    seed = spec.sampler.seed
    if salt and seed is not None:
        # Wrapped into numpy's seed range: a joining worker's salt grows with its pid.
        seed = (seed + salt) % 2**32
    return build("sampler", spec.sampler.type, dict(spec.sampler.options),
                 Settings(seed=seed, epochs=spec.budget.epochs,
                          grid=lambda: grid_search_space(spec)))

def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner; options the pruner rejects are a SpecError naming them."""
    return build_pruner_of(spec.pruner, Settings(seed=spec.sampler.seed, epochs=spec.budget.epochs))

def drawn_configs(spec: StudySpec, n: int, *, seed: int = 0) -> list[TrainConfig]:
    """`n` trainer configs of the space, drawn by a seeded RandomSampler in memory (no storage).
    An `auto` lr key keeps its base value: its range comes from the LR range test at run."""
    auto = auto_lr_key(spec)
    drawn = spec.model_copy(update={"space": {k: v for k, v in spec.space.items()
                                              if k != auto}})
    # Optuna says "a new study created in memory" at INFO: its logging is the program's to
    # set (the command line quiets it), never this function's.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(train_config_for(drawn, suggest(trial, drawn)))
        study.tell(trial, 0.0)
    return configs


def pack_outlook(spec: StudySpec, *, samples: int = 64) -> str | None:
    """One line on how `run.pack` will treat the space's trials, from `samples` configs drawn
    at random (`drawn_configs`): all packed, some alone and why, or none (None without
    `run.pack`)."""
    pack = spec.run.pack
    if pack in (None, 1) or spec.trainer is not None:
        return None
    reasons: dict[str, int] = {}
    for config in drawn_configs(spec, samples):
        reason = trainers.pack_refusal(config)
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    alone = sum(reasons.values())
    if not alone:
        return f"run.pack {pack}: every trial of the space can be packed"
    why = max(reasons, key=lambda r: reasons[r])
    share = "no trial packs" if alone == samples else (
        f"about {round(100 * alone / samples)}% of the space's trials run alone")
    return f"run.pack {pack}: {share} ({why})"


def sampler_outlook(spec: StudySpec) -> str | None:
    """One line when the sampler cannot learn from the trials the pruner stops: `gp` fits
    completed trials only, `cmaes` passes over pruned ones unless told otherwise. Under a
    pruner that stops most trials, such a sampler keeps proposing where they were (on the
    shipped FashionMNIST space, GP drew lr 1.0 for most of its trials). None otherwise."""
    sampler, pruner = spec.sampler, spec.pruner
    if pruner.type == "none":
        return None
    if sampler.type == "gp":
        return (f"sampler gp learns from completed trials only: the trials pruner {pruner.label} "
                f"stops teach it nothing, and it keeps proposing where they were; pair it with "
                f"pruner: {{type: none}} (docs/study-file.md#sampler)")
    if sampler.type == "cmaes" and not sampler.options.get("consider_pruned_trials"):
        return (f"sampler cmaes passes over pruned trials unless its options say "
                f"consider_pruned_trials: true, and pruner {pruner.label} stops trials "
                f"(docs/study-file.md#sampler)")
    return None


def describe(spec: StudySpec) -> str:
    """One line on a valid spec: what it searches, how long, with which sampler and pruner."""
    auto = auto_lr_key(spec)
    dists = [f"{key} (auto: LR range test at run)" if key == auto else entry.optuna_name(key)
             for key, entry in spec.space.items()]
    if auto is None:
        distributions(spec)  # every entry maps onto an Optuna distribution
    return (f"valid study {spec.name!r}: {len(dists)} searched parameters ({', '.join(dists)}), "
            f"{spec.budget.trials} trials x {spec.budget.epochs} epochs, "
            f"sampler {spec.sampler.type}, pruner {spec.pruner.label}"
            + (f", constraints {', '.join(labels(spec.constraints))}" if spec.constraints
               else ""))
