"""Models: MLPs (by default the everyday 784-128-56-10 FashionMNIST MLP, see docs/lore.md),
conv-BN-ReLU 3x3 CNNs, torchvision networks, and users' own.

A user's network is named by import path (`model.type: mypkg.nets:build_net`) or by an installed
package's entry point (group `hpsearch.models`). It is called with the data's shape and the model
section's other keys: `build_net(input_shape=(1, 28, 28), num_classes=10, **args)`, and returns a
`torch.nn.Module`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from trainers._config import ModelConfig
from trainers._errors import ConfigError
from trainers._plugins import MODEL_GROUP, call_plugin, load_plugin, lookup
from trainers._registry import Registry, unknown_choice_message
from trainers._vision import (
    STEMS,
    WEIGHT_LAYERS,
    Parts,
    build_mobilenet_v3_small,
    build_vgg11_bn,
    mobilenet_parts,
    resnet_builder,
    resnet_parts,
    sequential_parts,
    vgg_parts,
)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,  # kept to show vanishing gradients (docs/lore.md#network)
    "gelu": nn.GELU,
}
NORMS = ("none", "batchnorm", "layernorm")
POOLS: dict[str, Callable[[], nn.Module]] = {
    "max": lambda: nn.MaxPool2d(2),
    "avg": lambda: nn.AvgPool2d(2),
}

BuildFn = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]
BN_STATS = ("update", "frozen", "frozen_layers")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: BuildFn  # (config, input_shape per example, num_classes) -> module
    parts: Callable[[nn.Module], Parts] = sequential_parts  # head and blocks, for fine-tuning
    plugin: bool = False  # a user's network


MODELS: Registry[ModelInfo] = Registry("model")


def _choice(family: str, value: str, choices: list[str] | tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(unknown_choice_message(family, value, list(choices)))
    return value


def layer_norms(config: ModelConfig) -> list[str]:
    """One norm per hidden layer: a single name applies to all, a comma list names each."""
    names = [n.strip() for n in config.norm.split(",")]
    for n in names:
        _choice("norm", n, NORMS)
    if len(names) == 1:
        return names * len(config.hidden)
    if len(names) != len(config.hidden):
        raise ConfigError(
            f"model.norm: expected one norm or one per hidden layer ({len(config.hidden)}), "
            f"got {config.norm!r}"
        )
    return names


def build_mlp(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    act = ACTIVATIONS[_choice("activation", config.activation, list(ACTIVATIONS))]
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for out, norm in zip(config.hidden, layer_norms(config), strict=True):
        layers.append(nn.Linear(width, out))
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(out))
        elif norm == "layernorm":
            layers.append(nn.LayerNorm(out))
        layers.append(act())
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_cnn(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Stages of 3x3 conv-BN-ReLU blocks, pooled 2x between stages, global pool, linear head."""
    pool = POOLS[_choice("pool", config.pool, list(POOLS))]
    if len(input_shape) != 3:
        raise ConfigError(f"model.type: cnn needs image data (C, H, W), got shape {input_shape}")
    channels, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for i, width in enumerate(config.widths):
        for _ in range(config.blocks):
            # bias=False: the BatchNorm that follows has its own shift.
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        if i < len(config.widths) - 1 and size >= 4:
            layers.append(pool())
            size //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if config.dropout > 0:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)


for _info in (
    ModelInfo("mlp", build_mlp),
    ModelInfo("cnn", build_cnn),
    ModelInfo("resnet18", resnet_builder(18), resnet_parts),
    ModelInfo("resnet34", resnet_builder(34), resnet_parts),
    ModelInfo("mobilenet_v3_small", build_mobilenet_v3_small, mobilenet_parts),
    ModelInfo("vgg11_bn", build_vgg11_bn, vgg_parts),
):
    MODELS.register(_info.name, _info)


def plugin_parts(model: nn.Module, head: str | None = None) -> Parts:
    """A user's network: `head` (`model.head`), else its last Linear (or Conv) in registration
    order is the head; each top-level child with parameters is a block."""
    if head is None:
        layers = [name for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        head = linear[-1] if linear else (layers[-1] if layers else None)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return Parts(head=(head,) if head else (), blocks=_blocks_around(model, head),
                 first_conv=f"{convs[0]}.weight" if convs else None)


def _blocks_around(model: nn.Module, head: str | None) -> tuple[tuple[str, ...], ...]:
    """Top-level children with parameters, in order; the one holding the head is split into
    its own children, so that freezing a block never freezes the head."""
    blocks: list[tuple[str, ...]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if not any(True for _ in child.parameters()) or full == head:
                continue
            if head is not None and head.startswith(full + "."):
                visit(child, full + ".")
            else:
                blocks.append((full,))

    visit(model, "")
    return tuple(blocks)


def _plugin(name: str) -> ModelInfo:
    def build(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        fn = load_plugin(name, MODEL_GROUP, "model.type")
        model = call_plugin(fn, name, "model.type", input_shape=tuple(input_shape),
                            num_classes=num_classes, **config.args.kwargs())
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.type: {name} returned {type(model).__name__}, expected a "
                              "torch.nn.Module")
        return model

    return ModelInfo(name, build, plugin_parts, plugin=True)


def model_info(name: str) -> ModelInfo:
    """The built-in model `name`, or the user's network it names; unknown names list both."""
    return lookup(MODELS, name, MODEL_GROUP, "model.type", _plugin, "network")


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The configured network for inputs of `input_shape` and `num_classes` outputs."""
    if config.type == "cnn" and not config.widths:
        raise ConfigError("model.widths: expected at least one stage width, got []")
    return model_info(config.type).build(config, input_shape, num_classes)


def check_model_config(config: ModelConfig) -> None:
    """Validate names without building anything (used when a config is created)."""
    model_info(config.type)
    _choice("activation", config.activation, list(ACTIVATIONS))
    _choice("pool", config.pool, list(POOLS))
    _choice("model.stem", config.stem, STEMS)
    _choice("model.bn_stats", config.bn_stats, BN_STATS)
    layer_norms(config)
    if config.type == "cnn" and not config.widths:
        raise ConfigError("model.widths: expected at least one stage width, got []")
