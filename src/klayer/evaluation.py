"""Evaluation: loss, cost and accuracy in large chunks, and PreciseBN's population statistics.

The images stay uint8 in memory; each chunk of EVAL_CHUNK rows is standardized on the
fly, which keeps the peak memory of evaluating 10,000 images at a few tens of MB.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .augment import hflip
from .data import Data
from .layers import Array
from .losses import log_softmax
from .network import Metrics, Network

EVAL_CHUNK = 5000


def batches(data: Data, X: Array, flip: bool = False) -> Iterator[Array]:
    """Standardized (and optionally mirrored) chunks of X, EVAL_CHUNK rows at a time."""
    for i in range(0, len(X), EVAL_CHUNK):
        chunk = data.standardize(X[i : i + EVAL_CHUNK], dtype=np.float32)
        if flip and data.image_shape is not None:
            chunk = hflip(chunk, data.image_shape)
        yield chunk


def evaluate(net: Network, data: Data, X: Array, y: Array, lam: float = 0.0,
             tta_flip: bool = False) -> Metrics:
    """Loss, cost and accuracy in evaluation mode, in chunks; optionally flip-averaged."""
    X_dtype = net.dtype
    total_nll, correct, i = 0.0, 0, 0
    for chunk in batches(data, X):
        logp = log_softmax(net.scores(chunk.astype(X_dtype, copy=False), check=False))
        yc = y[i : i + len(chunk)]
        total_nll -= float(logp[np.arange(len(yc)), yc].sum())
        if tta_flip and data.image_shape is not None:
            flipped = hflip(chunk, data.image_shape).astype(X_dtype, copy=False)
            logp = np.logaddexp(logp, log_softmax(net.scores(flipped, check=False)))
        correct += int((logp.argmax(axis=1) == yc).sum())
        i += len(chunk)
    loss = total_nll / len(y)
    penalty = lam * float(sum(np.vdot(W, W) for W in net.weights()))
    return Metrics(loss, loss + penalty, correct / len(y))


def population_stats(net: Network, data: Data, X: Array, n: int, flip: bool = False) -> None:
    """Set the running statistics to the population mean and biased variance (PreciseBN).

    Runs training-mode forward passes (weights fixed, running averages untouched) over
    the first n rows of X (all when n = 0) in mini-batches of 100, then combines the
    per-batch statistics into those of all samples together.
    """
    X = X[: n or len(X)]
    sink: list[tuple[int, Array, Array]] = []
    sizes = []
    for chunk in batches(data, X, flip=flip):
        for j in range(0, len(chunk) - 1, 100):
            part = chunk[j : j + 100].astype(net.dtype, copy=False)
            net.forward(part, train=True, update_stats=False, stats_sink=sink,
                        rng=np.random.default_rng(0))
            sizes.append(len(part))
    net.set_population_stats(sink, sizes)

