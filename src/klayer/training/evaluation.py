"""Evaluation: loss, cost and accuracy in large chunks, and PreciseBN's population statistics.

The images stay uint8 in memory and are read EVAL_CHUNK rows at a time: a float32 chunk
of 1,000 CIFAR-10 rows is 12 MB, small enough to stay in cache between its conversion
and the first layer's product (5,000 rows, 61 MB, made a full evaluation 1.7x slower).
``evaluate`` does not standardize the chunks: it folds the standardization (and any
whitening; not for test-time views of whitened inputs) into a copy of the first layer
(``folded``), which spares two passes over every chunk (a fifth to a
quarter of an evaluation's time; evaluations take about a third of a default
``klayer train``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from klayer.core import kernels
from klayer.core.layers import Array
from klayer.core.losses import log_softmax
from klayer.core.network import EVAL_CHUNK, Metrics, Network
from klayer.core.stack import Stack
from klayer.data.augment import hflip, shift, tta_views
from klayer.data.datasets import Data

FOLD_MAX_RATIO = 1e3  # largest |mean| / std of a feature that ``folded`` takes


def batches(data: Data, X: Array, flip: bool = False) -> Iterator[Array]:
    """Standardized (and optionally mirrored) chunks of X, EVAL_CHUNK rows at a time."""
    for chunk in data.chunks(X, np.float32, EVAL_CHUNK):
        yield hflip(chunk, data.image_shape) if flip and data.image_shape is not None else chunk


def folded(net: Network, data: Data) -> Network | None:
    """A copy of ``net`` that takes raw rows: data's standardization folded into layer 1.

    s_1 = ((x - mean) / std) W_1 + b_1 = x (W_1 / std) + (b_1 - (mean / std) W_1),
    with std dividing W_1's rows (d, m_1); computed in float64. Whitened data fold the
    whitening matrix P (d, d) in first: W_1 is replaced by P W_1, computed in the net's
    dtype (for float32, the rounding of the training rows' own whitening) by
    ``kernels.matmul_blocks`` (on klayer's products: a BLAS call here would leave
    OpenBLAS's threads spinning on the cores the evaluation's products then need),
    then taken to float64: both terms use the same P W_1, so they cancel as before.
    Only the first linear map reads the input (skip connections start at hidden
    layers), so the copy's scores equal net's on standardized rows, to rounding. None
    when some feature's |mean| / std exceeds FOLD_MAX_RATIO (say, a constant non-zero
    pixel): x (W_1 / std) and (mean / std) W_1 would then cancel, and float32 would
    lose the difference.
    """
    mean, std = np.asarray(data.mean, np.float64), np.asarray(data.std, np.float64)
    if np.max(np.abs(mean) / std, initial=0.0) > FOLD_MAX_RATIO:
        return None
    out = net.copy()
    W1 = net.params["W1"]  # (d, m_1)
    if data.whiten.size:
        P = data.whitening(W1.dtype)  # (d, d)
        W1 = kernels.matmul_blocks(P, W1)  # (d, d) @ (d, m_1)
    W1 = W1.astype(np.float64)
    out.params["W1"][...] = W1 / std[:, None]
    out.params["b1"][...] = net.params["b1"] - (mean / std) @ W1
    return out


def raw_chunks(X: Array, dtype: np.dtype) -> Iterator[Array]:
    """Chunks of EVAL_CHUNK rows of X, as ``dtype`` and not standardized."""
    for i in range(0, len(X), EVAL_CHUNK):
        yield np.asarray(X[i : i + EVAL_CHUNK], dtype=dtype)


def model_inputs(nets: Sequence[Network], data: Data, X: Array, dtype: npt.DTypeLike,
                 fold: bool = True) -> tuple[list[Network], Iterator[Array], Array | None]:
    """What to evaluate, and on what: the networks ``folded`` with raw chunks of X when
    all of them fold (and ``fold``), else the networks themselves with standardized
    chunks; and the input value that stands for "no signal" there (the raw mean; None:
    zero)."""
    fold = fold and data.kept_rows(X, dtype) is None  # kept whitened rows: read those
    folds = [f for f in (folded(net, data) for net in nets) if f is not None] if fold else []
    if len(folds) == len(nets):
        return folds, raw_chunks(X, np.dtype(dtype)), data.mean.astype(dtype)
    return list(nets), (c.astype(dtype, copy=False) for c in batches(data, X)), None


def evaluate(net: Network, data: Data, X: Array, y: Array, lam: float = 0.0,
             tta_flip: bool = False, tta_shift: int = 0) -> Metrics:
    """Loss, cost and accuracy in evaluation mode, in chunks; optionally averaged over
    test-time views (``augment.tta_views``)."""
    return evaluate_many([net], data, X, y, [lam], tta_flip, tta_shift)[0]


def evaluate_many(nets: Sequence[Network], data: Data, X: Array, y: Array,
                  lams: Sequence[float] | None = None, tta_flip: bool = False,
                  tta_shift: int = 0) -> list[Metrics]:
    """Evaluation-mode loss, cost and accuracy of same-shaped networks on (X, y).

    Every chunk of X goes in raw (the standardization folded into each first layer when
    it can) through one network, or through several at once as a ``Stack`` (all first
    layers in one wide product). ``tta_flip`` and ``tta_shift`` average the probabilities
    of each image's test-time views: mirrored, and shifted diagonally by ``tta_shift``
    pixels (the accuracy; the loss stays single-view). Views of whitened inputs are made
    after the whitening, as training augments them (whitening a shifted image is not
    shifting a whitened one: a 1-pixel diagonal shift made before ZCA cost a trained net
    8 to 11 points).
    """
    shape = data.image_shape
    views = tta_views(tta_flip, tta_shift)[1:] if shape is not None else []
    fold = not (views and data.whiten.size)
    models, chunks, fill = model_inputs(nets, data, X, nets[0].dtype, fold)
    model = models[0] if len(models) == 1 else Stack(models)
    nll = np.zeros(len(nets))
    correct = np.zeros(len(nets), np.int64)
    i = 0
    for chunk in chunks:
        yc = y[i : i + len(chunk)]
        logp = log_softmax(model.forward(chunk, train=False)[0])  # (..., n, K)
        nll -= logp[..., np.arange(len(yc)), yc].sum(axis=-1)
        for mirrored, dy, dx in views:
            assert shape is not None
            v = hflip(chunk, shape) if mirrored else chunk
            if dy or dx:  # (the plain mirror image needs no shifted copy)
                v = shift(v, shape, dy, dx, fill)
            logp = np.logaddexp(logp, log_softmax(model.forward(v, train=False)[0]))
        correct += (logp.argmax(axis=-1) == yc).sum(axis=-1)
        i += len(chunk)
    lam = np.zeros(len(nets)) if lams is None else np.asarray(lams, np.float64)
    out = []
    for j, net in enumerate(nets):
        loss = float(nll[j]) / len(y)
        penalty = float(lam[j]) * float(sum(np.vdot(W, W) for W in net.weights()))
        out.append(Metrics(loss, loss + penalty, int(correct[j]) / len(y)))
    return out


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

