"""Softmax cross-entropy, the L2 penalty and accuracy.

The cost the network minimizes is  J = mean_i CE(p_i, y_i) + lambda * sum_l ||W_l||_F^2,
with the penalty on weight matrices only (not biases, gamma or beta). Loss (the mean
cross-entropy) and cost (loss + penalty) are reported separately.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from klayer.core import kernels

Array = npt.NDArray[np.floating]
Labels = npt.NDArray[np.integer]
# A mixed mini-batch (mixup, cutmix): each row i is w_i parts an example of class y_i and
# 1 - w_i parts one of class y2_i; this is (y2 (n,), w (n,)). Its target is the mixture
# w_i T(y_i) + (1 - w_i) T(y2_i) of the two (smoothed) one-hot targets.
Mix = tuple[Labels, Array]


def log_softmax(scores: Array) -> Array:
    """Log softmax over the classes via log-sum-exp, stable for any finite logits.
    (..., n, K) -> (..., n, K)."""
    z = scores - scores.max(axis=-1, keepdims=True)  # max is 0 per row
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def _nll(logp: Array, y: Labels, label_smoothing: float) -> Array:
    """Per-example (smoothed) negative log-likelihood (..., n) of log-probabilities."""
    nll = -logp[..., np.arange(len(y)), y]  # (..., n)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
    return nll


def cross_entropy(scores: Array, y: Labels, label_smoothing: float = 0.0,
                  mix: Mix | None = None) -> float:
    """Mean cross-entropy of softmax(scores) (n, K) against integer labels y (n,) (and
    a ``mix``, as in ``softmax_cross_entropy``)."""
    return float(softmax_cross_entropy(scores, y, label_smoothing, mix)[0])


def softmax_cross_entropy(
    scores: Array, y: Labels, label_smoothing: float = 0.0, mix: Mix | None = None
) -> tuple[Array, Array]:
    """Mean cross-entropy and its gradient with respect to the scores.

    With P = softmax(scores) and T the (smoothed) one-hot targets, the course's
    G = -(Y - P) / n becomes, for rows, dscores = (P - T) / n.   (..., n, K) -> (..., n, K);
    the loss is a 0-d array for one network, (T,) for a stack. Label smoothing eps uses
    targets (1 - eps) * onehot + eps / K; a ``mix`` (y2, w) the targets w T(y) + (1 - w)
    T(y2), whose cross-entropy is w CE(y) + (1 - w) CE(y2) (linear in the target).
    """
    n, k = scores.shape[-2:]
    logp = log_softmax(scores)  # (..., n, K)
    rows = np.arange(n)
    nll = _nll(logp, y, label_smoothing)  # (..., n)
    dscores = np.exp(logp)  # P
    if label_smoothing:
        dscores -= label_smoothing / k
    if mix is None:
        dscores[..., rows, y] -= 1 - label_smoothing
    else:
        y2, w = mix[0], np.asarray(mix[1], dscores.dtype)  # (n,), (n,)
        nll = w * nll + (1 - w) * _nll(logp, y2, label_smoothing)
        dscores[..., rows, y] -= (1 - label_smoothing) * w
        dscores[..., rows, y2] -= (1 - label_smoothing) * (1 - w)
    dscores /= n
    return nll.mean(axis=-1), dscores


def l2_penalty(weights: Iterable[Array], lam: float) -> float:
    """lambda * sum_l ||W_l||_F^2 (the weight matrices only)."""
    if lam == 0:
        return 0.0
    return lam * float(sum(np.vdot(W, W) for W in weights))


def accuracy(scores: Array, y: Labels) -> float:
    """Fraction of rows whose highest score is the true label."""
    return float(np.mean(scores.argmax(axis=-1) == y))


def training_loss(scores: Array, y: Labels, label_smoothing: float = 0.0,
                  mix: Mix | None = None) -> tuple[Any, Array]:
    """Mean cross-entropy (a float; (T,) for a stack's (T, n, K) scores) and dJ/dscores
    (``softmax_cross_entropy``; in C for float32 hard labels)."""
    if not label_smoothing and mix is None and kernels.enabled(scores):
        if scores.ndim == 3:
            return kernels.softmax_cross_entropy_stack(scores, y)
        return kernels.softmax_cross_entropy(scores, y)
    loss, dscores = softmax_cross_entropy(scores, y, label_smoothing, mix)
    return (float(loss) if loss.ndim == 0 else loss), dscores
