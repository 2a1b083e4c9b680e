"""Batch-norm running statistics: the moving averages and PreciseBN's population statistics.

Two conventions (``NetConfig.bn_convention``):

* ``"assignment"``: mu_av <- alpha mu_av + (1 - alpha) mu, same for the biased batch
  variance, and the averages start from the first mini-batch's statistics.
* ``"pytorch"``: as torch.nn.BatchNorm1d with momentum = 1 - alpha: averages start at
  0 and 1, and the running variance averages the *unbiased* batch variance.

This module is core: NumPy only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from klayer.core.config import NetConfig

Array = npt.NDArray[np.floating]


class RunningRule(NamedTuple):
    """How one training step moves the running averages (see ``update_running``)."""

    copy: bool  # take the batch's statistics as they are (the assignment's first batch)
    keep: float  # alpha: the weight of the old average
    take: float  # 1 - alpha: the weight of the batch's statistic
    var_scale: float  # n / (n - 1) turns the biased batch variance into torch's unbiased one


def running_rule(config: NetConfig, n: int, first: bool) -> RunningRule:
    """The rule of ``config.bn_convention`` for a batch of n rows (``first``: no update yet).

    The C kernel (``kernels.bn_relu_forward(running=...)``) applies the same rule."""
    alpha = float(config.bn_alpha)
    if config.bn_convention == "pytorch":  # torch stores the unbiased variance
        return RunningRule(False, alpha, 1 - alpha, float(n / max(n - 1, 1)))
    return RunningRule(first, alpha, 1 - alpha, 1.0)  # assignment: start from the first batch


def update_running(mu_av: Array, var_av: Array, mu: Array, var: Array, n: int,
                   config: NetConfig, first: bool) -> None:
    """In place: mu_av <- alpha mu_av + (1 - alpha) mu (and the same for the variance).

    The assignment's convention starts from the first batch's statistics; PyTorch's
    starts from 0 / 1 and stores the unbiased variance. Any shapes that broadcast
    (one network's (m,) or a stack of trials').
    """
    rule = running_rule(config, n, first)
    if rule.copy:
        mu_av[...] = mu
        var_av[...] = var
        return
    if rule.var_scale != 1.0:  # (a product with 1 would change nothing)
        var = var * rule.var_scale
    mu_av *= rule.keep
    mu_av += rule.take * mu
    var_av *= rule.keep
    var_av += rule.take * var


def population_stats(sink: list[tuple[int, Array, Array]], sizes: list[int],
                     convention: str) -> dict[int, tuple[Array, Array]]:
    """The mean and variance of all samples together, per batch-norm layer (PreciseBN).

    ``sink`` holds, batch after batch, each batch-norm layer's (l, mean, biased
    variance), as ``Network.forward(stats_sink=...)`` collects them; ``sizes`` the batch
    sizes. The population variance adds the spread of the batch means to the mean of the
    batch variances:  var = sum_b n_b (var_b + (mu_b - mu)^2) / N  (unbiased for the
    "pytorch" convention). Returns {l: (mu, var)} in float64.
    """
    layers = sorted({l for l, _, _ in sink})
    out: dict[int, tuple[Array, Array]] = {}
    if not layers:
        return out
    n_b = np.repeat(np.asarray(sizes, np.float64), len(layers))[:, None]  # (B * L, 1)
    for l in layers:
        rows = [i for i, (j, _, _) in enumerate(sink) if j == l]
        mus = np.array([sink[i][1] for i in rows], np.float64)  # (B, m)
        vars_ = np.array([sink[i][2] for i in rows], np.float64)  # (B, m)
        w = n_b[: len(rows)]
        total = w.sum()
        mu = (w * mus).sum(axis=0) / total
        var = (w * (vars_ + (mus - mu) ** 2)).sum(axis=0) / total
        if convention == "pytorch":
            var *= total / max(total - 1, 1)
        out[l] = (mu, var)
    return out
