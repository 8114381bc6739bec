"""Datasets: find and parse the files, split, normalize, augment; `load_data` is the way in.

Datasets that fit are device-resident tensors: everything a trial touches per step is a tensor
on the training device, with no per-sample Python on the hot path. Datasets that do not
(`image_folder`, a loader's `torch.utils.data.Dataset`s) are streamed through a DataLoader
(`trainers._streaming`) with the same seeded split. Files are parsed once per process and the
finished `Data` is reused across trials that share a data config.

A user's dataset is named by import path (`data.dataset: mypkg.data:load`) or by an installed
package's entry point (group `hpsearch.datasets`), called with the data section's other keys,
and returns tensors: `{"train_x", "train_y", "test_x", "test_y", "num_classes"}` (the test
split and num_classes optional) or a tuple `(train_x, train_y[, test_x, test_y])`; inputs
[N, ...] (images [N, C, H, W], uint8 or float), labels integers 0..num_classes-1. Or it returns
Datasets (see `trainers._streaming`).
"""

from __future__ import annotations

import fcntl
import gzip
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers._config import DataConfig
from trainers._errors import ConfigError, DataNotFoundError
from trainers._plugins import DATASET_GROUP, call_plugin, load_plugin, lookup
from trainers._registry import Registry, unknown_choice_message
from trainers._streaming import (
    StreamSource,
    StreamSplit,
    check_stream_settings,
    is_dataset,
    load_image_folder,
    source_from_plugin,
    stream_stats,
)


@dataclass(frozen=True)
class RawData:
    """What a loader returns: CPU tensors, images [N, C, H, W] (uint8 or float), labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    load: Callable[[DataConfig], RawData | StreamSource]
    image: bool  # augmentation (flips, crops) makes sense only for natural images
    # Known without reading any data (the built-ins), so `data.classes` is checked when the
    # config is made; None: known only once loaded (image_folder, a user's loader).
    num_classes: int | None = None


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32 [N, C, H, W], normalized, on the device
    y: torch.Tensor  # int64 [N], on the device

    def __len__(self) -> int:
        return self.y.shape[0]

    def batches(self, order: torch.Tensor | None,
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) `batch_size` at a time, in `order` (None: front to back)."""
        if order is None:
            for start in range(0, len(self), batch_size):
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            return
        order = order.to(self.y.device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # index_select, not x[idx]: the same gather without advanced-indexing overhead,
            # a visible share of a small MLP's step on the CPU.
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


@dataclass(frozen=True)
class Data:
    """A dataset ready to train on. Shared between trials through a cache: never modify in place."""

    train: Split | StreamSplit
    val: Split | StreamSplit | None
    test: Split | StreamSplit | None
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]  # per-channel stats of the train part, in [0, 1] pixel units;
    std: tuple[float, ...]  # 0 and 1 when normalize is off (what was applied)


DATASETS: Registry[DatasetInfo] = Registry("dataset")
AUGMENTATIONS = ("crop", "flip")
CROP_PAD = 4

# --------------------------------------------------------------------------- finding the files

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"cifar-10-batches-py/{b}" for b in
                     [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
_FETCH = ("fetch them, e.g. python -c \"import torchvision; torchvision.datasets.{}('DIR', "
          "download=True)\", and set HPSEARCH_DATA (or data.data_dir) to DIR")
# dataset: (files, torchvision's subfolder of a root, how to fix, torchvision class to download
# as a last resort)
_SOURCES: dict[str, tuple[tuple[str, ...], str | None, str, str | None]] = {
    "fashion_mnist": (_IDX_FILES, "FashionMNIST/raw", "install Debian's dataset-fashion-mnist "
                      "(apt install dataset-fashion-mnist), or put the four idx files in a "
                      "directory and set HPSEARCH_DATA (or data.data_dir) to it", "FashionMNIST"),
    "mnist": (_IDX_FILES, "MNIST/raw", _FETCH.format("MNIST"), None),
    "cifar10": (_CIFAR_FILES, None, _FETCH.format("CIFAR10"), None),
}
# Where system packages put the files; looked at after the user's own directories.
_SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
# In the folder a download goes to: held while downloading (containers sharing a data volume).
DOWNLOAD_LOCK = ".hpsearch-download.lock"


def _user_roots(data_dir: str | None) -> list[Path]:
    dirs = [data_dir, os.environ.get("HPSEARCH_DATA"), "data"]
    return [Path(d).expanduser().absolute() for d in dirs if d]


def _candidates(dataset: str, data_dir: str | None) -> list[Path]:
    roots = dict.fromkeys(_user_roots(data_dir) + list(_SYSTEM_DIRS.get(dataset, ())))
    sub = _SOURCES[dataset][1]
    # In each root torchvision's layout comes first: its folder name says which dataset it is,
    # while bare idx files carry the same names for MNIST and FashionMNIST.
    return [p for r in roots for p in ([r / sub] if sub else []) + [r]]


def _download(dataset: str, root: Path) -> None:
    """Fetch a dataset with torchvision into root (the last resort; needs network).

    torchvision writes into a hidden staging folder of root; each finished file is then renamed
    into place, so a process that looks for the files without the lock never reads half of one.
    """
    import torchvision  # slow to import, and needed only here and for CIFAR-10

    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as staging:
        getattr(torchvision.datasets, _SOURCES[dataset][3])(staging, download=True)
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file():
                target = root / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)


@contextmanager
def _download_lock(root: Path) -> Iterator[None]:
    """flock on a file in root, so processes sharing root (containers on one data volume)
    download one at a time; the OS drops it if its holder dies."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / DOWNLOAD_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_once(dataset: str, data_dir: str | None,
                   search: Callable[[], Path | None]) -> tuple[Path | None, str]:
    """Download into the first writable of data_dir, $HPSEARCH_DATA and ./data, holding its lock:
    a process that waited finds the files the holder fetched and downloads nothing. Returns the
    folder found (or None) and, when that failed, a sentence for the not-found message."""
    for root in _user_roots(data_dir):
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not os.access(existing, os.W_OK):  # torchvision makes the folders it needs
            continue
        try:
            with _download_lock(root):
                found = search()
                if found is None:
                    _download(dataset, root)
                    found = search()
        except Exception as e:  # no network is the usual case: say so in the one message
            return None, f" Downloading into {root} failed: {type(e).__name__}: {e}."
        return found, "" if found else f" Downloading into {root} did not produce the files."
    return None, ""


def find_data_dir(dataset: str, data_dir: str | None) -> Path:
    """The directory holding `dataset`'s files; raises DataNotFoundError naming every place looked.

    Order: data_dir, $HPSEARCH_DATA, ./data, then system directories; in each, torchvision's
    layout (e.g. FashionMNIST/raw) before the directory itself. If the files are nowhere and the
    dataset has a torchvision downloader, one download into the first writable of data_dir,
    $HPSEARCH_DATA and ./data is tried, one process at a time per folder.
    """
    if dataset not in _SOURCES:
        raise ConfigError(unknown_choice_message("dataset with files", dataset, list(_SOURCES)))
    files, _, fix, downloadable = _SOURCES[dataset]

    def search() -> Path | None:
        for folder in _candidates(dataset, data_dir):
            if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in files):
                return folder
        return None

    found, tried = search(), ""
    if found is None and downloadable:
        found, tried = _download_once(dataset, data_dir, search)
    if found is not None:
        return found
    looked = ", ".join(str(p) for p in _candidates(dataset, data_dir))
    gz = " (or .gz)" if files == _IDX_FILES else ""
    raise DataNotFoundError(f"{dataset}: data files not found. Looked for {', '.join(files)}{gz} "
                            f"in: {looked}.{tried} To fix: {fix}.")


# --------------------------------------------------------------------------- loaders

# idx type codes (http://yann.lecun.com/exdb/mnist/): all stored big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (plain or gzipped) into a native-endian numpy array."""
    if not path.is_file():
        path = path.with_name(path.name + ".gz")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: detect by content, not by name
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (header {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(data) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(f"{path}: idx header says {shape}, but the file has {len(data)} bytes")
    array = np.frombuffer(data, dtype, count=count, offset=4 + 4 * ndim).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-order copy for torch


# A worker process runs many trials, often of one dataset: files are parsed and held once per
# process rather than once per trial (FashionMNIST is ~55 MB of uint8 on the CPU).
_RAW_CACHE: dict[tuple[Any, ...], RawData] = {}


def _file_loader(dataset: str, read: Callable[[Path], RawData]) -> Callable[[DataConfig], RawData]:
    def load(config: DataConfig) -> RawData:
        check_data_config(config)
        key = (dataset, find_data_dir(dataset, config.data_dir), None)
        if key not in _RAW_CACHE:
            _RAW_CACHE[key] = read(key[1])
        return _RAW_CACHE[key]

    return load


def _read_idx_dataset(folder: Path) -> RawData:
    xs, ys, txs, tys = (torch.from_numpy(_read_idx(folder / f)) for f in _IDX_FILES)
    return RawData(xs.unsqueeze(1), ys.long(), txs.unsqueeze(1), tys.long(), num_classes=10)


def _read_cifar10(root: Path) -> RawData:
    import torchvision  # slow to import: only when CIFAR-10 is really used

    parts = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        except Exception as e:  # torchvision's integrity check: corrupt or partial files
            raise DataNotFoundError(f"cifar10: cannot read the files in {root}: {e}") from e
        parts += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                  torch.tensor(ds.targets, dtype=torch.long)]
    return RawData(*parts, num_classes=10)


SYNTHETIC_SEED = 1234  # fixed, so splits under different data seeds see the same examples
SYNTHETIC_NOISE = 2.0  # per-pixel noise on unit-variance templates: ~97% is attainable


def _load_synthetic(config: DataConfig) -> RawData:
    """Ten classes, each a fixed random 8x8 template plus Gaussian noise: learnable in seconds."""
    check_data_config(config)
    size = 2048 if config.size is None else config.size
    key = ("synthetic", None, size)
    if key not in _RAW_CACHE:
        g = torch.Generator().manual_seed(SYNTHETIC_SEED)
        templates = torch.randn(10, 1, 8, 8, generator=g)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, 10, (n,), generator=g)
            return templates[y] + SYNTHETIC_NOISE * torch.randn(n, 1, 8, 8, generator=g), y

        test = draw(512)  # drawn first, so the test set does not depend on size
        _RAW_CACHE[key] = RawData(*draw(size), *test, num_classes=10)
    return _RAW_CACHE[key]


for _info in (
    DatasetInfo("fashion_mnist", _file_loader("fashion_mnist", _read_idx_dataset), image=True,
                num_classes=10),
    DatasetInfo("mnist", _file_loader("mnist", _read_idx_dataset), image=True, num_classes=10),
    DatasetInfo("cifar10", _file_loader("cifar10", _read_cifar10), image=True, num_classes=10),
    # 8x8 images: augmentation only blurs the templates, but it lets tests run that code path.
    DatasetInfo("synthetic", _load_synthetic, image=True, num_classes=10),
    DatasetInfo("image_folder", lambda config: _cached_image_folder(config), image=True),
):
    DATASETS.register(_info.name, _info)


def _cached_image_folder(config: DataConfig) -> StreamSource:
    check_data_config(config)
    key = ("image_folder", config.root, config.test_root, config.resize, config.channels)
    if key not in _RAW_CACHE:
        _RAW_CACHE[key] = load_image_folder(config)
    return _RAW_CACHE[key]


def _tensor(value: Any, what: str, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"data.dataset: {name} returned {type(value).__name__} as {what}, "
                          "expected a tensor or a numpy array")
    return value.cpu()


def _streamed(result: Any) -> bool:
    """Whether a loader returned Datasets (streamed) rather than tensors."""
    if isinstance(result, dict):
        return is_dataset(result.get("train"))
    if isinstance(result, (tuple, list)):
        return bool(result) and is_dataset(result[0])
    return is_dataset(result)


def _raw_from_plugin(result: Any, name: str) -> RawData | StreamSource:
    """A plugin's tensors as RawData (shapes, label types and ranges checked, one error each),
    or its Datasets as a StreamSource."""
    if _streamed(result):
        return source_from_plugin(result, name)
    keys = ("train_x", "train_y", "test_x", "test_y")
    if isinstance(result, dict):
        missing = [k for k in keys[:2] if k not in result]
        if missing:
            raise ConfigError(f"data.dataset: {name} returned a mapping without "
                              f"{', '.join(missing)} (expected train_x, train_y and optionally "
                              "test_x, test_y, num_classes)")
        parts = [result.get(k) for k in keys]
        num_classes = result.get("num_classes")
    elif isinstance(result, (tuple, list)) and len(result) in (2, 4):
        parts, num_classes = [*result, None, None][:4], None
    else:
        raise ConfigError(f"data.dataset: {name} returned {type(result).__name__}, expected "
                          "a mapping {train_x, train_y, test_x, test_y, num_classes} or a tuple "
                          "(train_x, train_y[, test_x, test_y])")
    x, y = _tensor(parts[0], "train_x", name), _tensor(parts[1], "train_y", name)
    if parts[2] is None:  # no test split: retrain says so when it needs one
        tx, ty = x[:0], y[:0]
    else:
        tx, ty = _tensor(parts[2], "test_x", name), _tensor(parts[3], "test_y", name)
    for what, xs, ys in (("train", x, y), ("test", tx, ty)):
        if xs.dim() < 2 or ys.dim() != 1 or len(xs) != len(ys):
            raise ConfigError(f"data.dataset: {name}: expected {what}_x [N, ...] and {what}_y "
                              f"[N], got {tuple(xs.shape)} and {tuple(ys.shape)}")
        if ys.is_floating_point() or ys.dtype == torch.bool:
            raise ConfigError(f"data.dataset: {name}: expected integer class labels in {what}_y, "
                              f"got {ys.dtype}")
        if xs.dtype != torch.uint8 and not xs.is_floating_point():
            raise ConfigError(f"data.dataset: {name}: expected {what}_x of floats or uint8 "
                              f"pixels, got {xs.dtype}")
    if len(y) == 0:
        raise ConfigError(f"data.dataset: {name} returned no training examples")
    if tx.shape[1:] != x.shape[1:] and len(tx):
        raise ConfigError(f"data.dataset: {name}: test_x examples are {tuple(tx.shape[1:])}, "
                          f"train_x examples {tuple(x.shape[1:])}")
    labels = torch.cat([y, ty]).long()
    top = int(labels.max()) + 1
    k = top if num_classes is None else num_classes
    if not isinstance(k, int) or k < 2 or int(labels.min()) < 0 or top > k:
        raise ConfigError(f"data.dataset: {name}: expected labels in 0..num_classes-1 with at "
                          f"least 2 classes, got labels {int(labels.min())}..{top - 1} and "
                          f"num_classes {num_classes}")
    return RawData(x, y.long(), tx, ty.long(), num_classes=k)


def _plugin(name: str) -> DatasetInfo:
    def load(config: DataConfig) -> RawData | StreamSource:
        key = ("plugin", name, config.args)
        if key not in _RAW_CACHE:
            fn = load_plugin(name, DATASET_GROUP, "data.dataset")
            result = call_plugin(fn, name, "data.dataset", **config.args.kwargs())
            _RAW_CACHE[key] = _raw_from_plugin(result, name)
        return _RAW_CACHE[key]

    return DatasetInfo(name, load, image=True)  # augment checks the shape when it loads


def dataset_info(name: str) -> DatasetInfo:
    """The built-in dataset `name`, or the user's loader it names; unknown names list both."""
    return lookup(DATASETS, name, DATASET_GROUP, "data.dataset", _plugin, "loader")


# --------------------------------------------------------------------------- splitting

# The finished Data of the most recent configs: trials of one study share a data config, so a
# worker reuses the device tensors instead of rebuilding (and re-uploading) them every trial.
# Two entries cover alternating uses (e.g. searching with a val split, retraining without).
_DATA_CACHE: OrderedDict[tuple, Data] = OrderedDict()
_DATA_CACHE_SIZE = 2


def clear_cache() -> None:
    """Drop the cached raw datasets and finished Data (frees their memory)."""
    _RAW_CACHE.clear()
    _DATA_CACHE.clear()


def check_data_config(config: DataConfig) -> None:
    """Raise ConfigError for what is wrong without reading any data (spec-load time)."""
    info = dataset_info(config.dataset)
    _check_augment(config.augment)
    if config.augment and not info.image:
        raise ConfigError(f"data.augment: {config.dataset} is not image data; got "
                          f"{list(config.augment)}, expected none")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected in [0, 1), got {config.val_fraction!r}")
    if config.train_subset is not None and config.train_subset < 1:
        raise ConfigError(f"data.train_subset: expected at least 1, got {config.train_subset}")
    if config.size is not None and (config.dataset != "synthetic" or config.size < 1):
        raise ConfigError(f"data.size: expected a positive number of synthetic examples, got "
                          f"{config.size} for {config.dataset}")
    if config.classes is not None:
        _check_chosen_classes(config.classes, info.num_classes)
    check_stream_settings(config)


def _check_chosen_classes(classes: tuple[int, ...], k: int | None) -> None:
    """`data.classes` as far as the config tells: labels, distinct, at least two, and below
    the dataset's number of classes where that is known before loading."""
    for i, c in enumerate(classes):
        if c < 0 or (k is not None and c >= k):
            expected = "zero or positive" if k is None else f"a label in 0..{k - 1}"
            raise ConfigError(f"data.classes[{i}]: expected {expected}, got {c}")
        if c in classes[:i]:
            raise ConfigError(f"data.classes[{i}]: expected a label not listed before, got {c} "
                              "again")
    if len(classes) < 2:
        raise ConfigError(f"data.classes: expected two or more labels, got {list(classes)}")


def load_data(config: DataConfig, *, device: torch.device | str = "cpu",
              include_test: bool = False, merge_val: bool = False) -> Data:
    """Load, split and normalize a dataset onto `device`; cached, so never modify the tensors.

    Validation is a seeded split of the training set (`config.seed`); with `merge_val` the
    train split is train+val (for retraining) and `val` is None. The test set is included only
    when asked for.
    """
    check_data_config(config)
    raw = dataset_info(config.dataset).load(config)
    device = torch.device(device)
    # id(raw) is stable (raw data stays cached); augmentation happens later, per batch.
    key = (id(raw), replace(config, augment=()), str(device), include_test, merge_val)
    if key not in _DATA_CACHE:
        build = _build_stream if isinstance(raw, StreamSource) else _build
        _DATA_CACHE[key] = build(raw, config, device, include_test, merge_val)
        while len(_DATA_CACHE) > _DATA_CACHE_SIZE:
            _DATA_CACHE.popitem(last=False)
    _DATA_CACHE.move_to_end(key)
    return _DATA_CACHE[key]


def _keep_classes(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...] | None,
                  num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if classes is None:
        return x, y
    relabel = torch.full((num_classes,), -1, dtype=torch.long)
    relabel[list(classes)] = torch.arange(len(classes))
    new = relabel[y]
    return x[new >= 0], new[new >= 0]


def _check_classes(classes: tuple[int, ...] | None, k: int) -> None:
    if classes is not None and not (len(set(classes)) == len(classes) >= 2
                                    and all(0 <= c < k for c in classes)):
        raise ConfigError(f"data.classes: expected two or more distinct labels in 0..{k - 1}, "
                          f"got {list(classes)}")


def _split_positions(n: int, config: DataConfig,
                     merge_val: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) positions among `n` examples: the seeded split both paths share."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    n_val = round(config.val_fraction * n)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if config.train_subset is not None:
        if not 1 <= config.train_subset <= len(train_idx):
            raise ConfigError(f"data.train_subset: expected 1..{len(train_idx)} (the train "
                              f"part), got {config.train_subset}")
        train_idx = train_idx[: config.train_subset]  # perm is random: a prefix is a subset
        if merge_val:  # the subset's own share of validation, not the whole of it
            share = config.val_fraction / (1 - config.val_fraction)
            val_idx = val_idx[: round(config.train_subset * share)]
    if merge_val:
        train_idx, val_idx = torch.cat([train_idx, val_idx]), val_idx[:0]
    if len(train_idx) == 0:
        raise ConfigError(f"data: the train split is empty ({n} examples, "
                          f"val_fraction {config.val_fraction})")
    return train_idx, val_idx


def _build(raw: RawData, config: DataConfig, device: torch.device,
           include_test: bool, merge_val: bool) -> Data:
    classes, k = config.classes, raw.num_classes
    _check_classes(classes, k)
    x, y = _keep_classes(raw.train_x, raw.train_y, classes, k)
    train_idx, val_idx = _split_positions(len(y), config, merge_val)

    def to_device(xs: torch.Tensor, *, owned: bool = True) -> torch.Tensor:
        """Float32 on the device, in a tensor of our own (normalized in place below)."""
        if xs.dtype == torch.uint8:  # move first: uint8 crosses the bus at 1/4 of float32's size
            return xs.to(device).float().div_(255)
        return xs.to(device, torch.float32, copy=not owned)

    train_x = to_device(x[train_idx])  # indexing copies: ours to normalize in place
    if config.augment and train_x.dim() != 4:
        raise ConfigError(f"data.augment: crops and flips need images [N, C, H, W]; "
                          f"{config.dataset} gives {tuple(train_x.shape)}")
    # Per channel for images [N, C, H, W]; per feature for [N, D]; over the rest for [N, C, L].
    dims, view = (0, *range(2, train_x.dim())), (1, -1) + (1,) * (train_x.dim() - 2)
    ones = torch.ones(train_x.shape[1], device=device)
    std, mean = torch.std_mean(train_x, dim=dims) if config.normalize else (ones, 0 * ones)
    std = torch.where(std > 0, std, ones)  # a constant channel is left as it is

    def split(xs: torch.Tensor, ys: torch.Tensor) -> Split:
        return Split(xs.sub_(mean.view(view)).div_(std.view(view)), ys.to(device))

    test = None
    if include_test:
        if len(raw.test_y) == 0:
            raise ConfigError(f"data.dataset: {config.dataset} has no test split (its loader "
                              "returned no test_x, test_y): the final test needs one")
        test_x, test_y = _keep_classes(raw.test_x, raw.test_y, classes, k)
        # Without a class filter these are the cached raw tensors themselves: copy them.
        test = split(to_device(test_x, owned=False), test_y)
    return Data(
        train=split(train_x, y[train_idx]),
        val=split(to_device(x[val_idx]), y[val_idx]) if len(val_idx) else None,
        test=test,
        num_classes=len(classes) if classes is not None else k,
        input_shape=tuple(train_x.shape[1:]),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def _build_stream(source: StreamSource, config: DataConfig, device: torch.device,
                  include_test: bool, merge_val: bool) -> Data:
    """The streamed counterpart of `_build`: the same positions, read through DataLoaders."""
    classes, k = config.classes, source.num_classes
    _check_classes(classes, k)
    relabel, kept, test_kept = None, torch.arange(len(source.train)), None
    if classes is not None:
        if source.targets is None or (include_test and source.test is not None
                                      and source.test_targets is None):
            raise ConfigError(f"data.classes: {config.dataset}'s Datasets have no `targets` "
                              "attribute, so classes cannot be chosen without reading them")
        relabel = torch.full((k,), -1, dtype=torch.long)
        relabel[list(classes)] = torch.arange(len(classes))
        kept = torch.nonzero(relabel[source.targets] >= 0).flatten()
        if source.test_targets is not None:
            test_kept = torch.nonzero(relabel[source.test_targets] >= 0).flatten()
    train_pos, val_pos = _split_positions(len(kept), config, merge_val)

    def split(dataset: Any, indices: torch.Tensor) -> StreamSplit:
        return StreamSplit(dataset, indices, device=device, config=config, relabel=relabel)

    train = split(source.train, kept[train_pos])
    first = train.examples[0][0]
    input_shape = tuple(first.shape)
    if config.augment and len(input_shape) != 3:
        raise ConfigError(f"data.augment: crops and flips need images [C, H, W]; "
                          f"{config.dataset} gives examples of {input_shape}")
    val_source = source.train if source.train_eval is None else source.train_eval
    val = split(val_source, kept[val_pos]) if len(val_pos) else None
    test = None
    if include_test:
        if source.test is None or len(source.test) == 0:
            raise ConfigError(f"data.dataset: {config.dataset} has no test split (for "
                              "image_folder: set data.test_root): the final test needs one")
        test = split(source.test, torch.arange(len(source.test)) if test_kept is None
                     else test_kept)
    channels = input_shape[0] if input_shape else 1
    view = (1, -1) + (1,) * (len(input_shape) - 1)
    mean, std = torch.zeros(channels), torch.ones(channels)
    if config.normalize:
        std, mean = stream_stats(train, batch_size=256)
        std = torch.where(std > 0, std, torch.ones_like(std))
    for part in (train, val, test):
        if part is not None and config.normalize:
            part.mean, part.std = mean.to(device).view(view), std.to(device).view(view)
    return Data(train=train, val=val, test=test,
                num_classes=len(classes) if classes is not None else k,
                input_shape=input_shape, mean=tuple(mean.tolist()), std=tuple(std.tolist()))


# --------------------------------------------------------------------------- augmentation


def _check_augment(augment: tuple[str, ...]) -> None:
    for name in augment:
        if name not in AUGMENTATIONS:
            raise ConfigError(unknown_choice_message("augmentation", name, list(AUGMENTATIONS)))


def augment_batch(x: torch.Tensor, augment: tuple[str, ...],
                  generator: torch.Generator) -> torch.Tensor:
    """Random flips/crops of a batch [B, C, H, W], in order; a new tensor (x if none asked).

    Whole-batch tensor ops, no per-example Python. Random numbers come from `generator` (on any
    device), so a seeded run augments identically. "crop" pads with zeros, i.e. the mean pixel
    when the data is normalized.
    """
    _check_augment(augment)
    n, dev = x.shape[0], x.device

    def rand_int(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(dev)

    for name in augment:
        if name == "flip":
            x = torch.where(rand_int(2).bool().view(n, 1, 1, 1), x.flip(3), x)
        else:  # crop: every example gets its own window into the zero-padded batch
            h, w, p = x.shape[2], x.shape[3], CROP_PAD
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (rand_int(2 * p + 1)[:, None] + torch.arange(h, device=dev)).view(n, h, 1)
            cols = (rand_int(2 * p + 1)[:, None] + torch.arange(w, device=dev)).view(n, 1, w)
            batch = torch.arange(n, device=dev).view(n, 1, 1)
            # Advanced indices split by a slice put their dims first: [B, H, W, C].
            x = padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()
    return x
