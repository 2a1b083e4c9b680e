"""Image augmentation on flattened rows: random flips and translations, test-time flips.

CIFAR-10 rows hold an image channel-major, (3, 32, 32) flattened to 3072 values. All
functions take X (n, d) with d = prod(image_shape) and return a new (n, d) array.
"""

from __future__ import annotations

import numpy as np

from klayer.core.layers import Array


def hflip(X: Array, image_shape: tuple[int, int, int]) -> Array:
    """Every image mirrored left-right. (n, d) -> (n, d)."""
    n = X.shape[0]
    return np.ascontiguousarray(X.reshape(n, *image_shape)[..., ::-1]).reshape(n, -1)


def random_flip(X: Array, image_shape: tuple[int, int, int], rng: np.random.Generator) -> Array:
    """Mirror each image with probability 1/2."""
    out = X.copy()
    rows = np.flatnonzero(rng.random(X.shape[0]) < 0.5)
    if rows.size:
        out[rows] = hflip(X[rows], image_shape)
    return out


def random_translate(
    X: Array, image_shape: tuple[int, int, int], max_shift: int, rng: np.random.Generator
) -> Array:
    """Shift each image by (dy, dx), each uniform in [-max_shift, max_shift], zero-filled.

    Zero is the training mean after standardization, so the uncovered border looks
    like an average pixel.
    """
    n = X.shape[0]
    c, h, w = image_shape
    k = max_shift
    padded = np.zeros((n, c, h + 2 * k, w + 2 * k), X.dtype)  # (n, c, h+2k, w+2k)
    padded[:, :, k : k + h, k : k + w] = X.reshape(n, c, h, w)
    dy, dx = rng.integers(-k, k + 1, size=(2, n))
    out = np.empty((n, c, h, w), X.dtype)
    for i in range(n):  # n = one mini-batch; a crop per image is cheap next to the matmuls
        out[i] = padded[i, :, k - dy[i] : k - dy[i] + h, k - dx[i] : k - dx[i] + w]
    return out.reshape(n, -1)
