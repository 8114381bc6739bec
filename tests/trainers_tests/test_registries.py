"""Driven by the registries: every optimizer, init, schedule and model builds and trains."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import INITS, LR_SCHEDULES, MODELS, OPTIMIZERS, ConfigError, config_from_dict, train
from trainers._inits import apply_init
from trainers._models import build_model
from trainers._optimizers import build_optimizer, param_groups

FAST = {"dataset": "synthetic", "data.size": 512, "hidden": [16], "epochs": 1, "batch_size": 64}


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_trains_an_epoch(name):
    lr = 0.05 if name in ("sgd", "nesterov", "adagrad", "adadelta") else 0.005
    result = train({**FAST, "optimizer": name, "lr": lr, "epochs": 2, "weight_decay": 1e-4})
    assert result.status == "completed"
    assert result.history[-1].train_loss < result.history[0].train_loss * 1.5
    assert math.isfinite(result.history[-1].val_loss)


@pytest.mark.parametrize("name", INITS.names())
def test_every_init_builds_and_trains(name):
    result = train({**FAST, "init": name})
    assert result.status == "completed"


@pytest.mark.parametrize("name", LR_SCHEDULES.names())
def test_every_schedule_trains_an_epoch(name):
    result = train({**FAST, "scheduler": name, "epochs": 2})
    assert result.status == "completed"
    assert result.history[-1].lr > 0


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_trains_an_epoch(name):
    result = train({**FAST, "model": name, "widths": [4, 8]})
    assert result.status == "completed"
    assert result.parameters > 0


def test_init_normal_has_requested_std_and_zero_bias():
    cfg = config_from_dict({"init": "normal", "hidden": [256]})
    model = build_model(cfg.model, (1, 28, 28), 10)
    torch.manual_seed(0)
    apply_init(model, cfg.init)
    first = model[1]
    assert first.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(first.bias).item() == 0


def test_kaiming_fan_out_mode_is_honoured():
    cfg = config_from_dict({"init": "kaiming_normal", "init.mode": "fan_out", "hidden": [512]})
    model = build_model(cfg.model, (1, 28, 28), 10)
    apply_init(model, cfg.init)
    expected = math.sqrt(2.0 / 512)  # fan_out of the 784->512 layer is 512
    assert model[1].weight.std().item() == pytest.approx(expected, rel=0.05)


def test_no_weight_decay_on_biases_and_norms_unless_asked():
    cfg = config_from_dict({"hidden": [8], "norm": "batchnorm", "weight_decay": 1e-3})
    model = build_model(cfg.model, (1, 8, 8), 10)
    groups = param_groups(model, 1e-3)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    everything = param_groups(model, 1e-3, decay_all=True)
    assert len(everything) == 1 and everything[0]["weight_decay"] == 1e-3


def test_nesterov_and_amsgrad_names_set_their_flags():
    model = torch.nn.Linear(3, 2)
    sgd = build_optimizer(model, config_from_dict({"optimizer": "nesterov"}).optimizer, lr=0.1)
    assert sgd.param_groups[0]["nesterov"] is True
    adam = build_optimizer(model, config_from_dict({"optimizer": "amsgrad"}).optimizer, lr=0.1)
    assert adam.param_groups[0]["amsgrad"] is True


def test_linear_scaling_rule_scales_lr_with_batch():
    result = train({**FAST, "lr": 0.1, "optimizer.lr_per_batch": 256, "batch_size": 64})
    assert result.history[-1].lr == pytest.approx(0.1 * 64 / 256)


def test_mlp_norm_per_layer_and_dropout():
    cfg = config_from_dict({"hidden": [16, 8], "norm": "none,layernorm", "dropout": 0.2})
    model = build_model(cfg.model, (1, 8, 8), 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds.count("LayerNorm") == 1 and kinds.count("Dropout") == 2
    assert kinds.index("LayerNorm") > kinds.index("Linear", 2)


def test_cnn_is_conv_bn_relu_3x3():
    cfg = config_from_dict({"model": "cnn", "widths": [8, 16], "model.blocks": 2})
    model = build_model(cfg.model, (1, 28, 28), 10)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"optimizer": "adamm"}, "unknown optimizer 'adamm'; expected one of: sgd"),
        ({"scheduler": "cosin"}, "Did you mean 'cosine'?"),
        ({"init": "he"}, "unknown init 'he'; expected one of: default"),
        ({"model": "transformer"}, "unknown model 'transformer'; expected one of: mlp, cnn"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"activation": "swish"}, "unknown activation 'swish'"),
        ({"norm": "groupnorm"}, "unknown norm 'groupnorm'"),
        ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
        ({"batch_size": 12.5}, "batch_size: expected an integer, got 12.5"),
        ({"nesterov": "yes"}, "nesterov: expected true or false, got 'yes'"),
        ({"hidden": "wide"}, "hidden[0]: expected an integer, got 'wide'"),
        ({"lr": -0.1}, "optimizer.lr: expected a positive number, got -0.1"),
        ({"learning_rate": 0.1}, "learning_rate: unknown setting"),
        ({"optimizer": {"name": "sgd", "momentun": 0.9}}, "Did you mean 'optimizer.momentum'?"),
        ({"init.mode": "fan_avg"}, "unknown init.mode 'fan_avg'"),
        ({"warmup_epochs": 20, "epochs": 10}, "schedule.warmup_epochs: expected fewer than"),
    ],
)
def test_bad_config_names_the_value_and_choices(values, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert fragment in str(err.value)


def test_config_round_trips_through_dict():
    cfg = config_from_dict({"optimizer": "adamw", "lr": 3e-4, "hidden": [64, 32],
                            "scheduler": "onecycle", "data.augment": ["flip"]})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.5).optimizer.lr == 0.5
