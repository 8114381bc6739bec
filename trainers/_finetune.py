"""Fine-tuning: start from a weights file, freeze part of the network, train the rest in groups.

`prepare_model` is the one way a network comes to exist for training: built, initialized with
the config's scheme, loaded from `model.weights` where given (heads whose shape differs keep
their fresh init), and frozen as asked. `FrozenParts` switches the frozen parameters (and,
by `bn_stats`, the batch-norm statistics) on and off as epochs pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers._config import InitConfig, ModelConfig
from trainers._errors import ConfigError
from trainers._inits import apply_init
from trainers._models import build_model, model_info, plugin_parts
from trainers._vision import Parts

_SHOW = 8  # keys named in an error before "… and N more"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel, torch.compile


@dataclass(frozen=True)
class Prepared:
    model: nn.Module
    parts: Parts
    frozen: frozenset[str]  # parameter names frozen at the start
    head: frozenset[str]  # parameter names of the head
    notes: tuple[str, ...]  # what loading the weights did, to be shown to the user


def matches(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def prepare_model(model_config: ModelConfig, init: InitConfig, input_shape: tuple[int, ...],
                  num_classes: int) -> Prepared:
    """Build, initialize, load `model.weights`, and work out what is frozen and what is head."""
    model = build_model(model_config, input_shape, num_classes)
    apply_init(model, init)
    info = model_info(model_config.type)
    parts = info.parts(model)
    if model_config.head:
        parts = named_head(parts, model_config.head, model, plugin=info.plugin)
    notes: tuple[str, ...] = ()
    if model_config.weights:
        notes = tuple(load_weights(model, model_config.weights, parts, init.name,
                                   reset_head=model_config.reset_head))
    names = [n for n, _ in model.named_parameters()]
    frozen = frozen_names(model_config, parts, names)
    head = frozenset(n for n in names if matches(n, parts.head))
    return Prepared(model, parts, frozen, head, notes)


def named_head(parts: Parts, head: str, model: nn.Module, *, plugin: bool) -> Parts:
    """`parts` with the head that `model.head` names; a name that matches no module fails.

    A plugin's blocks are worked out again around it; a built-in network keeps its blocks, less
    the named head, and its own head becomes the last block."""
    modules = dict(model.named_modules())
    if head not in modules or not any(True for _ in modules[head].parameters()):
        layers = [n for n, m in modules.items() if n and not any(True for _ in m.children())
                  and any(True for _ in m.parameters())]
        raise ConfigError(f"model.head: {head!r} names no module with parameters; expected one "
                          f"of: {', '.join(layers)}")
    if plugin:
        return plugin_parts(model, head)
    blocks = [tuple(p for p in block if not matches(p, [head])) for block in parts.blocks]
    blocks.append(tuple(p for p in parts.head if not matches(p, [head])))
    return Parts(head=(head,), blocks=tuple(b for b in blocks if b), first_conv=parts.first_conv)


def frozen_names(config: ModelConfig, parts: Parts, names: list[str]) -> frozenset[str]:
    """The parameters `freeze` and `freeze_blocks` name; a prefix that matches nothing fails."""
    prefixes: list[str] = []
    blocks = [p for block in parts.blocks for p in block]
    if config.freeze == "backbone":
        prefixes += blocks
    elif config.freeze not in ("none", ""):
        for prefix in (p.strip() for p in config.freeze.split(",")):
            if not any(matches(n, [prefix]) for n in names):
                shown = ", ".join(p for block in parts.blocks for p in block)
                raise ConfigError(
                    f"model.freeze: {prefix!r} names no parameter of {config.type}; expected "
                    f"none, backbone, or prefixes such as: {shown}, {', '.join(parts.head)}")
            prefixes.append(prefix)
    if config.freeze_blocks > len(parts.blocks):
        raise ConfigError(f"model.freeze_blocks: {config.type} has {len(parts.blocks)} blocks "
                          f"before its head, got {config.freeze_blocks}")
    for block in parts.blocks[:config.freeze_blocks]:
        prefixes += block
    return frozenset(n for n in names if matches(n, prefixes))


def load_weights(model: nn.Module, path: str, parts: Parts, init_name: str, *,
                 reset_head: bool = False) -> list[str]:
    """Load a state dict file into `model`; heads whose shape differs (all heads, with
    `reset_head`) keep the fresh init.

    Anything else that does not fit (a key missing, a key too many, a shape that differs
    outside the head) is one ConfigError naming the file, the keys and the shapes.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.weights: {file}: no such file (weights are read from a local "
                          f"file only; nothing is downloaded)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a state dict file"
        raise ConfigError(f"model.weights: {file}: not a loadable state dict "
                          f"({type(e).__name__}: {e})") from e
    state = _state_dict(obj, file)
    own = model.state_dict()

    def head_module(key: str) -> str | None:
        return key.rsplit(".", 1)[0] if matches(key, parts.head) else None

    missing = [k for k in own if k not in state and head_module(k) is None]
    unexpected = [k for k in state if k not in own and head_module(k) is None]
    differ, reinit, adapted = [], {}, []
    stem_differs = False  # the first conv's kernel differs: ImageNet weights, small stem
    load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            continue
        want = own[key].shape
        if value.shape == want:
            load[key] = value
        elif key == parts.first_conv and _gray_from_rgb(value.shape, want):
            load[key] = value.sum(1, keepdim=True)  # RGB filters summed: the usual gray adaptation
            adapted.append(key)
        elif head_module(key) is not None:
            reinit.setdefault(head_module(key), f"file {list(value.shape)}, model {list(want)}")
        else:
            differ.append(f"{key} (file {list(value.shape)}, model {list(want)})")
            stem_differs |= key == parts.first_conv and value.shape[2:] != want[2:]
    if missing or unexpected or differ:
        raise ConfigError(_mismatch(file, model, missing, unexpected, differ, stem_differs))
    for key in own:  # a head module that changed shape in one tensor is re-initialized whole
        module = head_module(key)
        if module is not None and key not in state:
            reinit.setdefault(module, "not in the file")
        elif module is not None and reset_head:
            reinit.setdefault(module, "model.reset_head")
    load = {k: v for k, v in load.items() if head_module(k) not in reinit}
    model.load_state_dict(load, strict=False)
    notes = [f"loaded {len(load)} tensors from {file}"]
    if adapted:
        notes.append(f"summed the RGB filters of {', '.join(adapted)} for 1-channel input")
    for module, why in reinit.items():
        notes.append(f"re-initialized head {module} with init {init_name} ({why})")
    return notes


def _state_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):  # our checkpoints; Lightning-style files
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.weights: {file}: expected a state dict (parameter name → "
                          f"tensor), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _gray_from_rgb(have: torch.Size, want: torch.Size) -> bool:
    return (len(have) == 4 and len(want) == 4 and have[1] == 3 and want[1] == 1
            and have[0] == want[0] and have[2:] == want[2:])


def _listing(keys: list[str]) -> str:
    more = f" … and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _mismatch(file: Path, model: nn.Module, missing: list[str], unexpected: list[str],
              differ: list[str], stem_differs: bool) -> str:
    lines = [f"model.weights: {file} does not fit this {type(model).__name__}"]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if differ:
        lines.append(f"shapes differ ({len(differ)}): {_listing(differ)}")
    if stem_differs or (differ and getattr(model, "small_stem", False)):
        lines.append("(this network has the small-image stem; weights in torchvision's layout, "
                     "such as ImageNet's, need model.stem: imagenet)")
    return "; ".join(lines)


class FrozenParts:
    """Frozen parameters and batch-norm modes over a run: frozen until `unfreeze_after`."""

    def __init__(self, model: nn.Module, frozen: frozenset[str], config: ModelConfig) -> None:
        self.model = model
        self.params = [p for n, p in model.named_parameters() if n in frozen]
        self.unfreeze_after = config.unfreeze_after
        self.bn_stats = config.bn_stats
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if config.bn_stats == "frozen_layers":  # only those whose scale and shift are frozen
            ids = {id(p) for p in self.params}
            norms = [m for m in norms if any(id(p) in ids for p in m.parameters())]
        self.bn = norms if config.bn_stats != "update" else []

    def frozen_at(self, epoch: int) -> bool:
        """Whether the frozen parts are frozen during `epoch` (0-based)."""
        return bool(self.params) and (self.unfreeze_after is None or epoch < self.unfreeze_after)

    def start_epoch(self, epoch: int) -> None:
        """Set requires_grad and batch-norm modes for `epoch`; call after `model.train()`."""
        frozen = self.frozen_at(epoch)
        for p in self.params:
            p.requires_grad_(not frozen)
        if self.bn_stats == "frozen" or (self.bn_stats == "frozen_layers" and frozen):
            for m in self.bn:
                m.eval()  # running statistics used, not updated

    def trained_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
