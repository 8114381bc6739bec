"""The study file: strict models, one clear error per bad file, and the stored JSON form.

``load_spec`` reads YAML, ``parse_spec`` validates it in two passes — the shape with pydantic,
then every setting against the trainer's own config (``config_from_dict``) — and reports the
first problem as ``<file>: <key path>: <what was expected>, got <value>``.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any

import optuna
import yaml
from pydantic import (
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from search._algorithms import PRUNERS as _PRUNER_INFO
from search._algorithms import SAMPLERS as _SAMPLER_INFO
from search._errors import SpecError
from search._knobs import check_constants, constant_values
from search._space import check_space, enqueue_params
from search._space_entries import SpaceEntry
from search._spec_model import (
    Number,
    SpecModel,
    did_you_mean,
    fail,
    from_pydantic,
    show,
    spec_error,
)
from trainers import ConfigError, TrainConfig, config_from_dict

SPEC_VERSION = 1

METRICS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy", "epoch_seconds")
DIRECTIONS = ("minimize", "maximize")
# The registries live with the factories; the spec only needs names and Optuna classes.
SAMPLERS = {name: info.optuna_class for name, info in _SAMPLER_INFO.items()}
PRUNERS = {name: info.optuna_class for name, info in _PRUNER_INFO.items()}
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def default_direction(metric: str) -> str:
    """Accuracies are maximized; losses and seconds minimized."""
    return "maximize" if metric.endswith("accuracy") else "minimize"


def _one_of(choices: tuple[str, ...] | list[str], what: str) -> Any:
    def check(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        guess = did_you_mean(value, list(choices)) if isinstance(value, str) else ""
        raise spec_error(f"expected {what}: {', '.join(choices)}; got {show(value)}{guess}")

    return Annotated[str, PlainValidator(check)]


def _study_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise spec_error(f"expected a study name of letters, digits, '-', '_' and '.', "
                         f"got {show(value)}")
    return value


Metric = _one_of(METRICS, "a metric, one of")
Direction = _one_of(DIRECTIONS, "one of")
SamplerType = _one_of(list(SAMPLERS), "a sampler, one of")
PrunerType = _one_of(list(PRUNERS), "a pruner, one of")


class Objective(SpecModel):
    """``{metric, direction}`` for one objective, ``{metrics, directions}`` for several."""

    metric: Metric | None = None
    direction: Direction | None = None
    metrics: list[Metric] | None = None
    directions: list[Direction] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Objective:
        if self.metrics is None:
            if self.directions is not None:
                raise spec_error("directions go with metrics (several objectives); "
                                 "use direction", key="directions")
            self.metric = self.metric or "val_loss"
            self.direction = self.direction or default_direction(self.metric)
        else:
            for key in ("metric", "direction"):
                if getattr(self, key) is not None:
                    raise spec_error(f"give {key} (one objective) or {key}s (several), "
                                     "not both", key=key)
            if len(self.metrics) < 2 or len(set(self.metrics)) != len(self.metrics):
                raise spec_error(f"expected two or more distinct metrics, got "
                                 f"{show(self.metrics)}", key="metrics")
            if self.directions is None:
                self.directions = [default_direction(m) for m in self.metrics]
            if len(self.directions) != len(self.metrics):
                raise spec_error(f"expected one direction per metric ({len(self.metrics)}), "
                                 f"got {show(self.directions)}", key="directions")
        pairs = zip(self.metric_names, self.direction_names, strict=True)
        for i, (metric, direction) in enumerate(pairs):
            if direction != default_direction(metric):
                key = "direction" if self.metrics is None else f"directions[{i}]"
                raise spec_error(f"expected {default_direction(metric)} for {metric}, "
                                 f"got {show(direction)}", key=key)
        return self

    @property
    def is_multi(self) -> bool:
        return self.metrics is not None

    @property
    def metric_names(self) -> list[str]:
        return list(self.metrics) if self.metrics is not None else [str(self.metric)]

    @property
    def direction_names(self) -> list[str]:
        """The directions in order, as ``optuna.create_study(directions=…)`` takes them."""
        if self.directions is not None:
            return list(self.directions)
        return [str(self.direction)]


class Budget(SpecModel):
    trials: StrictInt = Field(60, ge=1)  # COMPLETE + PRUNED, across every worker
    epochs: StrictInt = Field(10, ge=1)
    timeout_s: Number | None = None

    @field_validator("timeout_s")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise spec_error(f"expected a positive number of seconds or null, got {show(value)}")
        return value


def _check_options(options: dict[str, Any], cls: type, reserved: dict[str, str]) -> None:
    params = inspect.signature(cls.__init__).parameters
    known = [n for n, p in params.items() if n != "self" and n not in reserved
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in options:
        if key in reserved:
            raise spec_error(reserved[key], key=f"options.{key}")
        if key not in known:
            raise spec_error(f"unknown option of {cls.__name__}{did_you_mean(key, known)} "
                             f"(expected one of: {', '.join(known) or 'none'})",
                             key=f"options.{key}")


class SamplerSpec(SpecModel):
    type: SamplerType = "tpe"
    seed: StrictInt | None = 0
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the sampler

    @model_validator(mode="after")
    def _options(self) -> SamplerSpec:
        _check_options(self.options, getattr(optuna.samplers, SAMPLERS[self.type]), {
            "seed": "set sampler.seed instead",
            "search_space": "the grid sampler takes its grid from the space",
        })
        return self


class PrunerSpec(SpecModel):
    type: PrunerType = "hyperband"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the pruner

    @model_validator(mode="after")
    def _options(self) -> PrunerSpec:
        _check_options(self.options, getattr(optuna.pruners, PRUNERS[self.type]), {})
        return self


class RunSpec(SpecModel):
    checkpoint_dir: StrictStr | None = None
    keep_checkpoints: StrictBool = False
    heartbeat_interval: StrictInt = Field(10, gt=0)  # seconds between a trial's heartbeats
    grace_period: StrictInt = Field(30, gt=0)  # seconds without one before a trial is failed
    max_failures_in_row: StrictInt = Field(5, gt=0)  # a worker stops after this many

    @model_validator(mode="after")
    def _grace(self) -> RunSpec:
        if self.grace_period <= self.heartbeat_interval:
            raise spec_error(f"expected more than heartbeat_interval "
                             f"({self.heartbeat_interval}), got {self.grace_period}",
                             key="grace_period")
        return self


class StudySpec(SpecModel):
    """A validated study file; ``model_dump()`` is the plain dict stored with the study."""

    name: Annotated[str, PlainValidator(_study_name)]
    objective: Objective = Field(default_factory=Objective)
    budget: Budget = Field(default_factory=Budget)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    data: dict[str, Any]
    model: dict[str, Any]
    space: dict[str, SpaceEntry]
    fixed: dict[str, Any] = Field(default_factory=dict)
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    run: RunSpec = Field(default_factory=RunSpec)

    @model_validator(mode="before")
    @classmethod
    def _no_pruning_for_several_objectives(cls, data: Any) -> Any:
        # Optuna cannot prune a multi-objective study, so there the default pruner is none.
        if isinstance(data, dict) and "pruner" not in data:
            objective = data.get("objective")
            if isinstance(objective, dict) and objective.get("metrics") is not None:
                return {**data, "pruner": {"type": "none"}}
        return data

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise spec_error("expected at least one parameter to search, got {}")
        return space

    @model_validator(mode="after")
    def _objectives_and_pruning(self) -> StudySpec:
        if self.objective.is_multi and self.pruner.type != "none":
            raise spec_error(f"Optuna cannot prune multi-objective studies; set pruner: "
                             f"{{type: none}}, got {show(self.pruner.type)}", key="pruner.type")
        if self.objective.is_multi and self.sampler.type == "cmaes":
            raise spec_error("CMA-ES optimizes a single objective; for several use tpe, nsga2, "
                             "gp or random, got 'cmaes'", key="sampler.type")
        return self


def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> StudySpec:
    """Validate a study file's contents; raise one SpecError naming the first bad key."""
    try:
        if not isinstance(data, dict):
            raise fail("(top level)", f"expected a mapping of study settings, got {show(data)}")
        try:
            spec = StudySpec.model_validate(data)
        except ValidationError as e:
            raise from_pydantic(e) from e
        constants = check_constants(spec)
        check_space(spec, base_train_config(spec), constants)
        for i, entry in enumerate(spec.enqueue):
            enqueue_params(spec, entry, path=f"enqueue[{i}]")
    except SpecError as e:
        raise SpecError(f"{source}: {e}", path=e.path) from e
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a YAML study file; a missing file or bad YAML is a SpecError too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SpecError(f"{path}: no such study file") from e
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
    _check_network(spec, path)
    return spec


_FINE_TUNING = ("model.weights", "model.freeze", "model.freeze_blocks")


def _check_network(spec: StudySpec, path: Path) -> None:
    """A fine-tuning study's weights file and freeze settings, checked before a study starts.

    They depend on the network, so only building it tells: it is built (on the CPU, with the
    data's shape) with the weights and with each searched `freeze` and the deepest searched
    `freeze_blocks`, so a file that does not fit or a prefix that names nothing is one error
    now, not a failure in every trial. Workers elsewhere need the file at the same path.
    """
    from search._knobs import canonical

    base = base_train_config(spec)
    searched = {canonical(key): entry for key, entry in spec.space.items()}
    model = base.model
    if not (model.weights or model.freeze != "none" or model.freeze_blocks
            or any(knob in searched for knob in _FINE_TUNING)):
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
    from trainers import TrainerError, load_data
    from trainers._finetune import prepare_model
    from trainers._optimizers import build_optimizer

    try:
        data = load_data(base.data)
        for variant in variants:
            config = base.replace(**variant, device="cpu")
            net = prepare_model(config.model, config.init, data.input_shape, data.num_classes)
            build_optimizer(net.model, config.optimizer, lr=config.optimizer.lr, head=net.head,
                            frozen=net.frozen, unfreezes=config.model.unfreeze_after is not None)
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
