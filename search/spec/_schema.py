"""The study file's schema: strict pydantic models for every top-level key.

The shape of a file and each value's type and range are checked here; every setting against
the trainer's own config is `_study_file`'s second pass.
"""

from __future__ import annotations

import inspect
import re
from typing import Annotated, Any

from pydantic import (
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from search._errors import SpecError
from search.spec._algorithms import PRUNERS as _PRUNER_INFO
from search.spec._algorithms import SAMPLERS as _SAMPLER_INFO
from search.spec._algorithms import Settings, algorithm_class, build, build_pruner_of, is_path
from search.spec._constraints import Constraint, check_constraints
from search.spec._entries import SpaceEntry
from search.spec._model import (
    Metric,
    Number,
    SpecModel,
    did_you_mean,
    is_number,
    show,
    spec_error,
)
from search.spec._tracking import TrackingSpec

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

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# What a command's arguments may name besides the trial's parameters.
COMMAND_FIELDS = ("trial_number", "study_name", "checkpoint_dir", "epochs", "device", "nproc",
                  "gpus", "master_port")


Direction = _one_of(DIRECTIONS, "one of")

def _algorithm_type(kind: str, names: list[str]) -> Any:
    """A built-in's name, or `pkg.module:Class` (imported by the section's own check)."""
    def check(value: Any) -> str:
        if isinstance(value, str) and value in names:
            return value
        if isinstance(value, str) and is_path(value):
            module, _, attr = value.partition(":")
            if module and attr:
                return value
            raise spec_error(f"expected an import path pkg.module:Class, got {show(value)}")
        guess = did_you_mean(value, names) if isinstance(value, str) else ""
        raise spec_error(f"expected a {kind}, one of: {', '.join(names)}, or a class by import "
                         f"path (pkg.module:Class); got {show(value)}{guess}")

    return Annotated[str, PlainValidator(check)]


SamplerType = _algorithm_type("sampler", list(SAMPLERS))
PrunerType = _algorithm_type("pruner", list(PRUNERS))

class ObjectiveSpec(SpecModel):
    """``{metric, direction}`` for one objective, ``{metrics, directions}`` for several."""

    metric: Metric | None = None
    direction: Direction | None = None
    metrics: list[Metric] | None = None
    directions: list[Direction] | None = None

    @model_validator(mode="after")
    def _complete(self) -> ObjectiveSpec:
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
            # The built-in metrics have one sensible direction; a user's own are theirs to say.
            if metric in METRICS and direction != default_direction(metric):
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

def _class_of(kind: str, name: str) -> type:
    try:
        return algorithm_class(kind, name)
    except SpecError as e:
        raise spec_error(str(e), key="type") from e

_MAX_SEED = 2**32 - 1  # numpy's RandomState, behind every Optuna sampler, takes no more


class SamplerSpec(SpecModel):
    type: SamplerType = "tpe"
    seed: StrictInt | None = 0
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the sampler

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= _MAX_SEED:
            raise spec_error(f"expected an integer from 0 to {_MAX_SEED} or null, "
                             f"got {show(value)}")
        return value

    @model_validator(mode="after")
    def _options(self) -> SamplerSpec:
        reserved = {"seed": "set sampler.seed instead"}
        if self.type == "grid":
            reserved["search_space"] = "the grid sampler takes its grid from the space"
        _check_options(self.options, _class_of("sampler", self.type), reserved)
        return self

class PrunerSpec(SpecModel):
    type: PrunerType = "hyperband"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the pruner
    # Space keys whose values make a group: a trial is judged against its group alone.
    within: list[StrictStr] = Field(default_factory=list)
    wrapped: PrunerSpec | None = None  # the pruner a `patient` pruner asks once patience runs out

    @property
    def label(self) -> str:
        """`hyperband`, `hyperband within scheduler`, `patient(median)`: how the views name the
        pruner."""
        name = self.type if self.wrapped is None else f"{self.type}({self.wrapped.label})"
        return name + (f" within {', '.join(self.within)}" if self.within else "")

    @model_validator(mode="after")
    def _options(self) -> PrunerSpec:
        reserved = {"wrapped_pruner": "set pruner.wrapped instead"} if self.type == "patient" \
            else {}
        _check_options(self.options, _class_of("pruner", self.type), reserved)
        if self.type == "patient" and self.wrapped is None:
            raise spec_error("required key is missing: the pruner patience defers to, e.g. "
                             "wrapped: {type: median} ({type: none}: patience alone)",
                             key="wrapped")
        if self.type != "patient" and self.wrapped is not None:
            raise spec_error(f"goes with type: patient, and the type is {show(self.type)}",
                             key="wrapped")
        if self.wrapped is not None and self.wrapped.within:
            # Groups are the whole pruner's: the study judges a trial within its group.
            raise spec_error("groups trials for the whole pruner: set pruner.within",
                             key="wrapped.within")
        return self

PACK_MAX = 256  # trials in one pack at most (`--pack`): past it the batched matmuls stop paying


def pack_value(value: Any) -> int | str | None:
    """`run.pack` and `--pack`: None or 1 (off), an integer 2..PACK_MAX, or "auto"."""
    if value is None or value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= PACK_MAX:
        return value
    raise spec_error(f"expected auto or an integer from 1 to {PACK_MAX} (trials trained at "
                     f"once), got {show(value)}")


class RunSpec(SpecModel):
    checkpoint_dir: StrictStr | None = None
    keep_checkpoints: StrictBool = False
    heartbeat_interval: StrictInt = Field(10, gt=0)  # seconds between a trial's heartbeats
    grace_period: StrictInt = Field(30, gt=0)  # seconds without one before a trial is failed
    max_failures_in_row: StrictInt = Field(5, gt=0)  # a worker stops after this many
    # Trials one worker trains at once (search.trial._packing): None or 1 off, or "auto".
    pack: Annotated[int | str | None, PlainValidator(pack_value)] = None

    @field_validator("checkpoint_dir")
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        # A folder (shared, for many machines), or a bucket a retry on any node reaches.
        if value is not None and "://" in value and not re.fullmatch(r"s3://[^/]+(/.*)?", value):
            raise spec_error(f"expected a folder or s3://bucket/prefix, got {show(value)}")
        return value

    @model_validator(mode="after")
    def _grace(self) -> RunSpec:
        if self.grace_period <= self.heartbeat_interval:
            raise spec_error(f"expected more than heartbeat_interval "
                             f"({self.heartbeat_interval}), got {self.grace_period}",
                             key="grace_period")
        return self

def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise spec_error(f"expected a whole number 1 or more, got {show(value)}")


Count = Annotated[int, PlainValidator(_count)]


class Resources(SpecModel):
    """How wide one trial is: ``{gpus: N}`` (N GPUs of one machine, a process each) or
    ``{processes: N}`` (N CPU processes); a trial of width above 1 runs as N ranks of one
    process group (`search.trial._ranks`)."""

    gpus: Count | None = None
    processes: Count | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Resources:
        if self.gpus is not None and self.processes is not None:
            raise spec_error("expected gpus (N GPUs a trial) or processes (N CPU processes a "
                             f"trial), not both; got gpus: {self.gpus}, processes: "
                             f"{self.processes}")
        return self

    @property
    def width(self) -> int:
        """The processes (ranks) of one trial."""
        return self.gpus or self.processes or 1

    @property
    def label(self) -> str:
        """`2 GPUs`, `2 processes`: how messages name a trial's width."""
        if self.gpus is not None:
            return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        n = self.width
        return f"{n} process{'es' if n > 1 else ''}"


def _command_part(value: Any) -> str:
    # YAML's true would reach the program as "1.0" and null as "None": only strings and
    # numbers are arguments as written.
    if isinstance(value, str) or is_number(value):
        return str(value)
    raise spec_error(f"expected a string or a number (quote true, false and null), "
                     f"got {show(value)}")


CommandPart = Annotated[str, PlainValidator(_command_part)]
KILL_GRACE_S = 10.0


class TrainerSpec(SpecModel):
    """A user's training code in place of the built-in trainer: ``trainer: pkg.mod:fit`` (a
    function, called in the worker) or ``trainer: {command: [...]}`` (a process per trial)."""

    function: StrictStr | None = None
    command: list[CommandPart] | None = None
    trial_timeout_s: Number | None = None  # a command's trial is ended after this long
    kill_grace_s: Number = KILL_GRACE_S  # between SIGTERM and SIGKILL when a command is stopped
    env: dict[str, StrictStr] = Field(default_factory=dict)  # added to a command's environment

    @model_validator(mode="before")
    @classmethod
    def _function_by_path(cls, data: Any) -> Any:
        return {"function": data} if isinstance(data, str) else data

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        # The OS refuses these when every trial's process starts; say so at load instead.
        for name, value in env.items():
            if not name or "=" in name or "\0" in name:
                raise spec_error(f"expected variable names, not empty and without '=' or NUL, "
                                 f"got {show(name)}")
            if "\0" in value:
                raise spec_error(f"expected a value without NUL characters, got {show(value)}",
                                 key=name)
        return env

    @model_validator(mode="after")
    def _one_form(self) -> TrainerSpec:
        if (self.function is None) == (self.command is None):
            raise spec_error("expected a function (trainer: pkg.module:fit) or a command "
                             "(trainer: {command: [python, train.py, ...]}), one of them")
        if self.function is not None:
            module, _, attr = self.function.partition(":")
            if not module or not attr:
                raise spec_error(f"expected an import path module:function, got "
                                 f"{show(self.function)}", key="function")
            # A stored spec carries the default kill_grace_s: only another value is the user's.
            if self.kill_grace_s != KILL_GRACE_S:
                raise spec_error("goes with command: (a function runs inside the worker)",
                                 key="kill_grace_s")
            for key in ("trial_timeout_s", "env"):
                if getattr(self, key):
                    raise spec_error("goes with command: (a function runs inside the worker)",
                                     key=key)
        if self.command is not None and not self.command:
            raise spec_error("expected the program and its arguments, got []", key="command")
        for key in ("trial_timeout_s", "kill_grace_s"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise spec_error(f"expected a positive number of seconds, got {show(value)}",
                                 key=key)
        return self

    def placeholders(self) -> list[tuple[int, str]]:
        """(argument index, name) of every ``{name}`` in the command's arguments."""
        return [(i, m.group(1)) for i, part in enumerate(self.command or [])
                for m in _PLACEHOLDER.finditer(str(part))]


class StudySpec(SpecModel):
    """A validated study file; ``model_dump()`` is the plain dict stored with the study."""

    name: Annotated[str, PlainValidator(_study_name)]
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    budget: Budget = Field(default_factory=Budget)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    trainer: TrainerSpec | None = None  # a user's own training code; None: the built-in one
    data: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, SpaceEntry]
    fixed: dict[str, Any] = Field(default_factory=dict)
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    run: RunSpec = Field(default_factory=RunSpec)
    resources: Resources = Field(default_factory=Resources)  # how wide one trial is
    tracking: TrackingSpec | None = None  # MLflow, TensorBoard, W&B (search.tracking)
    # Bounds on reported metrics, for the samplers that use them (search.spec._constraints).
    constraints: list[Constraint] = Field(default_factory=list)

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
    def _trainer(self) -> StudySpec:
        if self.trainer is None:
            for section in ("data", "model"):
                if section not in self.model_fields_set:
                    raise spec_error("required key is missing", key=section)
            for i, metric in enumerate(self.objective.metric_names):
                if metric not in METRICS:
                    key = "objective.metric" if not self.objective.is_multi else \
                        f"objective.metrics[{i}]"
                    raise spec_error(f"expected a metric, one of: {', '.join(METRICS)}; got "
                                     f"{show(metric)}{did_you_mean(metric, list(METRICS))} (or "
                                     "any metric your own trainer: reports)", key=key)
            return self
        for section in ("data", "model"):
            if getattr(self, section):
                raise spec_error(f"goes with the built-in trainer; your trainer "
                                 f"({self.trainer_name}) reads its own data and builds its own "
                                 "model: put their settings under fixed:", key=section)
        known = set(self.space) | set(self.fixed) | set(COMMAND_FIELDS)
        for i, name in self.trainer.placeholders():
            if name not in known:
                guess = did_you_mean(name, sorted(known))
                raise spec_error(f"{{{name}}} names no parameter{guess} (expected a key of "
                                 f"space or fixed, or one of: {', '.join(COMMAND_FIELDS)})",
                                 key=f"trainer.command[{i}]")
        return self

    @property
    def trainer_name(self) -> str:
        """The user's function or program, for messages ("the built-in trainer" without one)."""
        if self.trainer is None:
            return "the built-in trainer"
        return self.trainer.function or " ".join(map(str, (self.trainer.command or [])[:2]))

    @model_validator(mode="after")
    def _objectives_and_pruning(self) -> StudySpec:
        if self.objective.is_multi and self.pruner.type != "none":
            raise spec_error(f"Optuna cannot prune multi-objective studies; set pruner: "
                             f"{{type: none}}, got {show(self.pruner.type)}", key="pruner.type")
        if self.objective.is_multi and self.sampler.type == "cmaes":
            raise spec_error("CMA-ES optimizes a single objective; for several use tpe, nsga2, "
                             "gp or random, got 'cmaes'", key="sampler.type")
        return self

    @model_validator(mode="after")
    def _constraints(self) -> StudySpec:
        check_constraints(self.constraints, self.sampler.type, built_in=self.trainer is None)
        return self

    @model_validator(mode="after")
    def _pruning_groups(self) -> StudySpec:
        within = self.pruner.within
        if within and self.pruner.type == "none":
            raise spec_error("groups trials for a pruner, and pruner.type is none",
                             key="pruner.within")
        for i, key in enumerate(within):
            if key not in self.space:
                raise spec_error(f"expected a key of space ({', '.join(self.space)}), got "
                                 f"{show(key)}{did_you_mean(key, list(self.space))}",
                                 key=f"pruner.within[{i}]")
            if not self.space[key].discrete():
                raise spec_error(f"a group needs a discrete parameter (choices, grid, pow2 or an "
                                 f"int range), and space.{key} is a float range",
                                 key=f"pruner.within[{i}]")
            if key in within[:i]:
                raise spec_error(f"{show(key)} is listed twice", key=f"pruner.within[{i}]")
        return self

    @model_validator(mode="after")
    def _width_alone(self) -> StudySpec:
        if self.resources.width > 1 and self.run.pack not in (None, 1):
            raise spec_error(f"packs trials into one process, and resources gives each trial "
                             f"{self.resources.label}: use one or the other",
                             key="run.pack")
        return self

    @model_validator(mode="after")
    def _options_accepted(self) -> StudySpec:
        # Option values are Optuna's to judge: build the sampler and pruner now, so a value
        # they refuse fails `validate`, not `run`. (The grid sampler takes no options.) A
        # class by import path, or a patient pruner, is built in any case: its required
        # arguments may be missing.
        settings = Settings(seed=self.sampler.seed, epochs=self.budget.epochs)
        for kind, section in (("sampler", self.sampler), ("pruner", self.pruner)):
            if section.options or is_path(section.type) or getattr(section, "wrapped", None):
                try:
                    if kind == "pruner":
                        build_pruner_of(section, settings)
                    else:
                        build(kind, section.type, dict(section.options), settings)
                except SpecError as e:
                    key = f"{kind}.type" if str(e).startswith(f"{kind}.type: ") \
                        else f"{kind}.options"
                    detail = " ".join(str(e).removeprefix(f"{key}: ").split())
                    raise spec_error(detail, key=key) from e
        return self
