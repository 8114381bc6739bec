"""The training configuration: one frozen dataclass per concern, built once and passed down.

`config_from_dict` is the only way in from untyped data (a YAML file, a trial's sampled params):
it accepts the nested form (``optimizer: {name: sgd, lr: 0.1}``) and the flat knob names a
search space uses (``optimizer: sgd, lr: 0.1, scheduler: cosine``), checks every key and every
value's type, and names the offending key path when something is wrong.

Light to import (no torch): names (an optimizer's, a dataset's …) are checked against the
registries (`trainers._validate`, which imports torch) when a config is built, loaded then;
within `names_trusted()` they are not, for configs read back from where checked ones were
stored (a study's spec), so a command that only reads a study never loads torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Union

from trainers._errors import ConfigError
from trainers._plugins import DATASET_GROUP, MODEL_GROUP, Args, is_plugin
from trainers._registry import guess


@dataclass(frozen=True)
class DataConfig:
    """The `data` section: which dataset, how it is split into train and validation, what is
    kept of it, how batches are augmented, and how streamed data is read."""

    dataset: str = "fashion_mnist"
    val_fraction: float = 0.2  # the customary 80/20 split of the training set
    seed: int = 0  # seeds the split, not the training
    normalize: bool = True
    augment: tuple[str, ...] = ()  # batch-level, on tensors: "crop" (pad 4), "flip"
    data_dir: str | None = None
    classes: tuple[int, ...] | None = None  # keep only these labels (relabelled 0..k-1)
    train_subset: int | None = None  # seeded subset of the training part
    size: int | None = None  # synthetic only: number of training examples
    # image_folder only: the folder of class subfolders, the test split's, exact resize (N or
    # [H, W]), channels (1 or 3; None: the first image's).
    root: str | None = None
    test_root: str | None = None
    resize: tuple[int, ...] | None = None
    channels: int | None = None
    # Streamed datasets (image_folder, a loader's Datasets): the DataLoader's settings.
    num_workers: int | None = None  # None: one per usable CPU, at most 4
    pin_memory: bool | None = None  # None: on when training on CUDA
    persistent_workers: bool = True
    # A plugin dataset's own keyword arguments: the data section's keys that are not the above.
    args: Args = field(default_factory=Args)


@dataclass(frozen=True)
class ModelConfig:
    """The `model` section: the network (a built-in family or a plugin's) and its shape, and
    for fine-tuning the weights it starts from, what is frozen and until when, and its head."""

    type: str = "mlp"
    hidden: tuple[int, ...] = (128, 56)  # mlp: the everyday 784-128-56-10 FashionMNIST MLP
    activation: str = "relu"
    norm: str = "none"  # none | batchnorm | layernorm; or one per hidden layer, comma-separated
    dropout: float = 0.0
    widths: tuple[int, ...] = (32, 64)  # cnn: channels of each conv-BN-ReLU stage
    blocks: int = 1  # cnn: 3x3 conv-BN-ReLU blocks per stage
    pool: str = "max"  # cnn: pooling between stages, max | avg
    # torchvision networks (resnet18, …): "small" swaps the ImageNet stem for a 3x3 stride-1
    # conv without max-pool (CIFAR-style); "auto" picks small below 64 px; "imagenet" keeps the
    # torchvision layout, so ImageNet weights load.
    stem: str = "auto"
    # Fine-tuning. A state-dict file to start from (loaded with weights_only; nothing downloads).
    weights: str | None = None
    reset_head: bool = False  # re-initialize the head even where its shape fits (a new task)
    freeze: str = "none"  # none | backbone (all but the head) | comma list of name prefixes
    freeze_blocks: int = 0  # freeze the first N blocks (stem, stages, …) in forward order
    unfreeze_after: int | None = None  # epochs after which the frozen parameters train too
    bn_stats: str = "update"  # update | frozen (all BN layers) | frozen_layers (in frozen parts)
    # The head's module name, for fine-tuning (its own lr, re-initialized when its shape
    # differs); None finds it: the built-in networks know theirs, a plugin's is its last Linear.
    head: str | None = None
    # A plugin model's own keyword arguments: the model section's keys other than `OWN_KEYS`.
    args: Args = field(default_factory=Args)


@dataclass(frozen=True)
class OptimizerConfig:
    """The `optimizer` section: the update rule (`OPTIMIZERS`), its lr (scaled by the batch
    size with `lr_per_batch`: `trainers.scale_lr`) and settings, and fine-tuning's per-group
    lr multipliers and weight decay."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    alpha: float = 0.99  # rmsprop smoothing
    rho: float = 0.9  # adadelta
    decay_all: bool = False  # also decay biases and norm weights (off: the usual practice)
    lr_per_batch: int | None = None  # linear scaling: lr is per this many examples (Goyal)
    # Parameter groups for fine-tuning: the head, and the layers `unfreeze_after` releases.
    head_lr_mult: float = 1.0
    head_weight_decay: float | None = None  # None: the same as weight_decay
    unfrozen_lr_mult: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    """The `schedule` section: the lr schedule (`LR_SCHEDULES`), its warmup, and each
    schedule's settings (each comment names the schedules that read it)."""

    name: str = "constant"
    warmup_epochs: float = 0.0  # linear warmup in front of any schedule
    step_size: int = 10  # step: epochs between decays
    milestones: tuple[int, ...] = (15, 30)  # multistep
    gamma: float | None = None  # step 0.1, multistep 0.5, exponential 0.9 (per epoch)
    floor: float = 0.01  # exponential: lowest lr as a fraction of the base lr (d2l's floor)
    power: float = 2.0  # polynomial
    final_lr_factor: float = 0.0  # cosine/linear/polynomial end at lr * this
    pct_start: float = 0.45  # onecycle: share of steps rising (and as many falling)
    div_factor: float = 25.0  # onecycle: start at lr / this
    final_div_factor: float = 1e4  # onecycle: tail ends at start lr / this
    max_momentum: float = 0.95  # onecycle: momentum cycled opposite to lr (Smith)
    base_momentum: float = 0.85
    cycle_epochs: float = 2.0  # cyclic: half-cycle length in epochs (Smith: 2-10 x iters/epoch)
    cycle_div: float = 4.0  # cyclic: base lr = lr / this (Smith: max/3-4)
    mode: str = "triangular"  # cyclic: triangular | triangular2
    factor: float = 0.5  # plateau: multiply lr by this when validation loss stalls
    patience: int = 2  # plateau: epochs without improvement before a cut
    min_lr: float = 0.0  # plateau: never below


@dataclass(frozen=True)
class InitConfig:
    """The `init` section: how the network's weights are initialized (`INITS`) and the
    settings of the schemes that take any."""

    name: str = "default"
    std: float = 0.01  # normal
    mode: str = "fan_in"  # kaiming
    nonlinearity: str = "relu"  # kaiming
    gain: float = 1.0  # xavier, orthogonal


# Checks of names against the registries (data, models, optimizers, schedules, inits), added
# by the package's face (`trainers/__init__`) when it loads: the registries import this module.
NAME_CHECKS: list[Callable[[TrainConfig], None]] = []
# Whether they run when a config is built (see `names_trusted`).
_CHECK_NAMES: ContextVar[bool] = ContextVar("trainers_check_names", default=True)


@contextmanager
def names_trusted() -> Iterator[None]:
    """Within it, configs are built without checking their names against the registries (data,
    models, optimizers, schedules, inits), and so without importing torch: for configs read
    back from where checked ones were stored. Ranges and types are still checked."""
    token = _CHECK_NAMES.set(False)
    try:
        yield
    finally:
        _CHECK_NAMES.reset(token)


@dataclass(frozen=True)
class TrainConfig:
    """One run's whole configuration, built once (`config_from_dict`) and passed down: its
    sections, the batch size, epochs and seed, and where and how it executes (device,
    threads, precision), which may change when a run resumes."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    init: InitConfig = field(default_factory=InitConfig)
    batch_size: int = 256
    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    amp: bool = False  # mixed precision, used only on CUDA
    channels_last: bool = False  # NHWC memory format for conv nets, used only on CUDA
    # Flush denormal floats to zero on CPU (process-wide, set by each run): tiny weights and
    # gradients otherwise take the CPU's slow path (a 784-128-56-10 MLP's epoch at batch 32
    # runs markedly slower without it).
    flush_denormal: bool = True
    compile: bool = False  # torch.compile, used only on CUDA
    eval_batch_size: int = 2048
    divergence_factor: float = 20.0  # a loss this many times its first value has diverged
    max_grad_norm: float | None = None  # gradient clipping, off by default

    def __post_init__(self) -> None:
        _check_ranges(self)
        if _CHECK_NAMES.get():
            for check in NAME_CHECKS:
                check(self)

    def to_dict(self) -> dict[str, Any]:
        """The nested plain-data form; `config_from_dict(c.to_dict()) == c`.

        A plugin's section holds hpsearch's own keys and the plugin's arguments beside them, as
        a study file writes it; a built-in's has no `args`."""
        out = _plain(self)
        for name, (type_field, group) in _PLUGIN_KIND.items():
            section = out[name]
            args = section.pop("args")
            if is_plugin(section[type_field], group):
                own = {k: v for k, v in section.items() if k in OWN_KEYS[name]}
                clash = any(k in OWN_KEYS[name] for k in args)
                out[name] = {**own, "args": args} if clash else {**own, **args}
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with flat or dotted knobs changed, validated like `config_from_dict`."""
        return config_from_dict(changes, base=self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "init": InitConfig,
}

# The model and data settings that stay hpsearch's when the section names a plugin; every other
# key of the section is one of the plugin's keyword arguments.
OWN_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("type", "weights", "reset_head", "freeze", "freeze_blocks", "unfreeze_after",
              "bn_stats", "head", "args"),
    "data": ("dataset", "val_fraction", "seed", "normalize", "augment", "data_dir", "classes",
             "train_subset", "num_workers", "pin_memory", "persistent_workers", "args"),
}
_PLUGIN_KIND = {"model": ("type", MODEL_GROUP), "data": ("dataset", DATASET_GROUP)}


# Flat knob names a search space or a `fixed:` block uses, and where each lives.
ALIASES: dict[str, str] = {
    "optimizer": "optimizer.name",
    "lr": "optimizer.lr",
    "momentum": "optimizer.momentum",
    "nesterov": "optimizer.nesterov",
    "weight_decay": "optimizer.weight_decay",
    "beta1": "optimizer.beta1",
    "beta2": "optimizer.beta2",
    "eps": "optimizer.eps",
    "amsgrad": "optimizer.amsgrad",
    "scheduler": "schedule.name",
    "schedule": "schedule.name",
    "warmup_epochs": "schedule.warmup_epochs",
    "init": "init.name",
    "model": "model.type",
    "dataset": "data.dataset",
    "hidden": "model.hidden",
    "activation": "model.activation",
    "norm": "model.norm",
    "dropout": "model.dropout",
    "widths": "model.widths",
    "stem": "model.stem",
    "weights": "model.weights",
    "reset_head": "model.reset_head",
    "freeze": "model.freeze",
    "freeze_blocks": "model.freeze_blocks",
    "unfreeze_after": "model.unfreeze_after",
    "bn_stats": "model.bn_stats",
    "head_lr_mult": "optimizer.head_lr_mult",
    "head_weight_decay": "optimizer.head_weight_decay",
    "unfrozen_lr_mult": "optimizer.unfrozen_lr_mult",
}


def knob_names() -> list[str]:
    """Every key `config_from_dict` accepts: flat aliases, top-level fields, dotted paths."""
    names = list(ALIASES)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            names += [f"{f.name}.{g.name}" for g in dataclasses.fields(SECTIONS[f.name])]
        elif f.name not in names:
            names.append(f.name)
    return names


def config_from_dict(values: dict[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
    """Build a validated `TrainConfig` from nested and/or flat keys, over `base` or defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(values).__name__}")
    base = base or TrainConfig()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    flat = [(key, ALIASES.get(key, key), value) for key, value in _flatten(values)]
    plugin = _plugin_sections(flat, base)
    plugin_args: dict[str, dict[str, Any]] = {name: {} for name in plugin}
    for key, path, value in flat:
        head, _, rest = path.partition(".")
        if head in plugin and rest not in OWN_KEYS[head]:
            plugin_args[head][rest] = value  # the plugin's own argument: its code checks it
        elif head in SECTIONS and rest:
            cls = SECTIONS[head]
            if rest not in _field_names(cls):
                raise ConfigError(_unknown_key(key, [f"{head}.{n}" for n in _field_names(cls)]))
            sections[head][rest] = _coerce(key, value, _hints(cls)[rest])
        elif head in SECTIONS:
            raise ConfigError(f"{key}: expected a mapping of {head} settings, got {value!r}")
        elif head in _field_names(TrainConfig):
            top[head] = _coerce(key, value, _hints(TrainConfig)[head])
        else:
            raise ConfigError(_unknown_key(key, knob_names()))
    for name, args in plugin_args.items():
        given = sections[name].get("args", getattr(base, name).args)
        sections[name]["args"] = Args({**given, **args})
    built = {
        name: dataclasses.replace(getattr(base, name), **sections[name]) for name in SECTIONS
    }
    for name, (type_field, group) in _PLUGIN_KIND.items():
        section = built[name]
        if section.args and not is_plugin(getattr(section, type_field), group):
            if "args" in sections[name]:
                what = "network" if name == "model" else "dataset"
                raise ConfigError(f"{name}.args: only your own {what} (an import path or an "
                                  f"installed plugin) takes arguments; "
                                  f"{getattr(section, type_field)!r} is built in")
            # Arguments of the plugin `base` named, which this config replaces.
            built[name] = dataclasses.replace(section, args=Args())
    return dataclasses.replace(base, **built, **top)


def plugin_sections(model_type: str, dataset: str) -> set[str]:
    """Which of "model" and "data" name a plugin (an import path or an installed name)."""
    chosen = {"model": model_type, "data": dataset}
    return {name for name, (_, group) in _PLUGIN_KIND.items() if is_plugin(chosen[name], group)}


def is_plugin_argument(path: str, plugins: set[str]) -> bool:
    """Whether a dotted trainer path (`model.width`) is a keyword argument of a plugin section."""
    head, _, rest = path.partition(".")
    return head in plugins and bool(rest) and rest not in OWN_KEYS[head]


def _plugin_sections(flat: list[tuple[str, str, Any]], base: TrainConfig) -> set[str]:
    """The sections (model, data) whose type, as `flat` sets it over `base`, is a plugin."""
    chosen = {path: value for _, path, value in flat}
    return plugin_sections(chosen.get("model.type", base.model.type),
                           chosen.get("data.dataset", base.data.dataset))


def _flatten(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """Nested sections become dotted keys; a section given as a string is its name/type."""
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}")
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                out.append((f"{key}.{sub}", v))
        else:
            out.append((key, value))
    return out


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unknown_key(key: str, choices: list[str]) -> str:
    return f"{key}: unknown setting.{guess(key, choices)} Known settings: {', '.join(choices)}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is Args:
        if isinstance(value, Mapping):
            return Args(value)
        raise ConfigError(f"{key}: expected a mapping of keyword arguments, got {value!r}")
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug here, not input


# What a good value of each numeric setting is: (test, what to say). A tuple setting is checked
# item by item (`model.hidden[1]`); an optional setting left at None is not checked.
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "a positive number")
_NON_NEGATIVE = (lambda v: v >= 0, "zero or positive")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")  # dropout, momenta and moving averages
_SHARE = (lambda v: 0 <= v <= 1, "in [0, 1]")  # a part of the base lr
# torch.manual_seed's range (negative seeds are remapped, not refused).
_SEED = (lambda v: -(2 ** 63) <= v < 2 ** 64, "in [-2**63, 2**64)")

_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": _AT_LEAST_1,
    "epochs": _AT_LEAST_1,
    "eval_batch_size": _AT_LEAST_1,
    "seed": _SEED,
    "threads": _AT_LEAST_1,  # None: torch's default
    "divergence_factor": (lambda v: v > 1, "greater than 1"),
    "max_grad_norm": _POSITIVE,  # a negative norm would flip the gradients
    "data.val_fraction": _FRACTION,
    "data.seed": _SEED,
    "model.hidden": _AT_LEAST_1,
    "model.dropout": _FRACTION,
    "model.widths": _AT_LEAST_1,
    "model.blocks": _AT_LEAST_1,
    "model.freeze_blocks": _NON_NEGATIVE,
    "model.unfreeze_after": _AT_LEAST_1,
    "optimizer.lr": _POSITIVE,
    "optimizer.momentum": _FRACTION,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.beta1": _FRACTION,
    "optimizer.beta2": _FRACTION,
    "optimizer.eps": _POSITIVE,  # Adam and RMSprop divide by the root of an average plus eps
    "optimizer.alpha": _FRACTION,
    "optimizer.rho": _FRACTION,
    "optimizer.lr_per_batch": _AT_LEAST_1,
    "optimizer.head_lr_mult": _POSITIVE,
    "optimizer.head_weight_decay": _NON_NEGATIVE,
    "optimizer.unfrozen_lr_mult": _POSITIVE,
    "schedule.warmup_epochs": _NON_NEGATIVE,
    "schedule.step_size": _AT_LEAST_1,
    "schedule.milestones": _AT_LEAST_1,
    "schedule.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),  # a decay: 1 keeps the lr
    "schedule.floor": _SHARE,
    "schedule.power": _POSITIVE,
    "schedule.final_lr_factor": _SHARE,
    "schedule.pct_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    # One-cycle starts at lr / div_factor and ends below that: below 1 the "rise" would fall.
    "schedule.div_factor": _AT_LEAST_1,
    "schedule.final_div_factor": _AT_LEAST_1,
    "schedule.max_momentum": _FRACTION,
    "schedule.base_momentum": _FRACTION,
    "schedule.cycle_epochs": _POSITIVE,
    "schedule.cycle_div": _AT_LEAST_1,  # the cycle's bottom is lr / cycle_div
    "schedule.factor": (lambda v: 0 < v < 1, "in (0, 1)"),  # plateau: a cut, never a raise
    "schedule.patience": _NON_NEGATIVE,
    "schedule.min_lr": _NON_NEGATIVE,
    "init.std": _POSITIVE,
    "init.gain": _POSITIVE,
}


def _check_ranges(c: TrainConfig) -> None:
    """Values of the right type can still be nonsense; say which and why, at construction."""
    for key, (ok, expected) in _RANGES.items():
        value: Any = c
        for part in key.split("."):
            value = getattr(value, part)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            if item is not None and not ok(item):
                where = key if i is None else f"{key}[{i}]"
                raise ConfigError(f"{where}: expected {expected}, got {item!r}")
    if c.schedule.warmup_epochs >= c.epochs and c.schedule.warmup_epochs > 0:
        raise ConfigError(
            f"schedule.warmup_epochs: expected fewer than epochs ({c.epochs}), "
            f"got {c.schedule.warmup_epochs!r}"
        )
    milestones = c.schedule.milestones
    for i in range(1, len(milestones)):
        if milestones[i] <= milestones[i - 1]:
            raise ConfigError(f"schedule.milestones[{i}]: expected more than the milestone "
                              f"before it ({milestones[i - 1]}), got {milestones[i]}")
    if c.schedule.base_momentum > c.schedule.max_momentum:
        raise ConfigError(f"schedule.base_momentum: expected at most schedule.max_momentum "
                          f"({c.schedule.max_momentum}), got {c.schedule.base_momentum!r}")


def _plain(value: Any) -> Any:
    # dataclasses.asdict, without its deepcopy of every leaf: the config is frozen, its leaves
    # immutable (this runs for every trial's artifacts).
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (dict, Args)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
