"""Datasets read from disk in batches: `torch.utils.data.Dataset`s and the built-in `image_folder`.

This is the path for data that does not fit in device memory. A `DataLoader` (its workers,
pinned memory, workers kept between epochs) decodes the examples of one split; batches cross to
the device as they are (uint8 pixels at a quarter of float32's size) and are scaled, normalized
and augmented there, as on the tensor path. The split into train and validation is the same
seeded split as the tensor path's, over the same indices, so a study can move between the two.

What a loader returns to take this path (see docs/own-code.md): a `Dataset`, a tuple
`(train, test)`, or a mapping `{"train", "test", "train_eval", "num_classes"}`. `train_eval` is
optional: the same examples as `train`, in the same order, with the evaluation transforms; the
validation split is read from it (from `train` itself without it). An example is a pair
`(input, label)`: the input a tensor, a numpy array or a PIL image, the label an integer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers._config import DataConfig
from trainers._errors import ConfigError, DataNotFoundError

# Normalization statistics of a streamed dataset are taken from this many training examples
# (all of them when there are fewer): reading the whole split for them would cost an epoch.
STATS_EXAMPLES = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


@dataclass(frozen=True)
class StreamSource:
    """What a streamed dataset's loader gives: Datasets of (input, label) pairs."""

    train: Dataset
    test: Dataset | None
    num_classes: int
    train_eval: Dataset | None = None  # train's examples with the evaluation transforms
    targets: torch.Tensor | None = None  # train's labels, where known without reading inputs
    test_targets: torch.Tensor | None = None


def is_dataset(value: Any) -> bool:
    return isinstance(value, Dataset) or (hasattr(value, "__getitem__")
                                          and hasattr(value, "__len__")
                                          and not isinstance(value, (torch.Tensor, np.ndarray,
                                                                     list, tuple, dict, str)))


def as_tensor(value: Any) -> torch.Tensor:
    """One example's input as a tensor: PIL images become uint8 [C, H, W]."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if hasattr(value, "getbands"):  # a PIL image, without importing PIL where it is unused
        array = torch.from_numpy(np.array(value, copy=True))
        return array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1).contiguous()
    raise TypeError(f"an example's input is {type(value).__name__}, expected a tensor, a numpy "
                    "array or a PIL image")


class _Examples(Dataset):
    """A split of a Dataset: positions map to the source's indices; inputs become tensors."""

    def __init__(self, source: Dataset, indices: torch.Tensor) -> None:
        self.source = source
        self.indices = indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.source[self.indices[i]]
        return as_tensor(x), int(y)


class _Order(Sampler[int]):
    """The positions of one epoch, in the order the training loop drew (so resumes agree)."""

    def __init__(self) -> None:
        self.positions: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def auto_workers() -> int:
    """DataLoader workers when `data.num_workers` is not set: one per CPU this process may
    use, at most 4 (decoding small images rarely needs more)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class StreamSplit:
    """One split read in batches from a Dataset; batches come out on the device as float32,
    scaled (uint8 pixels to [0, 1]) and normalized. Shared between trials: a `DataLoader` per
    batch size is kept, so its workers (with `persistent_workers`) live across epochs."""

    def __init__(self, source: Dataset, indices: torch.Tensor, *, device: torch.device,
                 config: DataConfig, relabel: torch.Tensor | None = None) -> None:
        self.examples = _Examples(source, indices)
        self.device = device
        self.relabel = None if relabel is None else relabel.to(device)
        self.mean: torch.Tensor | None = None  # [1, C, 1, …] on the device, set once
        self.std: torch.Tensor | None = None
        self._workers = auto_workers() if config.num_workers is None else config.num_workers
        pin = device.type == "cuda" if config.pin_memory is None else config.pin_memory
        self._pin = pin and device.type == "cuda"
        self._persistent = config.persistent_workers and self._workers > 0
        self._seed = config.seed
        self._loaders: dict[int, tuple[DataLoader, _Order]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _loader(self, batch_size: int, *, keep: bool = True) -> tuple[DataLoader, _Order]:
        if batch_size in self._loaders:
            return self._loaders[batch_size]
        order = _Order()
        loader = DataLoader(
            self.examples, batch_size=batch_size, sampler=order,
            num_workers=self._workers, pin_memory=self._pin,
            persistent_workers=self._persistent and keep,
            # The workers' seeds come from here, not from the global RNG the model uses.
            generator=torch.Generator().manual_seed(self._seed),
        )
        if keep:
            while len(self._loaders) >= 2:  # another trial's batch size: its workers go
                self._loaders.pop(next(iter(self._loaders)))
            self._loaders[batch_size] = (loader, order)
        return loader, order

    def raw_batches(self, positions: Sequence[int], batch_size: int, *,
                    keep: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `positions` as the Dataset gives them, on the CPU; `keep=False` for a
        one-off read (its workers end with it)."""
        loader, order = self._loader(batch_size, keep=keep)
        order.positions = list(positions)
        yield from loader

    def batches(self, order: torch.Tensor | None,
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) on the device, `batch_size` at a time, in `order` (positions in
        this split; None reads it front to back)."""
        positions = range(len(self)) if order is None else order.tolist()
        for x, y in self.raw_batches(positions, batch_size):
            yield self._finish(x, y)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=self._pin)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        y = y.to(self.device, non_blocking=self._pin)
        return x, (y if self.relabel is None else self.relabel[y])


# --------------------------------------------------------------------------- loader results


def _dataset_targets(ds: Dataset) -> torch.Tensor | None:
    targets = getattr(ds, "targets", None)
    if targets is None:
        return None
    try:
        return torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor)
                               else targets).long()
    except (TypeError, ValueError):
        return None


def source_from_plugin(result: Any, name: str) -> StreamSource:
    """A loader's Datasets as a StreamSource; checked on the first example of each."""
    key = "data.dataset"
    if isinstance(result, dict):
        if "train" not in result:
            raise ConfigError(f"{key}: {name} returned a mapping of Datasets without 'train' "
                              "(expected train and optionally test, train_eval, num_classes)")
        train, test = result["train"], result.get("test")
        train_eval, num_classes = result.get("train_eval"), result.get("num_classes")
    elif isinstance(result, (tuple, list)):
        train, test, train_eval, num_classes = [*result, None][0], [*result, None][1], None, None
    else:
        train, test, train_eval, num_classes = result, None, None, None
    for what, ds in (("train", train), ("test", test), ("train_eval", train_eval)):
        if ds is not None and not is_dataset(ds):
            raise ConfigError(f"{key}: {name} returned {type(ds).__name__} as {what}, expected "
                              "a torch.utils.data.Dataset")
    if len(train) == 0:
        raise ConfigError(f"{key}: {name} returned an empty train Dataset")
    if train_eval is not None and len(train_eval) != len(train):
        raise ConfigError(f"{key}: {name}: train_eval has {len(train_eval)} examples, train "
                          f"{len(train)} (it must be the same examples, in the same order)")
    targets = _dataset_targets(train)
    test_targets = _dataset_targets(test) if test is not None else None
    if num_classes is None:
        classes = getattr(train, "classes", None)
        if classes is not None:
            num_classes = len(classes)
        elif targets is not None and len(targets):
            num_classes = int(targets.max()) + 1
        else:
            raise ConfigError(f"{key}: {name} returned a Dataset without `targets` or "
                              "`classes`: return {'train': ..., 'num_classes': K} as well")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"{key}: {name}: expected num_classes of at least 2, got "
                          f"{num_classes!r}")
    for what, ds, labels in (("train", train, targets), ("test", test, test_targets)):
        if ds is None or len(ds) == 0:
            continue
        _check_example(ds, what, name, num_classes)
        if labels is not None and len(labels) and (int(labels.min()) < 0
                                                   or int(labels.max()) >= num_classes):
            raise ConfigError(f"{key}: {name}: {what} labels are {int(labels.min())}.."
                              f"{int(labels.max())}, expected 0..{num_classes - 1}")
    return StreamSource(train, test, num_classes, train_eval, targets, test_targets)


def _check_example(ds: Dataset, what: str, name: str, num_classes: int) -> None:
    try:
        example = ds[0]
    except Exception as e:  # noqa: BLE001 - the user's Dataset failed: say which and why
        raise ConfigError(f"data.dataset: {name}: reading {what}[0] raised "
                          f"{type(e).__name__}: {e}") from e
    if not (isinstance(example, (tuple, list)) and len(example) == 2):
        raise ConfigError(f"data.dataset: {name}: {what}[0] is {type(example).__name__}, "
                          "expected a pair (input, label)")
    x, y = example
    try:
        x = as_tensor(x)
    except TypeError as e:
        raise ConfigError(f"data.dataset: {name}: {what}[0]: {e}") from None
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point():
        y = int(y)
    if isinstance(y, (bool, float)) or not isinstance(y, (int, np.integer)):
        raise ConfigError(f"data.dataset: {name}: {what}[0] has the label {y!r}, expected an "
                          "integer class label")
    if not 0 <= int(y) < num_classes:
        raise ConfigError(f"data.dataset: {name}: {what}[0] has the label {int(y)}, expected "
                          f"0..{num_classes - 1}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ConfigError(f"data.dataset: {name}: {what}[0]'s input is {x.dtype}, expected "
                          "floats or uint8 pixels")


# --------------------------------------------------------------------------- image_folder


def _channels_of(mode: str) -> int:
    return 1 if mode in ("1", "L", "I", "I;16", "F", "LA") else 3


class DecodeImage:
    """ImageFolder's loader: a file as uint8 [C, H, W], converted to `channels` and resized to
    exactly `size` (H, W) where given. Runs in the DataLoader's workers."""

    def __init__(self, channels: int, size: tuple[int, int] | None,
                 expected: tuple[int, int] | None) -> None:
        self.mode = "L" if channels == 1 else "RGB"
        self.size = size
        self.expected = expected  # without `size`: every image must be this (H, W)

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert(self.mode)
            if self.size is not None and image.size != (self.size[1], self.size[0]):
                image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            elif self.size is None and (image.height, image.width) != self.expected:
                raise ValueError(f"{path} is {image.height}x{image.width}, the first image "
                                 f"{self.expected[0]}x{self.expected[1]}: set data.resize")
            return as_tensor(image)


def _image_folder(root: str, what: str) -> Any:
    from torchvision.datasets import ImageFolder  # slow to import: only when used

    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"data.{what}: {path} is not a directory (expected one folder "
                                "of images per class)")
    try:
        return ImageFolder(str(path),
                           is_valid_file=lambda p: p.lower().endswith(IMAGE_SUFFIXES)
                           and not os.path.basename(p).startswith("."))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataNotFoundError(f"data.{what}: {path} holds no images in class folders "
                                f"({e})") from None


def load_image_folder(config: DataConfig) -> StreamSource:
    """The `image_folder` dataset: torchvision's ImageFolder over `root` (and `test_root`)."""
    if not config.root:
        raise ConfigError("data.root: image_folder needs the folder of images (one subfolder "
                          "per class)")
    listing = _image_folder(config.root, "root")  # lists the files; reads none
    first = listing.samples[0][0]
    from PIL import Image

    try:
        with Image.open(first) as image:
            mode, first_size = image.mode, (image.height, image.width)
    except OSError as e:
        raise DataNotFoundError(f"data.root: cannot read {first}: {e}") from None
    channels = config.channels or _channels_of(mode)
    size = None if config.resize is None else (
        (config.resize[0], config.resize[0]) if len(config.resize) == 1 else config.resize)
    train = listing
    train.loader = DecodeImage(channels, size, None if size else first_size)
    test, test_targets = None, None
    if config.test_root:
        test = _image_folder(config.test_root, "test_root")
        test.loader = train.loader
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise ConfigError(f"data.test_root: classes {unknown} are not in data.root's "
                              f"{train.classes}")
        # Label by name: a test folder may lack a class, which shifts ImageFolder's numbering.
        test.samples = [(p, train.class_to_idx[test.classes[c]]) for p, c in test.samples]
        test.targets = [c for _, c in test.samples]
        test_targets = torch.tensor(test.targets, dtype=torch.long)
    return StreamSource(train, test, len(train.classes), None,
                        torch.tensor(train.targets, dtype=torch.long), test_targets)


def check_stream_settings(config: DataConfig) -> None:
    if config.num_workers is not None and config.num_workers < 0:
        raise ConfigError(f"data.num_workers: expected 0 or more, got {config.num_workers}")
    image_keys = {"root": config.root, "test_root": config.test_root, "resize": config.resize,
                  "channels": config.channels}
    if config.dataset != "image_folder":
        for key, value in image_keys.items():
            if value is not None:
                raise ConfigError(f"data.{key}: only the image_folder dataset takes it, got "
                                  f"{value!r} for {config.dataset}")
        return
    if config.resize is not None and (len(config.resize) not in (1, 2)
                                      or min(config.resize) < 1):
        raise ConfigError(f"data.resize: expected a size N or [H, W] of positive pixels, got "
                          f"{list(config.resize)}")
    if config.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels: expected 1 (grayscale) or 3 (RGB), got "
                          f"{config.channels}")


def stream_stats(split: StreamSplit, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (per-feature) mean and std over the split's first `STATS_EXAMPLES`
    examples, in [0, 1] pixel units, as the tensor path computes them."""
    positions = range(min(len(split), STATS_EXAMPLES))
    parts = [x.float().div_(255) if x.dtype == torch.uint8 else x.float()
             for x, _ in split.raw_batches(positions, batch_size, keep=False)]
    x = torch.cat(parts)
    dims = (0, *range(2, x.dim()))
    std, mean = torch.std_mean(x, dim=dims)
    return std, mean
