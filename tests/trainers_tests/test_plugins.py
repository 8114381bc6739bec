"""Users' own networks and datasets: by import path, or installed under an entry-point group."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trainers
from tests.plugins import install_package
from trainers import ConfigError, config_from_dict, train
from trainers._finetune import prepare_model

NETS = '''
import math
from torch import nn


class Net(nn.Module):
    """A small network with its classifier named `classifier`, not defined last."""

    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.classifier = nn.Linear(width, num_classes)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                  nn.ReLU())
        self.extra = nn.Linear(width, width)

    def forward(self, x):
        return self.classifier(self.extra(self.body(x)).relu())


def build(input_shape, num_classes, width=16, depth=1):
    layers = [nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def conv(input_shape, num_classes):
    c = input_shape[0]
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def named_head(input_shape, num_classes):
    return Net(input_shape, num_classes)


def not_a_module(input_shape, num_classes):
    return 42


def no_shape():
    return nn.Linear(2, 2)


def broken(input_shape, num_classes):
    raise RuntimeError("out of ideas")


NOT_CALLABLE = 3
'''

DATA = '''
import numpy as np
import torch


def _blobs(n, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def features(n=600):
    x, y = _blobs(n)
    tx, ty = _blobs(200, seed=1)
    return {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty}


def images(n=300):
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    y = (x.float().mean(dim=(1, 2, 3)) > 127.5).long()
    return x[:250], y[:250], x[250:], y[250:]


def arrays():
    x, y = _blobs(300)
    return x.numpy(), y.numpy()  # no test split


def float_labels():
    x, y = _blobs(100)
    return x, y.float()


def wrong_lengths():
    return torch.zeros(10, 3), torch.zeros(9, dtype=torch.long)


def one_class():
    return torch.randn(20, 3), torch.zeros(20, dtype=torch.long)


def many_classes():
    x, y = _blobs(100)
    return {"train_x": x, "train_y": y, "num_classes": 2}


def strings():
    return "not", "tensors"
'''


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """The modules `usernets` and `userdata` on sys.path, as a user's package would be."""
    root = tmp_path_factory.mktemp("usercode")
    (root / "usernets.py").write_text(NETS)
    (root / "userdata.py").write_text(DATA)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def cfg(**knobs):
    base = {"epochs": 3, "batch_size": 32, "lr": 0.05, "device": "cpu"}
    return config_from_dict({**base, **knobs})


def test_an_import_path_network_trains_with_its_own_arguments(code):
    c = cfg(model={"type": "usernets:build", "width": 24, "depth": 2},
            data={"dataset": "synthetic", "size": 512})
    assert c.model.args == {"width": 24, "depth": 2}
    result = train(c)
    assert result.status == "completed" and result.final.val_accuracy > 0.5
    assert result.parameters == (64 * 24 + 24) + (24 * 24 + 24) + (24 * 10 + 10)
    assert len(result.final.grad_norms) == 3  # the gradient-norm charts see its layers


def test_an_import_path_dataset_of_features_trains_per_feature_normalized(code):
    c = cfg(model={"type": "mlp", "hidden": [16]}, data={"dataset": "userdata:features", "n": 400})
    data = trainers.load_data(c.data, include_test=True)
    assert data.input_shape == (12,) and data.num_classes == 3
    assert len(data.train.y) + len(data.val.y) == 400 and len(data.test.y) == 200
    assert torch.allclose(data.train.x.mean(0), torch.zeros(12), atol=1e-5)
    assert torch.allclose(data.train.x.std(0), torch.ones(12), atol=1e-3)
    assert train(c).final.val_accuracy > 0.9


def test_a_tuple_of_uint8_images_is_the_on_device_image_path(code):
    c = cfg(model="usernets:conv", data={"dataset": "userdata:images", "augment": ["flip", "crop"]})
    result = train(c)
    assert result.status == "completed"
    data = trainers.load_data(c.data)
    assert data.input_shape == (1, 8, 8) and data.train.x.dtype == torch.float32


def test_numpy_arrays_work_and_a_missing_test_split_is_refused_only_where_needed(code):
    c = cfg(model="usernets:build", dataset="userdata:arrays")
    assert train(c).status == "completed"
    with pytest.raises(ConfigError, match="userdata:arrays has no test split"):
        trainers.load_data(c.data, include_test=True)


def test_the_config_round_trips_with_the_plugins_arguments_beside_its_own_keys(code):
    c = cfg(model={"type": "usernets:build", "width": 8, "freeze": "0"},
            data={"dataset": "userdata:features", "n": 300, "val_fraction": 0.25})
    d = c.to_dict()
    assert d["model"] == {"type": "usernets:build", "weights": None, "reset_head": False,
                          "freeze": "0", "freeze_blocks": 0, "unfreeze_after": None,
                          "bn_stats": "update", "head": None, "width": 8}
    assert d["data"]["n"] == 300 and "size" not in d["data"]
    assert config_from_dict(d) == c
    # A dotted knob reaches the plugin, as a study's space does.
    assert c.replace(**{"model.width": 32}).model.args == {"width": 32}
    # A built-in keeps its strict keys, and takes no arguments.
    with pytest.raises(ConfigError, match="model.width: unknown setting"):
        cfg(model={"type": "mlp", "width": 8})
    with pytest.raises(ConfigError, match="model.args: only your own network .* 'mlp' is built"):
        cfg(model={"type": "mlp", "args": {"width": 8}})
    # A config that moves from a plugin to a built-in leaves the plugin's arguments behind.
    assert c.replace(model="mlp").model.args == {}


def test_fine_tuning_finds_a_plugins_head_or_takes_the_named_one(code, tmp_path):
    guessed = prepare_model(cfg(model="usernets:build").model, cfg().init, (1, 8, 8), 10)
    assert guessed.parts.head == ("3",)  # the last Linear of the Sequential
    assert guessed.head == {"3.weight", "3.bias"}
    named = cfg(model={"type": "usernets:named_head", "head": "classifier",
                       "freeze": "backbone"})
    net = prepare_model(named.model, named.init, (1, 8, 8), 10)
    # Registration order would guess `extra`; the named head is the classifier.
    assert net.head == {"classifier.weight", "classifier.bias"}
    assert net.frozen == {"body.1.weight", "body.1.bias", "extra.weight", "extra.bias"}
    # Weights of a 10-class run load into a 4-class one, the head re-initialized.
    path = tmp_path / "pre.pt"
    torch.save(net.model.state_dict(), path)
    again = prepare_model(cfg(model={"type": "usernets:named_head", "head": "classifier",
                                     "weights": str(path)}).model, named.init, (1, 8, 8), 4)
    assert torch.equal(again.model.state_dict()["extra.weight"], net.model.state_dict()[
        "extra.weight"])
    assert any("classifier" in n for n in again.notes)
    with pytest.raises(ConfigError, match="model.head: 'clasifier' names no module"):
        prepare_model(cfg(model={"type": "usernets:named_head", "head": "clasifier"}).model,
                      named.init, (1, 8, 8), 10)


@pytest.mark.parametrize("model,data,message", [
    ("nosuchpkg.nets:build", "synthetic",
     r"model.type: nosuchpkg.nets:build: cannot import 'nosuchpkg.nets' \(ModuleNotFoundError"),
    ("usernets:missing", "synthetic", "module 'usernets' has no attribute 'missing'"),
    ("usernets:NOT_CALLABLE", "synthetic", "expected a callable, got int"),
    ("usernets:not_a_module", "synthetic",
     "usernets:not_a_module returned int, expected a torch.nn.Module"),
    ("usernets:no_shape", "synthetic", "usernets:no_shape does not take the arguments "
                                       "input_shape, num_classes"),
    ("usernets:broken", "synthetic", "usernets:broken raised RuntimeError: out of ideas"),
    ("mlp", "userdata:float_labels", "expected integer class labels in train_y"),
    ("mlp", "userdata:wrong_lengths",
     re.escape("expected train_x [N, ...] and train_y [N], got (10, 3) and (9,)")),
    ("mlp", "userdata:one_class", "at least 2 classes"),
    ("mlp", "userdata:many_classes", "labels 0..2 and num_classes 2"),
    ("mlp", "userdata:strings", "returned str as train_x, expected a tensor or a numpy array"),
    ("mlpp", "synthetic", "unknown model 'mlpp'.* Did you mean 'mlp'\\? Or your own network"),
])
def test_bad_user_code_is_one_error_naming_it(code, model, data, message):
    with pytest.raises(ConfigError, match=message):
        train(cfg(model=model, dataset=data, epochs=1))


def test_installed_plugins_are_found_by_name(tmp_path):
    """A package that registers entry points, as pip installs it (a dist-info on the path)."""
    (tmp_path / "acme_nets.py").write_text(NETS)
    (tmp_path / "acme_data.py").write_text(DATA)
    install_package(tmp_path, "acme", models={"acmenet": "acme_nets:build"},
                    datasets={"acme_blobs": "acme_data:features"})
    code = ("import trainers; r = trainers.train({'model': {'type': 'acmenet', 'width': 8}, "
            "'data': {'dataset': 'acme_blobs', 'n': 200}, 'epochs': 1, 'device': 'cpu'}); "
            "print(r.status, sorted(trainers.installed_plugins('hpsearch.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": ""}, cwd=Path.home(),
                         check=True)
    assert out.stdout.split() == ["completed", "['acmenet']"]


def test_plugin_arguments_must_be_plain_data():
    with pytest.raises(ConfigError, match="plain data"):
        trainers.Args({"f": np.float32})
    assert hash(trainers.Args({"a": [1, 2]})) == hash(trainers.Args({"a": [1, 2]}))
    assert math.isclose(trainers.Args({"x": 0.5})["x"], 0.5)
