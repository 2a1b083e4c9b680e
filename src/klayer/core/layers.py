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

from klayer.core import kernels

Array = npt.NDArray[np.floating]


# --- linear -----------------------------------------------------------------------------
# Every function takes an optional leading trial axis: x (n, d) for one network or
# (T, n, d) for a stack of T networks (``core.stack``), parameters (d_in, d_out) or
# (T, d_in, d_out), vectors (m,) or (T, m). Reductions run over the examples, axis -2.


def linear_forward(x: Array, W: Array, b: Array) -> Array:
    """s = x W + b.  x (..., n, d_in), W (..., d_in, d_out), b (..., d_out) -> (..., n, d_out)."""
    s = kernels.matmul(x, W)  # (..., n, d_out): x @ W
    s += b[..., None, :]
    return s


def linear_backward(ds: Array, x: Array, W: Array,
                    need_dx: bool = True) -> tuple[Array | None, Array]:
    """dx = ds W^T (None when ``need_dx`` is false: the first layer's input needs no
    gradient) and dW = x^T ds, from ds = dJ/ds (..., n, d_out); the course's
    grad_W = G H^T / n transposed (klayer's ds carries the 1/n already)."""
    dW = kernels.matmul(x, ds, trans_a=True)  # (..., d_in, d_out): x^T ds
    dx = kernels.matmul(ds, W, trans_b=True) if need_dx else None  # (..., n, d_in): ds W^T
    return dx, dW


def bias_backward(ds: Array) -> Array:
    """db = sum_i ds_i (..., d_out): the course's grad_b = G 1_n / n."""
    return ds.sum(axis=-2)


# --- ReLU -------------------------------------------------------------------------------


def relu_forward(s: Array) -> Array:
    """h = max(s, 0), elementwise (..., n, m)."""
    return np.maximum(s, 0)


def relu_backward(dh: Array, h: Array) -> Array:
    """dJ/ds = dJ/dh * 1[s > 0]; the mask is read from the output h = max(s, 0)."""
    ds: Array = dh * (h > 0)
    return ds


# --- batch normalization ----------------------------------------------------------------


class BNCache(NamedTuple):
    """What the batch-norm backward pass needs."""

    x_hat: Array  # (..., n, m) normalized input, (s - mu) / sqrt(var + eps)
    inv_std: Array  # (..., m)   1 / sqrt(var + eps)


def batchnorm_forward_train(
    s: Array, gamma: Array, beta: Array, eps: float
) -> tuple[Array, BNCache, Array, Array]:
    """Normalize with the batch mean and the *biased* batch variance.

    s (..., n, m) -> y = gamma * x_hat + beta, with x_hat = (s - mu) / sqrt(var + eps),
    mu = mean_i s_i, var = mean_i (s_i - mu)^2 (the course's BatchNormalize).
    Also returns (mu, var) so the caller can update running averages.
    """
    mu = s.mean(axis=-2)  # (..., m)
    xc = s - mu[..., None, :]  # (..., n, m)
    var = np.einsum("...ij,...ij->...j", xc, xc) / s.shape[-2]  # (..., m) biased variance
    inv_std = 1.0 / np.sqrt(var + eps)  # (..., m)
    x_hat = xc
    x_hat *= inv_std[..., None, :]  # in place: xc is not needed again
    y = x_hat * gamma[..., None, :]
    y += beta[..., None, :]
    return y, BNCache(x_hat, inv_std), mu, var


def batchnorm_forward_eval(
    s: Array, gamma: Array, beta: Array, mu: Array, var: Array, eps: float
) -> Array:
    """Normalize with fixed (running or population) statistics: an affine map per feature."""
    scale = gamma / np.sqrt(var + eps)  # (..., m)
    y = s * scale[..., None, :]
    y += (beta - mu * scale)[..., None, :]
    return y


def batchnorm_backward(dy: Array, cache: BNCache, gamma: Array) -> tuple[Array, Array, Array]:
    """The assignment's BatchNormBackPass, step by step, in rows: dy (..., n, m) -> ds.

    The course (columns, G_batch m x n) first takes the gamma and beta gradients and
    multiplies G by gamma, then, with v the biased batch variance and D = S - mu 1^T:
        sigma1 = (v + eps)^-1/2,  sigma2 = (v + eps)^-3/2,
        G1 = G . (sigma1 1^T),    G2 = G . (sigma2 1^T),   c = (G2 . D) 1_n,
        G  = G1 - (1/n) (G1 1_n) 1^T - (1/n) D . (c 1^T).
    Here rows are examples, so "1^T" broadcasts along axis -2 and "1_n" sums over it;
    klayer's dy already carries the cost's 1/n, so the gamma/beta sums have none.
    """
    x_hat, inv_std = cache  # S_hat (..., n, m) and sigma1 (..., m)
    n = dy.shape[-2]
    dgamma = np.einsum("...ij,...ij->...j", dy, x_hat)  # grad_gamma = (G . S_hat) 1_n
    dbeta = dy.sum(axis=-2)  # grad_beta = G 1_n
    g = dy * gamma[..., None, :]  # G = G . (gamma 1^T)
    sigma1 = inv_std[..., None, :]  # sigma1 = (v + eps)^-1/2
    sigma2 = sigma1**3  # sigma2 = (v + eps)^-3/2
    G1 = g * sigma1  # G1 = G . (sigma1 1^T)
    G2 = g * sigma2  # G2 = G . (sigma2 1^T)
    D = x_hat / sigma1  # D = S - mu 1^T (the cache keeps S_hat = D . sigma1)
    c = np.einsum("...ij,...ij->...j", G2, D)  # c = (G2 . D) 1_n, (..., m)
    ds = G1 - G1.sum(axis=-2, keepdims=True) / n  # G1 - (1/n) (G1 1_n) 1^T
    ds -= D * c[..., None, :] / n  # - (1/n) D . (c 1^T)
    return ds, dgamma, dbeta


# --- layer normalization -----------------------------------------------------------------


class LNCache(NamedTuple):
    """What the layer-norm backward pass needs."""

    x_hat: Array  # (..., n, m) normalized input
    inv_std: Array  # (..., n)   1 / sqrt(var + eps), one per example


def layernorm_forward(s: Array, gamma: Array, beta: Array, eps: float) -> tuple[Array, LNCache]:
    """Layer norm (Ba, Kiros & Hinton 2016): batch norm's maths over each example's m
    units instead of over the batch, so training and evaluation compute the same and
    there are no running statistics. s (..., n, m) -> gamma * x_hat + beta, with
    x_hat = (s - mu_i) / sqrt(var_i + eps), mu_i and var_i (biased) of row i."""
    mu = s.mean(axis=-1, keepdims=True)  # (..., n, 1)
    x_hat = s - mu  # (..., n, m)
    var = np.einsum("...ij,...ij->...i", x_hat, x_hat) / s.shape[-1]  # (..., n)
    inv_std = 1.0 / np.sqrt(var + eps)  # (..., n)
    x_hat *= inv_std[..., None]
    y = x_hat * gamma[..., None, :]
    y += beta[..., None, :]
    return y, LNCache(x_hat, inv_std)


def layernorm_backward(dy: Array, cache: LNCache, gamma: Array) -> tuple[Array, Array, Array]:
    """dy (..., n, m) -> (ds, dgamma, dbeta). Per row, with g = dy . gamma (dJ/dx_hat):
    ds = inv_std (g - mean_j g - x_hat mean_j (g . x_hat)), batch norm's formula with
    the roles of the axes swapped (means over a row's units, not over the batch)."""
    x_hat, inv_std = cache
    dgamma = np.einsum("...ij,...ij->...j", dy, x_hat)  # (..., m), summed over examples
    dbeta = dy.sum(axis=-2)  # (..., m)
    g = dy * gamma[..., None, :]  # (..., n, m)
    ds = g - g.mean(axis=-1, keepdims=True)
    ds -= x_hat * (np.einsum("...ij,...ij->...i", g, x_hat) / g.shape[-1])[..., None]
    ds *= inv_std[..., None]
    return ds, dgamma, dbeta


def norm_backward(dy: Array, cache: BNCache | LNCache,
                  gamma: Array) -> tuple[Array, Array, Array]:
    """Backward through batch norm or layer norm, told apart by their caches."""
    if isinstance(cache, LNCache):
        return layernorm_backward(dy, cache, gamma)
    return batchnorm_backward(dy, cache, gamma)


# --- dropout ----------------------------------------------------------------


def dropout_mask(
    shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype: npt.DTypeLike
) -> Array:
    """Inverted-dropout mask: 0 with probability p, else 1 / (1 - p), so E[mask] = 1."""
    keep = rng.random(shape) >= p  # (n, m) bool
    mask: Array = keep.astype(dtype)
    mask *= np.asarray(1.0 / (1.0 - p), dtype=dtype)
    return mask
