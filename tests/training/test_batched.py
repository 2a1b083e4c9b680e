"""Batched trials: T networks trained together equal the same T trained one by one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from klayer.core.config import TrainConfig
from klayer.data.datasets import Data, Split, make_synthetic
from klayer.training.batched import BatchedTrainer, check_batchable, evaluate_trained
from klayer.training.evaluation import evaluate, evaluate_many
from klayer.training.plan import make_plan
from klayer.training.trainer import Trainer

BASE = TrainConfig(dataset="synthetic", hidden=(16, 12), n_batch=50, n_s=30, cycles=1,
                   dtype="float64")
# (lambda, eta_max, seed) of the four trials; the first one's seed orders the mini-batches.
TRIALS = [(0.0, 0.1, 11), (1e-3, 0.05, 12), (1e-2, 0.2, 13), (3e-2, 0.08, 14)]


def image_data() -> Data:
    """uint8 3x8x8 "images", so flips and translations apply."""
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 192), dtype=np.uint8), rng.integers(0, 10, n))

    return Data(split(600), split(100), split(100), num_classes=10, name="img",
                image_shape=(3, 8, 8))


def lone(cfg: TrainConfig, data: Data, order_seed: int) -> Trainer:
    """A lone Trainer fed the mini-batch order (and augmentation) of ``order_seed``,
    trained to the end (with its evaluations)."""
    tr = Trainer(replace(cfg, order_seed=order_seed), data)
    tr.run()
    return tr


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"batch_norm": False, "optimizer": "momentum"},
        {"bn_position": "after", "bn_convention": "pytorch", "optimizer": "nesterov"},
        {"optimizer": "adam", "skip": True, "hidden": (16, 16, 16), "dropout": 0.2},
        {"optimizer": "adamw", "hidden": (), "label_smoothing": 0.1},
        {"schedule": "constant", "cycles": None, "steps": 60, "dataset": "images",
         "flip": True, "translate": 2},
        {"batch_norm": False, "layer_norm": True, "optimizer": "nesterov", "mixup": 0.4},
        {"schedule": "constant", "cycles": None, "steps": 60, "dataset": "images",
         "cutmix": 1.0, "mixup": 0.2, "mix_prob": 0.7, "whiten": "zca", "tta_flip": True,
         "tta_shift": 1},
    ],
    ids=["bn", "no-bn-momentum", "bn-after-nesterov", "adam-skip-dropout", "adamw-linear",
         "constant-augment", "layer-norm-mixup", "zca-cutmix-views"],
)
def test_four_trials_together_equal_four_alone(overrides: dict[str, object]) -> None:
    images = overrides.get("dataset") == "images"
    data = image_data() if images else make_synthetic(n_train=600, seed=0)
    base = replace(BASE, **{k: v for k, v in overrides.items() if k != "dataset"})
    cfgs = [replace(base, lam=lam, eta_max=em, eta=em / 2, seed=s) for lam, em, s in TRIALS]
    plans = [make_plan(c, data.train.n) for c in cfgs]
    bt = BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                        plans[0].total_steps, eval_every=plans[0].eval_every)
    nets = bt.run()
    assert bt.t == plans[0].total_steps > 0 and not bt.diverged
    for i, (cfg, net) in enumerate(zip(cfgs, nets, strict=True)):
        assert net is not None
        alone = lone(cfg, data, order_seed=cfgs[0].seed)
        ref = alone.net
        # the validation curve is the lone run's (which ends with one more evaluation)
        assert bt.curves[i] == [(int(r["step"]), r["val_accuracy"]) for r in alone.rows[:-1]]
        assert net.bn_updates == ref.bn_updates
        for name in ref.params:
            np.testing.assert_allclose(net.params[name], ref.params[name], rtol=0, atol=1e-10,
                                       err_msg=name)
        for name in ref.stats:
            np.testing.assert_allclose(net.stats[name], ref.stats[name], rtol=0, atol=1e-10,
                                       err_msg=name)
    # the trials really differ, and the shared evaluation equals the lone one
    assert not np.allclose(nets[0].params["W1"], nets[1].params["W1"])  # type: ignore[union-attr]
    done = [n for n in nets if n is not None]
    many = evaluate_many(done, data, data.val.X, data.val.y, [c.lam for c in cfgs])
    for net, cfg, m in zip(done, cfgs, many, strict=True):
        one = evaluate(net, data, data.val.X, data.val.y, cfg.lam)
        assert m.accuracy == one.accuracy
        assert m.loss == pytest.approx(one.loss, rel=1e-9)
        assert m.cost == pytest.approx(one.cost, rel=1e-9)


def test_trials_trained_on_whitened_inputs_are_scored_on_them() -> None:
    """A search's batched trials get their final metrics (PreciseBN, accuracies, test-time
    views) from the whitened inputs they trained on, as a lone run's summary does."""
    data = image_data()
    cfgs = [replace(BASE, whiten="zca", bn_stats="precise", precise_examples=200,
                    tta_flip=True, tta_shift=1, lam=lam, eta_max=em, seed=s)
            for lam, em, s in TRIALS[:2]]
    plans = [make_plan(c, data.train.n) for c in cfgs]
    bt = BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                        plans[0].total_steps)
    got = evaluate_trained(bt.run(), cfgs, data)  # the worker's own (unwhitened) Data
    for cfg, metrics in zip(cfgs, got, strict=True):
        res = Trainer(replace(cfg, order_seed=cfgs[0].seed), data).run()
        for key in ("val_accuracy", "test_accuracy", "train_accuracy"):
            assert metrics[key] == res.summary[key], key


def test_a_diverged_trial_leaves_the_others_alone() -> None:
    data = make_synthetic(n_train=600, seed=0)
    base = replace(BASE, batch_norm=False, schedule="constant", cycles=None, steps=40)
    cfgs = [replace(base, eta=e, seed=i) for i, e in enumerate([0.01, 1e6, 0.02])]
    plans = [make_plan(c, data.train.n) for c in cfgs]
    bt = BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                        plans[0].total_steps)
    nets = bt.run()
    assert nets[1] is None and set(bt.diverged) == {1} and "cost became" in bt.diverged[1]
    for i in (0, 2):
        ref = lone(cfgs[i], data, order_seed=cfgs[0].seed).net
        got = nets[i]
        assert got is not None
        for name in ref.params:
            np.testing.assert_allclose(got.params[name], ref.params[name], rtol=0, atol=1e-10)


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov"])
def test_pruned_trials_leave_the_stack_and_the_others_do_not_change(optimizer: str) -> None:
    """``on_eval`` answering True takes a trial out of the stack at that evaluation (its
    curve ends there); the others end as they do with no trial pruned."""
    data = make_synthetic(n_train=600, seed=0)
    cfgs = [replace(BASE, optimizer=optimizer, lam=lam, eta_max=em, seed=s)
            for lam, em, s in TRIALS]
    plans = [make_plan(c, data.train.n) for c in cfgs]
    every = plans[0].eval_every

    def batched(prune: dict[int, int]) -> BatchedTrainer:
        bt = BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                            plans[0].total_steps, eval_every=every,
                            on_eval=lambda i, t, acc: prune.get(i) == t)
        bt.run()
        return bt

    gone = batched(dict.fromkeys(range(4), every))  # all at once: the run ends there
    assert gone.pruned == dict.fromkeys(range(4), every) and gone.t == every
    assert gone.networks() == [None] * 4
    full, pruned = batched({}), batched({1: every, 3: 2 * every})
    assert pruned.pruned == {1: every, 3: 2 * every} and not pruned.diverged
    assert [t for t, _ in pruned.curves[1]] == [0, every]
    assert pruned.curves[3] == full.curves[3][:3]
    nets, ref = pruned.networks(), full.networks()
    assert nets[1] is None and nets[3] is None
    for i in (0, 2):
        assert pruned.curves[i] == full.curves[i]
        for name, value in ref[i].params.items():  # type: ignore[union-attr]
            np.testing.assert_array_equal(nets[i].params[name], value)  # type: ignore[union-attr]


@pytest.mark.parametrize("overrides", [{"optimizer": "sgd"},
                                       {"optimizer": "momentum", "momentum": 0.5, "eta": 2.0}])
def test_a_float32_trial_diverges_at_the_step_it_would_alone(
        overrides: dict[str, object]) -> None:
    """With batch norm the loss stays finite while the weights grow; the cost turns inf
    when the float32 L2 penalty overflows, at the same step batched as alone (whether the
    penalty comes from the fused SGD update or is computed afresh)."""
    from klayer.training.trainer import Diverged

    data = make_synthetic(n_train=600, seed=0)
    cfg = TrainConfig(dataset="synthetic", hidden=(16,), n_batch=50, schedule="constant",
                      cycles=None, steps=80, eta=1.0, lam=1.5, dtype="float32", seed=1)
    cfg = replace(cfg, **overrides)
    tr = Trainer(cfg, data)
    with pytest.raises(Diverged, match="inf at step") as e:
        tr.run()
    plan = make_plan(cfg, data.train.n)
    bt = BatchedTrainer([cfg, replace(cfg, lam=0.0)], data, [plan.lr] * 2,
                        plan.steps_per_epoch, plan.total_steps)
    bt.run()
    step = int(str(e.value).split("at step ")[1].split(":")[0])
    assert set(bt.diverged) == {0} and f"inf at step {step};" in bt.diverged[0]


def test_only_lambda_and_learning_rates_may_differ() -> None:
    check_batchable([BASE, replace(BASE, lam=0.1, eta_min=1e-4, eta_max=0.3, seed=5)])
    with pytest.raises(ValueError, match="n_batch"):
        check_batchable([BASE, replace(BASE, n_batch=25)])
    with pytest.raises(ValueError, match="hidden"):
        check_batchable([BASE, replace(BASE, hidden=(8,))])
    with pytest.raises(ValueError, match="precise_per_epoch"):
        check_batchable([replace(BASE, precise_per_epoch=2)] * 2)
