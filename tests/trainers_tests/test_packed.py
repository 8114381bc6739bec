"""Packed trials: every member trains as it would alone, to float rounding, on these short
synthetic runs whose lrs stay below chaos.

That is the claim tested here, and no more: a packed member sums its matrix products in another
order than its run alone, and a chaotic trajectory (a high lr, Adam over many steps, a run on
the edge of diverging) carries that last-bit difference far, so on real data a few trials end
otherwise packed than alone (diverged against completed, or another final loss).
benchmarks/packing.py measures how many on the shipped FashionMNIST space.
"""

from __future__ import annotations

import pytest
import torch

from trainers import (
    INITS,
    LR_SCHEDULES,
    OPTIMIZERS,
    CheckpointStore,
    ConfigError,
    Pack,
    StopTraining,
    config_from_dict,
    network_key,
    pack_key,
    pack_refusal,
    train,
)
from trainers._packed_optim import KINDS, Hypers, member_update

# 512 examples: 409 to train on (a short last batch for every batch size), 103 to validate.
BASE = {"dataset": "synthetic", "data.size": 512, "hidden": [32, 16], "epochs": 3,
        "batch_size": 64, "lr": 0.02, "optimizer": "sgd", "device": "cpu"}
PACKED_OPTIMIZERS = OPTIMIZERS.names()  # every built-in one
# Lower Adam lrs: a high one makes the trajectory chaotic, and float rounding then grows.
ADAM_LR = 0.003


def _cfg(**changes):
    return config_from_dict({**BASE, **changes})


def _same(packed, alone):
    assert packed.status == alone.status, (packed.reason, alone.reason)
    assert packed.epochs_run == alone.epochs_run
    for p, a in zip(packed.history, alone.history, strict=True):
        assert p.epoch == a.epoch
        assert p.train_loss == pytest.approx(a.train_loss, rel=2e-4, abs=1e-5)
        assert p.val_loss == pytest.approx(a.val_loss, rel=2e-4, abs=1e-5)
        assert abs(p.val_accuracy - a.val_accuracy) <= 1.5 / 103  # an example may flip
        assert p.lr == pytest.approx(a.lr, rel=1e-12)
        # None for the optimizers without momentum (RMSprop, Adagrad, Adadelta).
        assert p.momentum == (a.momentum if a.momentum is None
                              else pytest.approx(a.momentum, rel=1e-12))
        assert p.group_lrs == pytest.approx(a.group_lrs, rel=1e-12)
        assert p.grad_norms.keys() == a.grad_norms.keys()
        assert list(p.grad_norms.values()) == pytest.approx(list(a.grad_norms.values()),
                                                            rel=2e-3)
        assert p.trained_parameters == a.trained_parameters


def _run(pack):
    """Train a pack to the end; {member id: outcome}."""
    out = {}
    while len(pack):
        out.update(dict(pack.run_until_free()))
    return out


def _packed(configs, capacity=None, on_epoch=None, spread=32):
    # spread 32: one band from 32 to 1024, so batch sizes share micro-batches and accumulate.
    pack = Pack(capacity or len(configs), spread=spread)
    ids = [pack.add(c, on_epoch=on_epoch) for c in configs]
    out = _run(pack)
    return [out[i] for i in ids]


def _check_alone(configs, **kwargs):
    for packed, config in zip(_packed(configs, **kwargs), configs, strict=True):
        _same(packed, train(config))


# Per optimizer, an lr where it learns without chaos (Adadelta's steps are of order lr itself).
OPTIMIZER_LR = {"adam": ADAM_LR, "amsgrad": ADAM_LR, "adamw": ADAM_LR, "rmsprop": ADAM_LR,
                "adagrad": 0.02, "adadelta": 1.0}


@pytest.mark.parametrize("optimizer", PACKED_OPTIMIZERS)
def test_each_optimizer_trains_as_alone(optimizer):
    lr = OPTIMIZER_LR.get(optimizer, 0.02)
    _check_alone([_cfg(optimizer=optimizer, lr=lr, weight_decay=5e-2, scheduler="cosine"),
                  _cfg(optimizer=optimizer, lr=lr / 2, batch_size=128, beta2=0.99,
                       momentum=0.8, init="xavier_uniform", eps=1e-6, scheduler="onecycle",
                       **{"optimizer.alpha": 0.9, "optimizer.rho": 0.95})])


@pytest.mark.parametrize("schedule", LR_SCHEDULES.names())
def test_each_schedule_trains_as_alone(schedule):
    _check_alone([_cfg(scheduler=schedule, warmup_epochs=1, epochs=4),
                  _cfg(scheduler=schedule, optimizer="adam", lr=ADAM_LR, batch_size=32,
                       epochs=3)])


@pytest.mark.parametrize("init", INITS.names())
def test_each_init_trains_as_alone(init):
    _check_alone([_cfg(init=init, epochs=2), _cfg(init=init, epochs=2, seed=3, lr=0.05)])


def test_a_mix_of_batch_sizes_trains_as_alone():
    # 32 … 1024 in one pack (1024 is more than the 409 examples: one short batch an epoch).
    configs = [_cfg(batch_size=2 ** p, optimizer=opt, lr=lr, epochs=2)
               for p, (opt, lr) in zip(range(5, 11), [("sgd", 0.02), ("adamw", ADAM_LR),
                                                      ("nesterov", 0.05), ("adam", ADAM_LR),
                                                      ("sgd", 0.2), ("amsgrad", 0.01)],
                                                 strict=True)]
    _check_alone(configs)
    _check_alone(configs, spread=1)  # one band per batch size
    _check_alone(configs, spread=4)  # 32-128, 256-1024


def test_members_of_other_layers_activations_and_clipping_train_as_alone():
    _check_alone([_cfg(hidden=[24], activation="tanh", norm="layernorm", max_grad_norm=0.5,
                       epochs=2),
                  _cfg(hidden=[24], activation="tanh", norm="layernorm", optimizer="adamw",
                       lr=ADAM_LR, epochs=2, **{"optimizer.decay_all": True}, weight_decay=0.1)])


def test_members_of_other_networks_train_as_alone():
    # A space searching the hidden layers: one stack per network (and band), in one pack.
    _check_alone([_cfg(hidden=[32, 16], epochs=2),
                  _cfg(hidden=[24], optimizer="adam", lr=ADAM_LR, epochs=2),
                  _cfg(hidden=[32, 16], batch_size=128, epochs=2, scheduler="onecycle"),
                  _cfg(hidden=[24], activation="tanh", norm="layernorm", epochs=3),
                  _cfg(hidden=[8, 8, 8], optimizer="rmsprop", lr=ADAM_LR, epochs=1)])


def test_a_network_that_leaves_the_pack_and_comes_back_trains_as_alone():
    first, other, again = _cfg(hidden=[24], epochs=1), _cfg(epochs=3), _cfg(hidden=[24], seed=2)
    pack = Pack(2)
    ids = [pack.add(first), pack.add(other)]
    out = dict(pack.run_until_free())
    assert list(out) == [ids[0]]
    ids.append(pack.add(again))  # its network's plan was dropped with the last member
    out |= _run(pack)
    for i, config in zip(ids, (first, other, again), strict=True):
        _same(out[i], train(config))


def test_members_with_dropout_train_as_alone():
    # Each member draws its masks from its own generator, in the state the global RNG has
    # after its init, at its step's whole batch: the same masks as alone, also where a larger
    # batch accumulates micro-batches, and where rates differ within one stack.
    _check_alone([_cfg(dropout=0.2), _cfg(dropout=0.2, batch_size=128, optimizer="adam",
                                          lr=ADAM_LR),
                  _cfg(dropout=0.5, batch_size=32, seed=3),
                  _cfg(dropout=0.2, batch_size=256, hidden=[24], norm="layernorm")])


def test_a_member_with_dropout_resumes_as_if_never_interrupted(tmp_path):
    # The checkpoint holds its generator's state, as `train`'s holds the global RNG's.
    config = _cfg(dropout=0.3, epochs=3)
    full = train(config)
    store = CheckpointStore(tmp_path / "c")
    pack = Pack(2)
    pack.add(config, on_epoch=lambda m: _stop_at(m, 1), checkpoint=store)
    pack.add(_cfg(dropout=0.3, epochs=3, seed=5))
    _run(pack)
    resumed = train(config, None, store)
    assert resumed.resumed_from_epoch == 1
    _same(resumed, full)
    pack = Pack(1)
    store2 = CheckpointStore(tmp_path / "d")
    train(config, lambda m: _stop_at(m, 2), store2)
    member = pack.add(config, checkpoint=store2)
    _same(_run(pack)[member], full)


def test_members_reading_different_batches_train_as_alone():
    # Six seeds: six data orders, past the wide first layer's limit (a batched matmul then).
    _check_alone([_cfg(seed=s, epochs=2, batch_size=32 * (1 + s % 2)) for s in range(6)])


def test_a_member_added_mid_run_trains_as_alone():
    short, long_, late = _cfg(epochs=1), _cfg(epochs=3, optimizer="adam", lr=ADAM_LR), \
        _cfg(epochs=2, batch_size=128, scheduler="onecycle")
    pack = Pack(2)
    ids = [pack.add(short), pack.add(long_)]
    first = pack.run_until_free()
    assert [i for i, _ in first] == [ids[0]] and len(pack) == 1
    ids.append(pack.add(late))  # joins at epoch 0 while the other is at epoch 1
    out = dict(first) | _run(pack)
    for i, config in zip(ids, (short, long_, late), strict=True):
        _same(out[i], train(config))


def test_bands_take_turns_by_fair_share_so_a_cheap_band_ends_first():
    """Two bands, one 32 times the other's batch size: the large batches' epochs are cheap, so
    that member trains several while the small batches' trains one, and ends first (its slot
    frees at its own pace, not the slowest band's), each still as it would alone."""
    data = {"data.size": 2048}
    slow, fast = _cfg(batch_size=16, epochs=4, **data), _cfg(batch_size=512, epochs=4, **data)
    pack = Pack(2)
    slow_epochs = []
    ids = [pack.add(slow, on_epoch=lambda m: slow_epochs.append(m.epoch)), pack.add(fast)]
    first = pack.run_until_free()
    assert [i for i, _ in first] == [ids[1]]
    assert len(slow_epochs) <= 2  # in lockstep it would have trained all 4 by now
    out = dict(first) | _run(pack)
    for i, config in zip(ids, (slow, fast), strict=True):
        _same(out[i], train(config))


def test_trials_that_replace_ended_ones_do_not_starve_a_cheap_band():
    """A slot of small batches refilled after each of its one-epoch trials ends: a new trial
    joins at the charge of the one it replaces, so the large batches' member, charged less,
    trains before it (joining at the least charge, with ties to small batches, it never would)."""
    data = {"data.size": 2048}
    fast = _cfg(batch_size=512, epochs=4, **data)
    pack = Pack(2)
    fast_id = pack.add(fast)
    pack.add(_cfg(batch_size=16, epochs=1, **data))
    refills = 0
    while refills < 8:
        ended = dict(pack.run_until_free())
        if fast_id in ended:
            break
        refills += 1
        pack.add(_cfg(batch_size=16, epochs=1, seed=refills, **data))
    assert fast_id in ended and refills <= 3, refills
    _same(ended[fast_id], train(fast))


def test_a_stopped_member_ends_alone_and_the_others_go_on():
    def stop_second(m):
        if m.epoch == 2:
            raise StopTraining("pruned at epoch 2")

    pack = Pack(2)
    stopped = pack.add(_cfg(epochs=4), on_epoch=stop_second)
    other = pack.add(_cfg(epochs=4, lr=0.05))
    first = dict(pack.run_until_free())
    assert list(first) == [stopped] and first[stopped].status == "stopped"
    assert first[stopped].reason == "pruned at epoch 2"
    _same(first[stopped], train(_cfg(epochs=4), stop_second))
    _same(_run(pack)[other], train(_cfg(epochs=4, lr=0.05)))


def test_another_exception_from_on_epoch_is_handed_back_for_that_member():
    def fail(m):
        raise KeyboardInterrupt("stop requested")

    pack = Pack(2)
    failing = pack.add(_cfg(epochs=2), on_epoch=fail)
    pack.add(_cfg(epochs=2, lr=0.05))
    first = dict(pack.run_until_free())
    assert list(first) == [failing] and isinstance(first[failing], KeyboardInterrupt)
    assert len(pack) == 1


def test_a_diverging_member_ends_alone():
    wild, calm = _cfg(lr=1e3, scheduler="constant"), _cfg()
    pack = Pack(2)
    ids = [pack.add(wild), pack.add(calm)]
    out = _run(pack)
    alone = train(wild)
    assert out[ids[0]].status == alone.status == "diverged"
    assert out[ids[0]].reason.split(" at ")[-1] == alone.reason.split(" at ")[-1]
    _same(out[ids[0]], alone)
    _same(out[ids[1]], train(calm))


def test_resuming_a_packed_member_equals_an_uninterrupted_run(tmp_path):
    config = _cfg(optimizer="adam", lr=ADAM_LR, scheduler="onecycle", epochs=4)
    sgd = _cfg(optimizer="nesterov", scheduler="onecycle", epochs=4, momentum=0.9)
    full = [train(config), train(sgd)]

    def interrupt(m):
        if m.epoch == 2:
            raise StopTraining("interrupted")

    stores = [CheckpointStore(tmp_path / "a"), CheckpointStore(tmp_path / "b")]
    pack = Pack(2)
    for c, store in zip((config, sgd), stores, strict=True):
        pack.add(c, on_epoch=interrupt, checkpoint=store)
    assert all(r.epochs_run == 2 for r in _run(pack).values())
    # Resumed packed, and alone from a packed checkpoint: both as if never interrupted.
    pack = Pack(1)
    member = pack.add(config, checkpoint=stores[0])
    resumed = _run(pack)[member]
    assert resumed.resumed_from_epoch == 2
    _same(resumed, full[0])
    alone = train(sgd, None, stores[1])
    assert alone.resumed_from_epoch == 2
    _same(alone, full[1])


def test_a_checkpoint_written_alone_resumes_packed(tmp_path):
    config = _cfg(optimizer="amsgrad", lr=ADAM_LR, epochs=3, weight_decay=1e-3)
    store = CheckpointStore(tmp_path / "ckpt")
    train(config.replace(epochs=3), lambda m: _stop_at(m, 1), store)
    pack = Pack(1)
    member = pack.add(config, checkpoint=store)
    _same(_run(pack)[member], train(config))


@pytest.mark.parametrize("optimizer", ["rmsprop", "adagrad", "adadelta"])
def test_the_squared_gradient_optimizers_resume_packed_or_alone(optimizer, tmp_path):
    # Their running averages (square_avg, sum, acc_delta) and step count go through the
    # checkpoint in torch.optim's own keys, so either side resumes the other's.
    config = _cfg(optimizer=optimizer, lr=OPTIMIZER_LR[optimizer], epochs=3, weight_decay=1e-3)
    full = train(config)
    packed_store, alone_store = CheckpointStore(tmp_path / "p"), CheckpointStore(tmp_path / "a")
    pack = Pack(1)
    pack.add(config, on_epoch=lambda m: _stop_at(m, 2), checkpoint=packed_store)
    _run(pack)
    alone = train(config, None, packed_store)
    assert alone.resumed_from_epoch == 2
    _same(alone, full)
    train(config, lambda m: _stop_at(m, 1), alone_store)
    pack = Pack(1)
    member = pack.add(config, checkpoint=alone_store)
    resumed = _run(pack)[member]
    assert resumed.resumed_from_epoch == 1
    _same(resumed, full)


def test_an_optimizer_outside_the_packed_family_runs_alone(monkeypatch):
    # Every built-in optimizer packs; one without a packed rule (here NAdam) is refused by name.
    from trainers._optimizers import OptimInfo

    monkeypatch.setitem(OPTIMIZERS._entries, "nadam",
                        OptimInfo("nadam", torch.optim.NAdam, lambda c: {"eps": c.eps}))
    config = _cfg(optimizer="nadam", lr=ADAM_LR)
    assert pack_refusal(config) == "optimizer 'nadam': its update rule has no packed form"
    with pytest.raises(ConfigError, match="nadam"):
        Pack(2).add(config)


def _stop_at(m, epoch):
    if m.epoch == epoch:
        raise StopTraining("interrupted")


@pytest.mark.parametrize(("changes", "says"), [
    ({"norm": "batchnorm"}, "batchnorm"),
    ({"model": "cnn"}, "cnn"),
    ({"data.augment": ["flip"]}, "augment"),
    ({"freeze": "backbone"}, "fine-tuning"),
])
def test_what_cannot_be_packed_is_refused_by_name(changes, says):
    config = _cfg(**changes)
    assert says in pack_refusal(config)
    with pytest.raises(ConfigError, match=says):
        Pack(2).add(config)


def test_dropout_on_cuda_is_refused_by_name(monkeypatch):
    # Packed masks are drawn as the CPU's dropout draws them; CUDA's fused kernel draws
    # otherwise, so there a member would not train as alone.
    import trainers._packed as packed

    monkeypatch.setattr(packed, "resolve_device", lambda name: torch.device("cuda"))
    assert "model.dropout 0.1 on cuda" in pack_refusal(_cfg(dropout=0.1))
    assert pack_refusal(_cfg()) is None


def test_a_pack_takes_only_its_own_data_and_device():
    pack = Pack(3)
    pack.add(_cfg(batch_size=64))
    assert pack_key(_cfg(lr=0.5, optimizer="adam", seed=4, hidden=[8])) == pack_key(_cfg())
    # A dropout rate is a member's own: rates share a stack, no dropout is another network.
    assert network_key(_cfg(dropout=0.1)) == network_key(_cfg(dropout=0.4))
    assert network_key(_cfg(dropout=0.1)) != network_key(_cfg())
    assert not pack.fits(_cfg(**{"data.val_fraction": 0.3}))  # other data
    assert not pack.fits(_cfg(threads=1))  # other CPU settings
    assert pack.fits(_cfg(batch_size=96))  # a band of its own
    assert pack.fits(_cfg(hidden=[16]))  # another network: a stack of its own
    pack.add(_cfg(batch_size=32))
    pack.add(_cfg(hidden=[16], activation="tanh"))
    assert not pack.fits(_cfg())  # full
    with pytest.raises(ConfigError, match="cannot take"):
        pack.add(_cfg())


def test_a_packed_epoch_makes_no_tensor_from_host_values_per_step():
    # On a GPU each tensor built from Python values is a host-to-device copy that waits for the
    # queued kernels: one per member and step (Adam's step count, grad-norm indices, the loss
    # checks' index) kept the GPU idle between steps. They are built once per epoch now.
    from torch.profiler import ProfilerActivity, profile

    configs = [_cfg(optimizer=opt, lr=lr, batch_size=b, epochs=1, **{"data.size": 2048})
               for opt, lr, b in [("adam", ADAM_LR, 32), ("adamw", ADAM_LR, 64),
                                  ("amsgrad", ADAM_LR, 32), ("sgd", 0.02, 64),
                                  ("nesterov", 0.02, 32), ("rmsprop", ADAM_LR, 64)]]
    pack = Pack(len(configs), spread=2)
    for c in configs:
        pack.add(c)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ended = pack.run_until_free()
    assert len(ended) == len(configs)
    counts = {e.key: e.count for e in prof.key_averages()}
    adam_steps = counts["aten::_fused_adam_"] + counts["aten::_fused_adamw_"]
    assert adam_steps >= 120, counts  # 52, 26 and 52 steps of the 1,638 examples
    assert counts.get("aten::lift_fresh", 0) <= 6, counts


@pytest.mark.parametrize("kind", KINDS)
def test_member_updates_match_torch_optim(kind):
    torch.manual_seed(0)
    name = {"sgd": "SGD", "nesterov": "SGD", "adam": "Adam", "adam_ams": "Adam",
            "adamw": "AdamW", "adamw_ams": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad",
            "adadelta": "Adadelta"}[kind]
    lrs, moms, decays, epss, wds = [0.1, 0.01, 0.003], [0.9, 0.0, 0.5], [0.999, 0.9, 0.99], \
        [1e-8, 1e-6, 1e-3], [0.0, 1e-2, 0.1]
    shapes = [(5, 4), (5,)]
    stacked = [torch.randn(3, *s) for s in shapes]
    first, second, peak = ([torch.zeros_like(p) for p in stacked] for _ in range(3))
    own = [[p[k].clone().requires_grad_() for p in stacked] for k in range(3)]
    opts = []
    for k in range(3):
        extra = {
            "SGD": {"momentum": moms[k], "nesterov": kind == "nesterov" and moms[k] > 0},
            "RMSprop": {"alpha": decays[k], "eps": epss[k]},
            "Adagrad": {"eps": epss[k]},
            "Adadelta": {"rho": decays[k], "eps": epss[k]},
        }.get(name, {"betas": (moms[k], decays[k]), "eps": epss[k],
                     "amsgrad": kind.endswith("_ams")})
        opts.append(getattr(torch.optim, name)(own[k], lr=lrs[k], weight_decay=wds[k], **extra))
    for step in range(1, 6):
        grads = [torch.randn(3, *s) for s in shapes]
        for k in range(3):
            for p, g in zip(own[k], grads, strict=True):
                p.grad = g[k].clone()
            opts[k].step()
            member_update(kind, [(wds[k], [0, 1])], [p[k] for p in stacked],
                          [g[k] for g in grads], [t[k] for t in first],
                          [t[k] for t in second], [t[k] for t in peak],
                          Hypers(lr=lrs[k], momentum=moms[k], decay=decays[k], eps=epss[k],
                                 step=torch.tensor(float(step))))
    for k in range(3):
        for p, q in zip(own[k], stacked, strict=True):
            # Parameters of order 1 after five steps: a few float32 ulps apart at most.
            torch.testing.assert_close(q[k], p.detach(), rtol=1e-5, atol=1e-5)
