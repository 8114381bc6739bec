"""torchvision networks adapted to the dataset: its channels, its image size, its classes.

The torchvision constructors build the networks (never with downloaded weights); this module
only swaps what a 1-channel 28x28 input needs. With `stem: small` (the default below 64 px) the
ImageNet stem that would shrink a 28x28 image to 7x7 before the first stage gives way to a 3x3
stride-1 conv (the CIFAR variant); with `stem: imagenet` the layout stays torchvision's, so an
ImageNet state dict loads (its RGB first conv is summed to gray when the data has one channel).
Layers that are dropped are replaced by `nn.Identity`, so every parameter keeps its torchvision
name and state dicts stay interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trainers._config import ModelConfig
from trainers._errors import ConfigError
from trainers._registry import unknown_choice_message

STEMS = ("auto", "small", "imagenet")
SMALL_BELOW = 64  # px: below this, `stem: auto` is the small stem


@dataclass(frozen=True)
class Parts:
    """Where a network's head and blocks are, by module-name prefix, in forward order."""

    head: tuple[str, ...]  # the classifier layer(s) sized by the number of classes
    blocks: tuple[tuple[str, ...], ...]  # everything else, grouped for `freeze_blocks`
    first_conv: str | None = None  # the input layer's weight: RGB weights adapt to gray here


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model.type: {name} needs image data (C, H, W), got shape "
                          f"{input_shape}")
    c, h, w = input_shape
    return c, h, w


def small_stem(config: ModelConfig, height: int, width: int) -> bool:
    if config.stem not in STEMS:
        raise ConfigError(unknown_choice_message("model.stem", config.stem, list(STEMS)))
    if config.stem == "auto":
        return min(height, width) < SMALL_BELOW
    return config.stem == "small"


def resnet_builder(depth: int):
    def build(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        from torchvision import models

        c, h, w = _image_shape(f"resnet{depth}", input_shape)
        if config.dropout > 0:  # a Dropout in front of fc would rename fc's weights
            raise ConfigError(f"model.dropout: resnet{depth} has no dropout layer (torchvision's "
                              f"layout); expected 0, got {config.dropout}")
        net = getattr(models, f"resnet{depth}")(weights=None, num_classes=num_classes)
        if small_stem(config, h, w):
            net.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
            net.small_stem = True  # for the weights-mismatch hint
        elif c != 3:
            net.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
        return net

    return build


def resnet_parts(model: nn.Module) -> Parts:
    return Parts(head=("fc",),
                 blocks=(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
                 first_conv="conv1.weight")


def build_mobilenet_v3_small(config: ModelConfig, input_shape: tuple[int, ...],
                             num_classes: int) -> nn.Module:
    from torchvision import models

    c, h, w = _image_shape("mobilenet_v3_small", input_shape)
    net = models.mobilenet_v3_small(weights=None, num_classes=num_classes,
                                    dropout=config.dropout)
    small = small_stem(config, h, w)
    if small or c != 3:
        # Same kernel shape as torchvision's: only the stride (and the channels) change.
        net.features[0][0] = nn.Conv2d(c, 16, 3, stride=1 if small else 2, padding=1, bias=False)
    return net


def mobilenet_parts(model: nn.Module) -> Parts:
    features = tuple((f"features.{i}",) for i in range(len(model.features)))
    return Parts(head=("classifier.3",), blocks=(*features, ("classifier.0",)),
                 first_conv="features.0.0.weight")


def build_vgg11_bn(config: ModelConfig, input_shape: tuple[int, ...],
                   num_classes: int) -> nn.Module:
    from torchvision import models

    c, h, w = _image_shape("vgg11_bn", input_shape)
    net = models.vgg11_bn(weights=None, num_classes=num_classes, dropout=config.dropout)
    net.features[0] = nn.Conv2d(c, 64, 3, padding=1)
    size = min(h, w)
    for i, layer in enumerate(net.features):
        if isinstance(layer, nn.MaxPool2d):
            if size >= 2:
                size //= 2
            else:  # a 28 px image has room for four of the five poolings
                net.features[i] = nn.Identity()
    if small_stem(config, h, w):
        # Global pooling instead of tiling the last feature map to 7x7: 512 inputs, not 25088.
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier[0] = nn.Linear(512, 4096)
        net.small_stem = True
    return net


def vgg_parts(model: nn.Module) -> Parts:
    blocks = sequential_blocks(model.features, "features.")
    return Parts(head=("classifier.6",),
                 blocks=(*blocks, ("classifier.0",), ("classifier.3",)),
                 first_conv="features.0.weight")


WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sequential_blocks(seq: nn.Module, prefix: str = "") -> list[tuple[str, ...]]:
    """Children grouped into blocks: each Linear/Conv opens one, and the norms after it join."""
    blocks: list[list[str]] = []
    for name, child in seq.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, WEIGHT_LAYERS) or not blocks:
            blocks.append([])
        blocks[-1].append(prefix + name)
    return [tuple(b) for b in blocks]


def sequential_parts(model: nn.Module) -> Parts:
    """The MLP and CNN: the last Linear is the head, each weight layer (with its norm) a block."""
    blocks = sequential_blocks(model)
    first = blocks[0][0] + ".weight" if blocks else None
    return Parts(head=blocks[-1] if blocks else (), blocks=tuple(blocks[:-1]), first_conv=first)
