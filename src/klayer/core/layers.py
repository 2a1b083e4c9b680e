"""Forward/backward pairs for the layers of a k-layer network.

Rows are examples: an input batch X is (n, d) and a weight matrix is (d_in, d_out).
The course writes the same maths for column vectors, s = W x + b with W (d_out, d_in);
ours is its transpose, s = x W + b, so W_here = W_course.T and every gradient
formula transposes the same way (dW_here = x^T ds instead of ds x^T).

Each ``*_forward`` returns its output and a small cache; the matching
``*_backward`` takes the upstream gradient and that cache (CS231n's layer pairs).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating]


# --- linear -----------------------------------------------------------------


def linear_forward(x: Array, W: Array, b: Array | None) -> Array:
    """s = x W + b.  x (n, d_in), W (d_in, d_out), b (d_out,) -> s (n, d_out).

    b = None leaves "+ b" to the caller (a fused batch-norm kernel adds it)."""
    s = x @ W  # (n, d_out)
    if b is not None:
        s += b
    return s


def linear_backward(
    ds: Array, x: Array, W: Array, need_dx: bool = True, db: Array | None = None
) -> tuple[Array | None, Array, Array]:
    """Gradients of s = x W + b given ds = dJ/ds (n, d_out).

    Returns dx (n, d_in) (None when ``need_dx`` is false: the first layer's input
    needs no gradient), dW = x^T ds (d_in, d_out) and db = sum_i ds_i (d_out,),
    unless the caller has db already (a fused batch-norm kernel sums it).
    """
    dW = x.T @ ds  # (d_in, d_out)
    db = ds.sum(axis=0) if db is None else db  # (d_out,)
    dx = ds @ W.T if need_dx else None  # (n, d_in)
    return dx, dW, db


# --- ReLU -------------------------------------------------------------------


def relu_forward(s: Array) -> Array:
    """h = max(s, 0), elementwise (n, m)."""
    return np.maximum(s, 0)


def relu_backward(dh: Array, h: Array) -> Array:
    """dJ/ds = dJ/dh * 1[s > 0]; the mask is read from the output h = max(s, 0)."""
    ds: Array = dh * (h > 0)
    return ds


# --- batch normalization ----------------------------------------------------


class BNCache(NamedTuple):
    """What the batch-norm backward pass needs."""

    x_hat: Array  # (n, m) normalized input, (s - mu) / sqrt(var + eps)
    inv_std: Array  # (m,)   1 / sqrt(var + eps)


def batchnorm_forward_train(
    s: Array, gamma: Array, beta: Array, eps: float
) -> tuple[Array, BNCache, Array, Array]:
    """Normalize with the batch mean and the *biased* batch variance.

    s (n, m) -> y = gamma * x_hat + beta (n, m), with
    x_hat = (s - mu) / sqrt(var + eps), mu = mean_i s_i, var = mean_i (s_i - mu)^2.
    Also returns (mu, var) so the caller can update running averages.
    """
    mu = s.mean(axis=0)  # (m,)
    xc = s - mu  # (n, m)
    var = np.einsum("ij,ij->j", xc, xc) / s.shape[0]  # (m,) biased variance
    inv_std = 1.0 / np.sqrt(var + eps)  # (m,)
    x_hat = xc
    x_hat *= inv_std  # (n, m), in place: xc is not needed again
    y = x_hat * gamma
    y += beta
    return y, BNCache(x_hat, inv_std), mu, var


def batchnorm_forward_eval(
    s: Array, gamma: Array, beta: Array, mu: Array, var: Array, eps: float
) -> Array:
    """Normalize with fixed (running or population) statistics: an affine map per feature."""
    scale = gamma / np.sqrt(var + eps)  # (m,)
    y = s * scale
    y += beta - mu * scale
    return y


def batchnorm_backward(dy: Array, cache: BNCache, gamma: Array) -> tuple[Array, Array, Array]:
    """Backward pass of training-mode batch norm in its compact form.

    With g = dJ/dx_hat = dy * gamma, the course's chain of terms through mu and var
    collapses to (per feature, n examples):

        ds = inv_std / n * (n g - sum_i g_i - x_hat * sum_i g_i x_hat_i)

    dgamma = sum_i dy_i x_hat_i, dbeta = sum_i dy_i.   dy (n, m) -> ds (n, m).
    """
    x_hat, inv_std = cache
    n = dy.shape[0]
    dbeta = dy.sum(axis=0)  # (m,)
    dgamma = np.einsum("ij,ij->j", dy, x_hat)  # (m,)
    # sum_i g_i = gamma * dbeta and sum_i g_i x_hat_i = gamma * dgamma
    ds = dy * n
    ds -= dbeta
    ds -= x_hat * dgamma
    ds *= gamma * inv_std / n
    return ds, dgamma, dbeta


# --- dropout ----------------------------------------------------------------


def dropout_mask(
    shape: tuple[int, int], p: float, rng: np.random.Generator, dtype: npt.DTypeLike
) -> Array:
    """Inverted-dropout mask: 0 with probability p, else 1 / (1 - p), so E[mask] = 1."""
    keep = rng.random(shape) >= p  # (n, m) bool
    mask: Array = keep.astype(dtype)
    mask *= np.asarray(1.0 / (1.0 - p), dtype=dtype)
    return mask
