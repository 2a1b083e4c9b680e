"""Input whitening fitted on the training split: PCA and ZCA (Lin, Memisevic & Konda 2016).

After the per-feature standardization z = (x - mean) / std, the training features'
covariance is C = Z^T Z / n (d, d) = U diag(lam) U^T. Whitening multiplies each row by

    PCA:  W = U diag(1 / sqrt(lam + eps))          (d, d): coordinates on the principal axes
    ZCA:  W = U diag(1 / sqrt(lam + eps)) U^T      (d, d): rotated back, still an image

so that z W has covariance diag(lam / (lam + eps)) (PCA; ZCA: U diag(...) U^T), about
the identity where lam >> eps.
eps damps the directions of least variance (mostly noise and JPEG artefacts); the
eigenvalues of standardized inputs sum to d. ZCA's output keeps the pixel layout (its
filters are local and nearly shift- and mirror-invariant on natural images), so flips
and translations still apply to whitened images; PCA's output is not an image.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from klayer.core.config import WHITEN
from klayer.core.layers import Array


def fit(chunks: Iterable[Array], d: int, kind: str, eps: float) -> np.ndarray:
    """The (d, d) float64 whitening matrix of standardized training rows given in chunks.

    The covariance is summed chunk by chunk (each chunk's Z_c^T Z_c in its own dtype,
    accumulated in float64), so the training set never exists as one float array.
    """
    if kind not in WHITEN[1:]:
        raise ValueError(f"whiten must be one of {', '.join(WHITEN)}, got {kind!r}")
    C = np.zeros((d, d))  # sum of Z_c^T Z_c, (d, d)
    n = 0
    for Z in chunks:  # Z (n_c, d), standardized
        C += Z.T @ Z
        n += len(Z)
    if n < 2:
        raise ValueError("whitening needs at least 2 training examples")
    lam, U = np.linalg.eigh(C / n)  # C = U diag(lam) U^T, lam ascending
    scale = 1.0 / np.sqrt(np.maximum(lam, 0.0) + eps)  # (d,)
    W = U * scale  # (d, d) = U diag(scale): PCA
    return W @ U.T if kind == "zca" else W
