from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import multiprocessing
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainers import _data
from trainers._config import DataConfig
from trainers._data import (
    DATASETS,
    Data,
    augment_batch,
    check_data_config,
    find_data_dir,
    load_data,
)
from trainers._errors import ConfigError, DataNotFoundError

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")

@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user env, no ./data, no system dirs, no downloads, empty caches: every test alike."""
    monkeypatch.delenv("HPSEARCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_data, "_SYSTEM_DIRS", {})

    def no_network(dataset: str, root: Path) -> None:
        raise OSError("no network in tests")

    monkeypatch.setattr(_data, "_download", no_network)
    _data.clear_cache()
    yield
    _data.clear_cache()

def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    data = header + np.array(array.shape, ">i4").tobytes() + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)

def write_fake_idx_dataset(folder: Path, *, gz: bool = False, n: int = 50, label: int = 0):
    """A tiny MNIST-shaped dataset (6x5 images); `label` offsets labels to tell copies apart."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n, 6, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": ((np.arange(n) + label) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 6, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(20) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays

# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    ints = np.array([[1, -2], [70000, 4]], dtype=">i4")
    write_idx(tmp_path / "images", images, gz=gz)
    write_idx(tmp_path / "ints", ints, gz=gz)
    np.testing.assert_array_equal(_data._read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(_data._read_idx(tmp_path / "ints"), ints.astype(np.int32))

def test_idx_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9, has 3
    with pytest.raises(ValueError, match="bad"):
        _data._read_idx(tmp_path / "bad")

@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision"])
def test_fashion_layouts_load(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "mine"
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    arrays = write_fake_idx_dataset(folder, gz=layout == "gz")
    assert find_data_dir("fashion_mnist", str(root)) == folder
    data = load_data(DataConfig(dataset="fashion_mnist", data_dir=str(root), val_fraction=0.2,
                                normalize=False), include_test=True)
    assert (data.train.x.shape, data.val.x.shape) == ((40, 1, 6, 5), (10, 1, 6, 5))
    assert data.test.x.shape == (20, 1, 6, 5) and data.input_shape == (1, 6, 5)
    assert data.num_classes == 10 and data.train.x.dtype == torch.float32
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(data.test.x, expected)

def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given, env, cwd_data, system = (tmp_path / d for d in ("given", "env", "data", "system"))
    for i, folder in enumerate((given, env, cwd_data, system)):
        write_fake_idx_dataset(folder, label=i)
    monkeypatch.setattr(_data, "_SYSTEM_DIRS", {"fashion_mnist": (system,)})
    monkeypatch.setenv("HPSEARCH_DATA", str(env))
    assert find_data_dir("fashion_mnist", str(given)) == given
    assert find_data_dir("fashion_mnist", None) == env
    monkeypatch.delenv("HPSEARCH_DATA")
    assert find_data_dir("fashion_mnist", None) == cwd_data  # ./data, cwd is tmp_path
    (cwd_data / "train-images-idx3-ubyte").unlink()  # an incomplete folder is passed over
    assert find_data_dir("fashion_mnist", None) == system
    # torchvision's named layout beats bare files in the same root (MNIST shares file names)
    write_fake_idx_dataset(env / "FashionMNIST" / "raw")
    assert find_data_dir("fashion_mnist", str(env)) == env / "FashionMNIST" / "raw"
    # the loader reads the folder found: the first label tells the copies apart
    loaded = [DATASETS.get("fashion_mnist").load(DataConfig(data_dir=str(d))) for d in (given, env)]
    assert [int(raw.train_y[0]) for raw in loaded] == [0, 0]  # env: its FashionMNIST/raw copy
    assert int(DATASETS.get("fashion_mnist").load(DataConfig()).train_y[0]) == 3  # system

def test_not_found_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share"
    monkeypatch.setattr(_data, "_SYSTEM_DIRS", {"fashion_mnist": (system,)})
    monkeypatch.setenv("HPSEARCH_DATA", str(tmp_path / "env"))
    calls = []

    def failing(dataset: str, root: Path) -> None:
        calls.append((dataset, root))
        raise OSError("no network")

    monkeypatch.setattr(_data, "_download", failing)
    with pytest.raises(DataNotFoundError) as err:
        load_data(DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "given")))
    message = str(err.value)
    for place in ("given", "given/FashionMNIST/raw", "env", "data", "usr-share"):
        assert str(tmp_path / place) in message
    for hint in ("dataset-fashion-mnist", "HPSEARCH_DATA", "OSError: no network",
                 "train-images-idx3-ubyte"):
        assert hint in message
    assert calls == [("fashion_mnist", tmp_path / "given")]
    assert isinstance(err.value, FileNotFoundError)

def test_download_is_the_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPSEARCH_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(_data, "_download",
                        lambda dataset, root: write_fake_idx_dataset(root / "FashionMNIST/raw"))
    data = load_data(DataConfig(dataset="fashion_mnist"))
    assert data.train.x.shape == (40, 1, 6, 5)
    assert (tmp_path / "env" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()

_REAL_DOWNLOAD = _data._download  # before the fixture replaces it

def _race(barrier: Any, results: Any) -> None:
    """One process of the race below: find the data (downloading if none is there), then read
    every file (numpy only: torch's thread pools are not for forked children)."""
    downloads = []

    def counted(dataset: str, root: Path) -> None:
        downloads.append(str(root))
        _REAL_DOWNLOAD(dataset, root)

    _data._download = counted
    barrier.wait()
    try:
        folder = find_data_dir("fashion_mnist", None)
        arrays = [_data._read_idx(folder / name) for name in _data._IDX_FILES]
        results.put({"folder": str(folder), "downloads": downloads,
                     "sums": [int(a.sum(dtype=np.int64)) for a in arrays]})
    except Exception as e:
        results.put({"error": f"{type(e).__name__}: {e}"})

@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="apt install dataset-fashion-mnist")
def test_processes_sharing_a_data_folder_download_once(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose's workers share /data: started together with no dataset there, one downloads
    (under the folder's lock), the others wait and read its complete files. The download is
    torchvision's own, from a local HTTP server as its mirror, md5s checked."""
    import torchvision

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=str(SYSTEM_FASHION)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fashion = torchvision.datasets.FashionMNIST
    monkeypatch.setattr(fashion, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(fashion, "resources", [
        (name, hashlib.md5((SYSTEM_FASHION / name).read_bytes()).hexdigest())
        for name, _ in fashion.resources])
    shared = tmp_path / "shared"
    monkeypatch.setenv("HPSEARCH_DATA", str(shared))
    context = multiprocessing.get_context("fork")  # inherits the mirror: no imports again
    barrier, results = context.Barrier(3), context.Queue()
    racers = [context.Process(target=_race, args=(barrier, results)) for _ in range(3)]
    try:
        for racer in racers:
            racer.start()
        found = [results.get(timeout=120) for _ in racers]
    finally:
        for racer in racers:
            racer.join(10)
            racer.kill()
        server.shutdown()
        server.server_close()
    assert not [r for r in found if "error" in r], found
    assert sum(len(r["downloads"]) for r in found) == 1, found
    assert {r["folder"] for r in found} == {str(shared / "FashionMNIST" / "raw")}
    source = [_data._read_idx(SYSTEM_FASHION / name) for name in _data._IDX_FILES]
    assert all(r["sums"] == [int(a.sum(dtype=np.int64)) for a in source] for r in found)
    assert (shared / _data.DOWNLOAD_LOCK).is_file()
    assert not list(shared.glob(".download-*")), "the staging folder is removed"

@pytest.mark.parametrize("dataset, hint", [("mnist", "MNIST/raw"),
                                           ("cifar10", "cifar-10-batches-py/data_batch_1")])
def test_absent_datasets_say_how_to_fix(tmp_path: Path, dataset: str, hint: str) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_data(DataConfig(dataset=dataset))
    message = str(err.value)
    assert hint in message and str(tmp_path / "data") in message
    assert "HPSEARCH_DATA" in message and "download=True" in message

def test_mnist_reads_its_own_layout(tmp_path: Path) -> None:
    write_fake_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    assert load_data(DataConfig(dataset="mnist")).train.x.shape == (40, 1, 6, 5)
    with pytest.raises(DataNotFoundError):  # FashionMNIST must not pick up MNIST's folder
        load_data(DataConfig(dataset="fashion_mnist"))

def test_registry_and_unknown_names() -> None:
    assert sorted(DATASETS) == ["cifar10", "fashion_mnist", "image_folder", "mnist", "synthetic"]
    assert all(DATASETS.get(n).image for n in DATASETS)
    with pytest.raises(ConfigError, match="fashion_mnist"):
        load_data(DataConfig(dataset="fashion_mnst"))
    with pytest.raises(ConfigError, match="size"):
        load_data(DataConfig(dataset="mnist", size=10))

@pytest.mark.parametrize("bad, key", [
    ({"dataset": "cifar"}, "'cifar10'"),
    ({"augment": ("flip", "rotate")}, "'rotate'"),
    ({"dataset": "tabular", "augment": ("flip",)}, "not image data"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"train_subset": 0}, "train_subset"),
    ({"size": 100}, "size"),
    ({"dataset": "synthetic", "size": 0}, "size"),
])
def test_check_data_config_reads_no_data(bad: dict, key: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tabular = _data.DatasetInfo("tabular", _data._load_synthetic, image=False)
    monkeypatch.setitem(DATASETS._entries, "tabular", tabular)
    with pytest.raises(ConfigError, match=key):  # no data here: it must fail before loading
        check_data_config(DataConfig(**bad))
    check_data_config(DataConfig())

# ----------------------------------------------------------------------------- splits

def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}

def synth(**kw) -> DataConfig:
    return DataConfig(**{"dataset": "synthetic", "size": 1000, "normalize": False, **kw})

def test_split_sizes_disjoint_and_complete() -> None:
    data = load_data(synth(val_fraction=0.2))
    raw = DATASETS.get("synthetic").load(synth())
    assert (len(data.train.y), len(data.val.y)) == (800, 200)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert rows(data.train.x).isdisjoint(rows(data.val.x))
    assert rows(data.train.x) | rows(data.val.x) == rows(raw.train_x)
    assert load_data(synth(val_fraction=0.0)).val is None
    merged = load_data(synth(val_fraction=0.2), merge_val=True)
    assert merged.val is None and rows(merged.train.x) == rows(raw.train_x)

def test_split_is_seeded() -> None:
    a, b = load_data(synth(seed=1)), load_data(synth(seed=2))
    _data.clear_cache()
    again = load_data(synth(seed=1))
    assert again is not a and torch.equal(a.val.x, again.val.x)
    assert torch.equal(a.val.y, again.val.y)
    assert not torch.equal(a.val.y, b.val.y)
    assert rows(a.train.x) | rows(a.val.x) == rows(b.train.x) | rows(b.val.x)  # same examples

@pytest.mark.parametrize("classes", [(3, 7), (7, 3, 0)])
def test_classes_relabel_in_given_order(classes: tuple[int, ...]) -> None:
    data = load_data(synth(classes=classes, val_fraction=0.25), include_test=True)
    raw = DATASETS.get("synthetic").load(synth())
    assert data.num_classes == len(classes)
    for split, raw_x, raw_y in ((data.train, raw.train_x, raw.train_y),
                                (data.test, raw.test_x, raw.test_y)):
        assert set(split.y.tolist()) == set(range(len(classes)))
        for new, old in enumerate(classes):
            assert rows(split.x[split.y == new]) <= rows(raw_x[raw_y == old])
    total = sum(int((raw.train_y == c).sum()) for c in classes)
    assert len(data.train.y) + len(data.val.y) == total
    with pytest.raises(ConfigError, match="classes"):
        load_data(synth(classes=(3, 3)))
    with pytest.raises(ConfigError, match="classes"):
        load_data(synth(classes=(1, 10)))

def test_train_subset() -> None:
    full, sub = load_data(synth(val_fraction=0.2)), load_data(synth(val_fraction=0.2,
                                                                    train_subset=100))
    assert len(sub.train.y) == 100 and torch.equal(sub.val.x, full.val.x)
    assert rows(sub.train.x) <= rows(full.train.x)
    with pytest.raises(ConfigError, match="train_subset"):
        load_data(synth(val_fraction=0.2, train_subset=801))

def test_normalization_uses_train_stats_only() -> None:
    data = load_data(synth(normalize=True, val_fraction=0.5, train_subset=100), include_test=True)
    plain = load_data(synth(normalize=False, val_fraction=0.5, train_subset=100),
                      include_test=True)
    x = data.train.x
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-5
    assert data.mean == pytest.approx((float(plain.train.x.mean()),), abs=1e-6)
    assert data.std == pytest.approx((float(plain.train.x.std()),), abs=1e-6)
    m, s = data.mean[0], data.std[0]
    for normed, raw in ((data.val, plain.val), (data.test, plain.test)):
        torch.testing.assert_close(normed.x, (raw.x - m) / s)
    assert plain.mean == (0.0,) and plain.std == (1.0,)

def test_uint8_scaled_to_unit_range(tmp_path: Path) -> None:
    write_fake_idx_dataset(tmp_path / "data")
    data = load_data(DataConfig(dataset="mnist", normalize=False))
    assert 0.0 <= float(data.train.x.min()) and float(data.train.x.max()) <= 1.0
    normed = load_data(DataConfig(dataset="mnist"))
    assert 0.4 < normed.mean[0] < 0.6 and 0.2 < normed.std[0] < 0.4  # uniform bytes

def test_cache_returns_the_same_tensors() -> None:
    config = synth()
    raw = DATASETS.get("synthetic").load(config)
    a = load_data(config)
    assert load_data(config) is a and DATASETS.get("synthetic").load(config) is raw
    other = load_data(dataclasses.replace(config, seed=5))
    assert load_data(config) is a and load_data(dataclasses.replace(config, seed=5)) is other
    load_data(dataclasses.replace(config, seed=6))  # LRU of 2: evicts the older
    assert load_data(config) is not a
    assert DATASETS.get("synthetic").load(dataclasses.replace(config, seed=9)) is raw
    test = load_data(config, include_test=True).test
    assert test.x.data_ptr() != raw.test_x.data_ptr() and raw.test_x.abs().max() > 1.5

def test_synthetic_is_fast_and_fixed() -> None:
    start = time.perf_counter()
    raw = DATASETS.get("synthetic").load(DataConfig(dataset="synthetic"))
    assert time.perf_counter() - start < 0.5  # ~15 ms; generous for a busy CI machine
    assert raw.train_x.shape == (2048, 1, 8, 8) and raw.test_x.shape == (512, 1, 8, 8)
    bigger = DATASETS.get("synthetic").load(synth(size=4096))
    assert torch.equal(raw.test_x, bigger.test_x)

def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    data: Data = load_data(DataConfig(dataset="synthetic"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, data.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        for i in torch.randperm(len(data.train.y)).split(64):
            loss = torch.nn.functional.cross_entropy(model(data.train.x[i]), data.train.y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(data.val.x).argmax(1) == data.val.y).float().mean()
    assert accuracy > 0.8

# ----------------------------------------------------------------------------- augmentation

def batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, 10, 12, generator=torch.Generator().manual_seed(1))

def test_flip_flips_about_half() -> None:
    x = batch()
    out = augment_batch(x, ("flip",), torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert out.shape == x.shape and bool((flipped | kept).all())
    assert 16 <= int(flipped.sum()) <= 48

def test_crop_shifts_each_example() -> None:
    x, p = batch(), _data.CROP_PAD
    out = augment_batch(x, ("crop",), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = []
    for o, pad in zip(out, padded, strict=True):
        found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(o, pad[:, dy:dy + 10, dx:dx + 12])]
        assert found, "every crop is a window of the zero-padded example"
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # per-example offsets, not one shift for the batch

def test_augment_is_seeded_and_pure() -> None:
    x = batch()
    before = x.clone()
    a = augment_batch(x, ("crop", "flip"), torch.Generator().manual_seed(3))
    b = augment_batch(x, ("crop", "flip"), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(x, before)
    assert augment_batch(x, (), torch.Generator()) is x

def test_bad_augment_names() -> None:
    with pytest.raises(ConfigError, match=r"'rotate'.*crop, flip"):
        augment_batch(batch(), ("flip", "rotate"), torch.Generator())
    with pytest.raises(ConfigError, match="'flp'"):  # at load time, before any training
        load_data(DataConfig(dataset="fashion_mnist", augment=("flp",)))
    assert load_data(synth(augment=("flip",))) is load_data(synth())  # augment: per batch

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device() -> None:
    data = load_data(synth(), device="cuda", include_test=True)
    assert {data.train.x.device.type, data.val.y.device.type, data.test.x.device.type} == {"cuda"}
    assert load_data(synth(), device="cuda") is not load_data(synth())
    for generator in (torch.Generator(), torch.Generator(device="cuda")):
        out = augment_batch(batch().cuda(), ("crop", "flip"), generator.manual_seed(0))
        assert out.device.type == "cuda" and out.shape == (64, 3, 10, 12)

# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="apt install dataset-fashion-mnist")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_data, "_SYSTEM_DIRS", {"fashion_mnist": (SYSTEM_FASHION,)})
    data = load_data(DataConfig(dataset="fashion_mnist"), include_test=True)
    assert find_data_dir("fashion_mnist", None) == SYSTEM_FASHION
    assert (len(data.train.y), len(data.val.y), len(data.test.y)) == (48000, 12000, 10000)
    assert data.train.x.shape == (48000, 1, 28, 28) and data.input_shape == (1, 28, 28)
    assert data.num_classes == 10 and set(data.test.y.tolist()) == set(range(10))
    assert data.mean[0] == pytest.approx(0.286, abs=0.002)  # the well-known FashionMNIST stats
    assert data.std[0] == pytest.approx(0.353, abs=0.002)
