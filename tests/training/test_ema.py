"""``--ema``: an exponential moving average of the weights is the trained network."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from klayer.core.config import TrainConfig
from klayer.core.optim import WeightAverage
from klayer.data.datasets import make_synthetic
from klayer.training.batched import check_batchable
from klayer.training.evaluation import population_stats
from klayer.training.trainer import Trainer

CFG = TrainConfig(dataset="synthetic", hidden=(16, 16), n_batch=50, steps=120, eta_max=0.05,
                  schedule="one_cycle", optimizer="nesterov", evals_per_cycle=2,
                  checkpoint_every=0)


def test_the_trained_network_is_the_average_of_the_live_weights() -> None:
    data = make_synthetic(n_train=600, seed=1)
    live = Trainer(CFG, data)  # the same run without the average: the same live weights
    avg = {k: v.astype(np.float64) for k, v in live.net.params.items()}
    f = 0.95**10
    while live.t < live.plan.total_steps:
        live.step()
        if live.t % 10 == 0:  # folded in every 10 steps with decay^10
            for k, a in avg.items():
                avg[k] = f * a + (1 - f) * live.net.params[k]
    res = Trainer(replace(CFG, ema=0.95), data).run()
    for k, a in avg.items():
        np.testing.assert_allclose(res.net.params[k], a, rtol=1e-4, atol=1e-6, err_msg=k)
        if k.startswith("W"):  # (a bias feeding batch norm stays ~0 either way)
            assert not np.allclose(res.net.params[k], live.net.params[k], atol=1e-6), k
    # its batch-norm statistics are the population statistics of the average's own layers
    again = res.net.copy()
    population_stats(again, res.data, res.data.train.X, CFG.precise_examples)
    for k, v in again.stats.items():
        np.testing.assert_array_equal(res.net.stats[k], v, err_msg=k)


def test_weight_average_folds_in_every_tenth_step() -> None:
    p = {"W1": np.ones((2, 2), np.float32)}
    ema = WeightAverage(p, 0.5)
    p["W1"][...] = 3.0
    for t in range(1, 10):
        ema.update(p, t)
    np.testing.assert_array_equal(ema.avg["W1"], 1.0)  # not yet
    ema.update(p, 10)
    np.testing.assert_allclose(ema.avg["W1"], 0.5**10 * 1 + (1 - 0.5**10) * 3, rtol=1e-6)
    before = ema.avg["W1"].copy()
    ema.update(p, 10, last=True)  # folded at 10 already
    np.testing.assert_array_equal(ema.avg["W1"], before)
    p["W1"][...] = 5.0
    ema.update(p, 13, last=True)  # the 3 steps since: decay^3
    np.testing.assert_allclose(ema.avg["W1"], 0.5**3 * before + (1 - 0.5**3) * 5, rtol=1e-6)


def test_bad_ema_values_are_named() -> None:
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="ema"):
            TrainConfig(ema=bad)
    with pytest.raises(ValueError, match="ema"):
        check_batchable([replace(CFG, ema=0.9), replace(CFG, ema=0.9, lam=0.1)])
