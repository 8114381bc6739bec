"""Streamed data: a loader's `torch.utils.data.Dataset`s and the built-in `image_folder`.

The streamed path must train exactly as the tensor path does on the same examples (same split,
same order, same normalization and augmentation), read the test split only when asked, and say
in one line what is wrong with a folder or a Dataset.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import trainers
from trainers import ConfigError, DataNotFoundError, StopTraining, config_from_dict, train
from trainers._checkpoint import CheckpointStore
from trainers._data import clear_cache
from trainers._streaming import StreamSplit

DATA = '''
import torch
from torch.utils.data import Dataset


def _tensors(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (torch.rand(n, 1, 8, 8, generator=g) * 100 + y.view(-1, 1, 1, 1) * 50).to(torch.uint8)
    return x, y


class Pairs(Dataset):
    def __init__(self, x, y, targets=True, shift=0):
        self.x, self.y, self.shift = x, y, shift
        if targets:
            self.targets = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + self.shift, int(self.y[i])


def as_tensors(n=600):
    x, y = _tensors(n)
    tx, ty = _tensors(100, seed=1)
    return {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty, "num_classes": 3}


def as_datasets(n=600):
    x, y = _tensors(n)
    return {"train": Pairs(x, y), "test": Pairs(*_tensors(100, seed=1)), "num_classes": 3}


def only_train():
    return Pairs(*_tensors(200))


def with_eval_view():
    x, y = _tensors(200)
    return {"train": Pairs(x, y, shift=1), "train_eval": Pairs(x, y), "num_classes": 3}


def no_targets():
    return Pairs(*_tensors(200), targets=False)


def no_targets_with_k():
    return {"train": Pairs(*_tensors(200), targets=False), "num_classes": 3}


class Bad(Dataset):
    def __init__(self, item, n=10):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(self.item, Exception):
            raise self.item
        return self.item


def not_pairs():
    return {"train": Bad(torch.zeros(3)), "num_classes": 3}


def float_label():
    return {"train": Bad((torch.zeros(3), 0.5)), "num_classes": 2}


def label_too_big():
    return {"train": Bad((torch.zeros(3), 7)), "num_classes": 3}


def strings():
    return {"train": Bad(("pixels", 1)), "num_classes": 3}


def raises():
    return {"train": Bad(OSError("disk gone")), "num_classes": 3}


def empty():
    return {"train": Bad((torch.zeros(3), 0), n=0), "num_classes": 3}


def eval_view_of_another_length():
    x, y = _tensors(200)
    return {"train": Pairs(x, y), "train_eval": Pairs(x[:10], y[:10]), "num_classes": 3}
'''


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamcode")
    (root / "streamdata.py").write_text(DATA)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    clear_cache()  # drop loaders whose workers would outlive the module


def cfg(data, **knobs):
    base = {"epochs": 3, "batch_size": 64, "lr": 0.05, "device": "cpu", "seed": 1,
            "model": {"type": "mlp", "hidden": [32]}}
    return config_from_dict({**base, **knobs, "data": data})


def curve(result):
    return [v for m in result.history for v in (m.train_loss, m.val_loss, m.val_accuracy)]


@pytest.mark.parametrize("workers", [0, 2])
def test_datasets_train_exactly_as_the_same_tensors_do(code, workers):
    augment = ["crop", "flip"]
    tensors = train(cfg({"dataset": "streamdata:as_tensors", "augment": augment}),
                    evaluate_test=True)
    streamed = cfg({"dataset": "streamdata:as_datasets", "augment": augment,
                    "num_workers": workers})
    data = trainers.load_data(streamed.data)
    assert isinstance(data.train, StreamSplit) and (len(data.train), len(data.val)) == (480, 120)
    result = train(streamed, evaluate_test=True)
    assert curve(result) == pytest.approx(curve(tensors), rel=1e-6)
    assert result.test_loss == pytest.approx(tensors.test_loss, rel=1e-6)
    assert result.final.val_accuracy > 0.9


def test_a_streamed_run_resumes_from_its_checkpoint_as_if_never_stopped(code, tmp_path):
    config = cfg({"dataset": "streamdata:as_datasets", "augment": ["flip"], "num_workers": 1})
    full = train(config)
    store = CheckpointStore(tmp_path / "ckpt.pt")

    def stop_after_one(m):
        raise StopTraining("interrupted")

    assert train(config, stop_after_one, store).epochs_run == 1
    # A resume may read with other DataLoader settings: they do not change what is trained.
    again = cfg({"dataset": "streamdata:as_datasets", "augment": ["flip"], "num_workers": 0})
    resumed = train(again, None, store)
    assert resumed.resumed_from_epoch == 1 and curve(resumed) == pytest.approx(curve(full))


def test_the_validation_split_reads_the_evaluation_view(code):
    data = trainers.load_data(cfg({"dataset": "streamdata:with_eval_view"}).data)
    train_view, eval_view = data.train.examples.source, data.val.examples.source
    assert train_view.shift == 1 and eval_view.shift == 0
    assert not set(data.train.examples.indices) & set(data.val.examples.indices)


def test_the_test_split_is_read_only_when_asked_for(code):
    config = cfg({"dataset": "streamdata:only_train"})
    assert trainers.load_data(config.data).test is None
    result = train(config)  # searching needs no test split
    assert result.status == "completed"
    with pytest.raises(ConfigError, match="has no test split"):
        train(config, evaluate_test=True)


def test_classes_and_subsets_need_labels_without_reading_inputs(code):
    data = trainers.load_data(cfg({"dataset": "streamdata:as_datasets", "classes": [0, 2],
                                   "train_subset": 100}).data, include_test=True)
    assert data.num_classes == 2 and len(data.train) == 100
    labels = torch.cat([y for _, y in data.test.batches(None, 64)])
    assert set(labels.tolist()) <= {0, 1}
    with pytest.raises(ConfigError, match="no `targets`"):
        trainers.load_data(cfg({"dataset": "streamdata:no_targets_with_k",
                                "classes": [0, 1]}).data)


@pytest.mark.parametrize("loader, message", [
    ("no_targets", "without `targets` or `classes`"),
    ("not_pairs", "expected a pair"),
    ("float_label", "expected an integer class label"),
    ("label_too_big", r"the label 7, expected 0\.\.2"),
    ("strings", "input is str"),
    ("raises", "reading train\\[0\\] raised OSError: disk gone"),
    ("empty", "empty train Dataset"),
    ("eval_view_of_another_length", "train_eval has 10 examples"),
])
def test_a_bad_dataset_is_one_clear_error(code, loader, message):
    with pytest.raises(ConfigError, match=message):
        trainers.load_data(cfg({"dataset": f"streamdata:{loader}"}).data)


def test_dataloader_settings_are_checked(code):
    with pytest.raises(ConfigError, match="data.num_workers"):
        cfg({"dataset": "streamdata:as_datasets", "num_workers": -1})
    # hpsearch's own settings, not the loader's arguments:
    c = cfg({"dataset": "streamdata:as_datasets", "num_workers": 0, "pin_memory": False})
    assert c.data.args == {} and c.data.num_workers == 0


# --------------------------------------------------------------------------- image_folder


CLASSES = "abcxyz"


def write_images(root, counts, size=(8, 8), mode="L", seed=0):
    """`counts[name]` images per class folder; each class a brightness of its own."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        c = sorted(CLASSES).index(name[0]) % 3
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = 40 + 60 * c + rng.integers(0, 40, size=size + ((3,) if mode == "RGB" else ()))
            Image.fromarray(base.astype(np.uint8), mode).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", {"a": 60, "b": 60, "c": 60})
    write_images(root / "test", {"a": 10, "c": 10}, seed=1)  # no "b": labelled by name
    (root / "train" / "notes.txt").write_text("not an image")
    return root


def folder_cfg(folders, **data):
    return cfg({"dataset": "image_folder", "root": str(folders / "train"), "num_workers": 0,
                **data})


def test_an_image_folder_trains_and_tests_on_its_own_test_folder(folders):
    config = folder_cfg(folders, test_root=str(folders / "test"), augment=["flip"])
    data = trainers.load_data(config.data, include_test=True)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 3  # grayscale PNGs: 1 channel
    assert (len(data.train), len(data.val), len(data.test)) == (144, 36, 20)
    test_labels = torch.cat([y for _, y in data.test.batches(None, 8)])
    assert sorted(set(test_labels.tolist())) == [0, 2]  # "c" is class 2 in both folders
    result = train(config, evaluate_test=True)
    assert result.final.val_accuracy > 0.9 and result.test_accuracy > 0.9


def test_resize_and_channels_are_data_settings(folders):
    data = trainers.load_data(folder_cfg(folders, resize=[12, 6], channels=3).data)
    assert data.input_shape == (3, 12, 6) and len(data.mean) == 3
    x, _ = next(data.train.batches(None, 16))
    assert x.shape == (16, 3, 12, 6) and x.dtype == torch.float32
    assert trainers.load_data(folder_cfg(folders, resize=5).data).input_shape == (1, 5, 5)


def test_normalization_comes_from_the_train_part(folders):
    data = trainers.load_data(folder_cfg(folders).data)
    pixels = torch.cat([x for x, _ in data.train.batches(None, 64)])
    assert abs(float(pixels.mean())) < 1e-4 and float(pixels.std()) == pytest.approx(1, abs=1e-3)
    plain = trainers.load_data(folder_cfg(folders, normalize=False).data)
    pixels = torch.cat([x for x, _ in plain.train.batches(None, 64)])
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1


def test_images_of_different_sizes_need_resize(folders, tmp_path):
    root = tmp_path / "mixed"
    write_images(root, {"a": 3, "b": 3})
    write_images(root, {"b": 1}, size=(9, 9), seed=3)  # overwrites b/0.png with a 9x9 image
    config = cfg({"dataset": "image_folder", "root": str(root), "num_workers": 0,
                  "val_fraction": 0.0, "normalize": False}, batch_size=8)
    with pytest.raises(ValueError, match="set data.resize"):
        train(config)
    resized = cfg({"dataset": "image_folder", "root": str(root), "num_workers": 0,
                   "val_fraction": 0.0, "resize": 8}, batch_size=8)
    assert train(resized).status == "completed"


def test_rgb_images_keep_three_channels(tmp_path):
    write_images(tmp_path / "rgb", {"x": 4, "y": 4}, mode="RGB")
    data = trainers.load_data(cfg({"dataset": "image_folder", "root": str(tmp_path / "rgb"),
                                   "num_workers": 0}).data)
    assert data.input_shape == (3, 8, 8)


def test_a_bad_image_folder_is_one_clear_error(folders, tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    write_images(tmp_path / "other", {"zebra": 2})
    cases = [
        ({"root": str(tmp_path / "nowhere")}, DataNotFoundError, "is not a directory"),
        ({"root": str(tmp_path / "empty")}, DataNotFoundError, "holds no images"),
        ({"root": str(folders / "train"), "test_root": str(tmp_path / "other")}, ConfigError,
         r"classes \['zebra'\] are not in data.root"),
        ({}, ConfigError, "data.root: image_folder needs"),
        ({"root": str(folders / "train"), "resize": [1, 2, 3]}, ConfigError, "data.resize"),
        ({"root": str(folders / "train"), "channels": 2}, ConfigError, "data.channels"),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=message):
            trainers.load_data(cfg({"dataset": "image_folder", **data}).data,
                               include_test="test_root" in data)
    with pytest.raises(ConfigError, match="data.root: only the image_folder dataset"):
        cfg({"dataset": "synthetic", "root": "x"})


def test_the_lr_range_test_reads_streamed_batches(folders):
    result = trainers.lr_range_test(folder_cfg(folders, num_workers=1), iterations=30)
    assert len(result.lrs) > 10 and result.lrs == tuple(sorted(result.lrs))
