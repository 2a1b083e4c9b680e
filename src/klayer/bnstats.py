"""Batch-norm running statistics: the moving averages and PreciseBN's population statistics.

Two conventions (``NetConfig.bn_convention``):

* ``"assignment"``: mu_av <- alpha mu_av + (1 - alpha) mu, same for the biased batch
  variance, and the averages start from the first mini-batch's statistics.
* ``"pytorch"``: as torch.nn.BatchNorm1d with momentum = 1 - alpha: averages start at
  0 and 1, and the running variance averages the *unbiased* batch variance.

This module is core: NumPy only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .config import NetConfig

Array = npt.NDArray[np.floating]


def update_running(mu_av: Array, var_av: Array, mu: Array, var: Array, n: int,
                   config: NetConfig, first: bool) -> None:
    """In place: mu_av <- alpha mu_av + (1 - alpha) mu (and the same for the variance).

    The assignment's convention starts from the first batch's statistics; PyTorch's
    starts from 0 / 1 and stores the unbiased variance. Any shapes that broadcast
    (one network's (m,) or a stack of trials').
    """
    alpha = config.bn_alpha
    if config.bn_convention == "pytorch":
        var = var * (n / max(n - 1, 1))  # torch stores the unbiased variance
    elif first:  # assignment: start from the first batch
        mu_av[...] = mu
        var_av[...] = var
        return
    mu_av *= alpha
    mu_av += (1 - alpha) * mu
    var_av *= alpha
    var_av += (1 - alpha) * var


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
