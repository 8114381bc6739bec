"""Fine-tuning: torchvision networks, weights files, freezing, parameter groups, BN statistics."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import ConfigError, config_from_dict, train
from trainers._finetune import prepare_model
from trainers._schedules import Schedule

SYNTH = {"dataset": "synthetic", "size": 256}
VISION = ["resnet18", "resnet34", "mobilenet_v3_small", "vgg11_bn"]


def config(**knobs):
    base = {"data": SYNTH, "batch_size": 64, "epochs": 1, "lr": 0.05, "device": "cpu"}
    return config_from_dict({**base, **knobs})


def prepared(model: str = "mlp", shape=(1, 8, 8), classes: int = 10, **knobs):
    c = config(model=model, **knobs)
    return prepare_model(c.model, c.init, shape, classes)


def save_weights(tmp_path, model: str = "mlp", shape=(1, 8, 8), classes: int = 10, **knobs):
    net = prepared(model, shape, classes, **knobs).model
    path = tmp_path / f"{model}-{classes}.pt"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.mark.parametrize("name", VISION)
def test_torchvision_network_trains_an_epoch_on_small_gray_images(name):
    result = train(config(model=name, batch_size=128))
    assert result.status == "completed", result.reason
    assert math.isfinite(result.final.train_loss)
    assert result.parameters > 1_000_000


def test_resnet18_takes_one_channel_28x28_and_trains_one_batch_on_cpu():
    p = prepared("resnet18", (1, 28, 28), 10)
    net = p.model.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    before = net.fc.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (3, 3)
    assert net(x).shape == (8, 10)
    assert not torch.equal(before, net.fc.weight)


@pytest.mark.parametrize("name", VISION)
def test_imagenet_stem_keeps_torchvision_layout_for_28px(name):
    p = prepared(name, (1, 28, 28), 7, stem="imagenet")
    assert p.model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_frozen_parameters_do_not_change_and_the_rest_does():
    c = config(model="cnn", widths=[8, 16], freeze_blocks=1, epochs=1)
    torch.manual_seed(c.seed)
    start = prepare_model(c.model, c.init, (1, 8, 8), 10).model.state_dict()
    result = train(c)
    end = result.model.state_dict()
    assert torch.equal(start["0.weight"], end["0.weight"])  # first conv: frozen
    assert torch.equal(start["1.weight"], end["1.weight"])  # its BN scale: frozen
    assert not torch.equal(start["4.weight"], end["4.weight"])  # second conv: trains
    assert not torch.equal(start["9.weight"], end["9.weight"])  # head: trains
    total = sum(v.numel() for v in result.model.parameters())
    assert result.trained_parameters == total - 8 * 9 - 2 * 8


def test_backbone_freeze_trains_only_the_head_until_unfrozen():
    c = config(model="mlp", freeze="backbone", unfreeze_after=1, epochs=2)
    result = train(c)
    head = 56 * 10 + 10
    assert result.history[0].trained_parameters == head
    assert result.history[1].trained_parameters == sum(p.numel() for p in result.model.parameters())
    assert set(result.history[0].grad_norms) == {"linear3"}  # frozen layers have no gradient
    assert set(result.history[1].grad_norms) == {"linear1", "linear2", "linear3"}


def test_frozen_backbone_is_unchanged_after_the_first_epoch_only():
    c = config(model="mlp", freeze="backbone", unfreeze_after=1, epochs=2)
    torch.manual_seed(c.seed)
    start = prepare_model(c.model, c.init, (1, 8, 8), 10).model.state_dict()
    one = train(c.replace(epochs=1, **{"model.unfreeze_after": None}))
    assert torch.equal(start["1.weight"], one.model.state_dict()["1.weight"])
    assert not torch.equal(start["5.weight"], one.model.state_dict()["5.weight"])
    two = train(c)
    assert not torch.equal(start["1.weight"], two.model.state_dict()["1.weight"])


def test_freeze_by_prefix_and_errors_name_the_choices():
    p = prepared("resnet18", freeze="conv1,layer1")
    assert "conv1.weight" in p.frozen and "layer1.0.conv1.weight" in p.frozen
    assert "layer2.0.conv1.weight" not in p.frozen and "fc.weight" not in p.frozen
    with pytest.raises(ConfigError, match=r"model.freeze: 'layer9' names no parameter.*layer4"):
        prepared("resnet18", freeze="layer9")
    with pytest.raises(ConfigError, match=r"model.freeze_blocks: resnet18 has 5 blocks.*got 6"):
        prepared("resnet18", freeze_blocks=6)
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        train(config(model="mlp", freeze="1,3,5"))


def test_group_lrs_follow_the_schedule_with_their_multipliers():
    c = config(model="mlp", scheduler="cosine", epochs=3, head_lr_mult=10.0,
               freeze_blocks=1, unfreeze_after=2, unfrozen_lr_mult=0.5)
    result = train(c)
    steps = math.ceil(int(256 * 0.8) / 64)
    schedule = Schedule(c.schedule, epochs=3, steps_per_epoch=steps)
    for m in result.history:
        lr = 0.05 * schedule.factor(m.epoch * steps - 1)
        assert m.lr == pytest.approx(lr)
        assert m.group_lrs["body"] == pytest.approx(lr)
        assert m.group_lrs["head"] == pytest.approx(10 * lr)
        assert m.group_lrs["unfrozen"] == pytest.approx(0.5 * lr)


def test_head_weight_decay_is_its_own_group():
    from trainers._optimizers import build_optimizer

    c = config(model="mlp", weight_decay=1e-4, head_weight_decay=0.0)
    p = prepare_model(c.model, c.init, (1, 8, 8), 10)
    opt = build_optimizer(p.model, c.optimizer, lr=0.1, head=p.head)
    decay = {g["role"]: g["weight_decay"] for g in opt.param_groups if g["params"][0].dim() > 1}
    assert decay == {"body": 1e-4, "head": 0.0}


def test_bn_stats_frozen_keeps_running_statistics():
    frozen = train(config(model="cnn", widths=[8], bn_stats="frozen")).model
    updated = train(config(model="cnn", widths=[8])).model
    assert torch.equal(frozen[1].running_mean, torch.zeros(8))
    assert not torch.equal(updated[1].running_mean, torch.zeros(8))
    layers = train(config(model="cnn", widths=[8, 8], freeze_blocks=1,
                          bn_stats="frozen_layers")).model
    assert torch.equal(layers[1].running_mean, torch.zeros(8))  # in the frozen block
    assert not torch.equal(layers[5].running_mean, torch.zeros(8))  # in a trained block


def test_weights_load_and_a_different_head_is_reinitialized(tmp_path):
    path, source = save_weights(tmp_path, "mlp", classes=5)
    same = train(config(model="mlp", weights=str(path), **{"data.classes": [0, 1, 2, 3, 4]}))
    assert same.notes == (f"loaded 6 tensors from {path}",)
    p = prepared("mlp", classes=10, weights=str(path), init="xavier_uniform")
    assert torch.equal(p.model[1].weight, source[1].weight)
    assert p.model[5].weight.shape == (10, 56)
    assert any("re-initialized head 5 with init xavier_uniform" in n for n in p.notes)


def test_mismatched_weights_give_one_clear_error(tmp_path):
    path, _ = save_weights(tmp_path, "mlp", hidden=[64, 56])
    with pytest.raises(ConfigError) as e:
        prepared("mlp", weights=str(path))
    message = str(e.value)
    assert str(path) in message
    assert "shapes differ (3): 1.weight (file [64, 64], model [128, 64])" in message
    assert "3.weight (file [56, 64], model [56, 128])" in message
    assert "stem" not in message
    path, _ = save_weights(tmp_path, "cnn", widths=[8, 16])
    with pytest.raises(ConfigError,
                       match=r"missing keys \(2\): 3.weight, 3.bias; unexpected keys \(7\): 0.w"):
        prepared("mlp", weights=str(path))
    with pytest.raises(ConfigError, match="no such file"):
        prepared("mlp", weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="not a loadable state dict"):
        prepared("mlp", weights=str(tmp_path / "junk.pt"))


def test_imagenet_rgb_weights_adapt_to_gray_and_the_small_stem_says_why_not(tmp_path):
    path, source = save_weights(tmp_path, "resnet18", (3, 32, 32), 1000, stem="imagenet")
    p = prepared("resnet18", (1, 28, 28), 10, stem="imagenet", weights=str(path))
    assert torch.allclose(p.model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(p.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert any("summed the RGB filters of conv1.weight" in n for n in p.notes)
    assert any("re-initialized head fc" in n and "[1000, 512]" in n for n in p.notes)
    with pytest.raises(ConfigError, match=r"conv1.weight \(file \[64, 3, 7, 7\], model "
                                          r"\[64, 1, 3, 3\]\).*model.stem: imagenet"):
        prepared("resnet18", (1, 28, 28), 10, weights=str(path))


def test_vgg_imagenet_layout_weights_load_with_the_imagenet_stem_only(tmp_path):
    path, source = save_weights(tmp_path, "vgg11_bn", (3, 32, 32), 1000, stem="imagenet")
    p = prepared("vgg11_bn", (1, 28, 28), 10, stem="imagenet", weights=str(path))
    assert torch.equal(p.model.classifier[0].weight, source.classifier[0].weight)
    with pytest.raises(ConfigError, match=r"classifier.0.weight \(file \[4096, 25088\], model "
                                          r"\[4096, 512\]\).*need model.stem: imagenet"):
        prepared("vgg11_bn", (1, 28, 28), 10, weights=str(path))


def test_fine_tuning_knobs_are_flat_config_names():
    c = config_from_dict({"model": "resnet18", "weights": "w.pt", "freeze": "backbone",
                          "freeze_blocks": 2, "unfreeze_after": 3, "bn_stats": "frozen",
                          "head_lr_mult": 30, "head_weight_decay": 0, "stem": "small"})
    assert c.optimizer.head_lr_mult == 30.0 and c.model.freeze_blocks == 2
    with pytest.raises(ConfigError, match="unknown model.bn_stats 'froze'"):
        config_from_dict({"bn_stats": "froze"})
    with pytest.raises(ConfigError, match="optimizer.head_lr_mult: expected a positive"):
        config_from_dict({"head_lr_mult": 0})
    with pytest.raises(ConfigError, match="unknown model 'resnet19'.*Did you mean 'resnet18'"):
        config_from_dict({"model": "resnet19"})
    with pytest.raises(ConfigError, match="model.dropout: resnet18 has no dropout layer"):
        prepared("resnet18", dropout=0.2)
    assert prepared("vgg11_bn", dropout=0.2).model.classifier[2].p == 0.2


def test_merged_validation_keeps_the_subsets_share():
    from trainers import DataConfig, load_data

    data = DataConfig(dataset="synthetic", size=1000, train_subset=100, val_fraction=0.2)
    assert load_data(data).train.x.shape[0] == 100
    assert load_data(data).val.x.shape[0] == 200  # the whole validation split, for choosing
    assert load_data(data, merge_val=True).train.x.shape[0] == 125  # 100 and their 25


def test_python_m_trainers_saves_weights_a_fine_tune_starts_from(tmp_path, capsys):
    from trainers.__main__ import main

    pre = tmp_path / "pre.yaml"
    pre.write_text("dataset: synthetic\nmodel: cnn\nwidths: [8, 16]\nepochs: 1\ndevice: cpu\n"
                   "data: {classes: [0, 1, 2, 3, 4]}\n")
    assert main([str(pre), "--save", str(tmp_path / "w" / "pre.pt")]) == 0
    fine = tmp_path / "fine.yaml"
    fine.write_text(f"dataset: synthetic\nmodel: cnn\nwidths: [8, 16]\nepochs: 1\ndevice: cpu\n"
                    f"data: {{classes: [5, 6, 7, 8, 9]}}\nweights: {tmp_path / 'w' / 'pre.pt'}\n"
                    f"freeze: backbone\n")
    assert main([str(fine)]) == 0
    out = capsys.readouterr().out
    assert f"weights: {tmp_path / 'w' / 'pre.pt'}" in out
    assert "loaded 14 tensors" in out and "re-initialized" not in out  # 5 classes → 5 classes
    (tmp_path / "file").write_text("")
    assert main([str(fine), "--save", str(tmp_path / "file" / "w.pt")]) == 2
    assert main([str(fine), "--save", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("error: --save:") == 2
    assert "training" not in captured.out  # refused before any training


@pytest.mark.slow
def test_fashion_mnist_fine_tune_of_classes_5_to_9_beats_scratch(tmp_path):
    """Pretrained on 5,000 images of classes 0-4, a frozen backbone learns classes 5-9 from 500
    images clearly better than the same network from scratch (seeded, CPU)."""
    net = {"type": "cnn", "widths": [16, 32]}
    common = {"device": "cpu", "init": "kaiming_normal", "optimizer": "nesterov",
              "batch_size": 64, "epochs": 3}
    pre = train({**common, "lr": 0.1, "scheduler": "onecycle", "model": net,
                 "data": {"dataset": "fashion_mnist", "classes": [0, 1, 2, 3, 4],
                          "train_subset": 5000, "val_fraction": 0.05}})
    assert pre.final.val_accuracy >= 0.75
    torch.save(pre.model.state_dict(), tmp_path / "pre.pt")
    target = {"dataset": "fashion_mnist", "classes": [5, 6, 7, 8, 9], "train_subset": 500,
              "val_fraction": 0.05}
    fine = train({**common, "epochs": 6, "lr": 0.02, "data": target, "head_lr_mult": 10.0,
                  "model": {**net, "weights": str(tmp_path / "pre.pt"), "freeze_blocks": 2,
                            "reset_head": True}})
    scratch = train({**common, "epochs": 6, "lr": 0.02, "data": target, "model": net})
    assert fine.history[0].trained_parameters == 32 * 5 + 5  # the head alone
    assert fine.notes[-1] == "re-initialized head 9 with init kaiming_normal (model.reset_head)"
    assert fine.final.val_accuracy >= 0.70  # measured 0.767 (scratch 0.593)
    assert fine.final.val_accuracy > scratch.final.val_accuracy + 0.1


@pytest.mark.parametrize("stop", [1, 3])  # before and after the unfreezing
def test_a_resumed_fine_tune_equals_an_uninterrupted_one(tmp_path, stop):
    from trainers import CheckpointStore, StopTraining

    path, _ = save_weights(tmp_path, "cnn", widths=[8, 16])
    c = config(model="cnn", widths=[8, 16], weights=str(path), freeze_blocks=1,
               unfreeze_after=2, bn_stats="frozen_layers", head_lr_mult=5.0, epochs=4,
               scheduler="cosine")
    whole = train(c)
    store = CheckpointStore(tmp_path / "ckpt")

    def interrupt(m):
        if m.epoch == stop:
            raise StopTraining("interrupted")

    train(c, interrupt, store)
    resumed = train(c, None, store)
    assert resumed.resumed_from_epoch == stop
    assert [m.val_loss for m in resumed.history] == [m.val_loss for m in whole.history]
    assert resumed.history[-1].group_lrs == whole.history[-1].group_lrs
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
