"""Augmentation on flattened image rows: flips, translations, mixup, cutmix, test-time views.

CIFAR-10 rows hold an image channel-major, (3, 32, 32) flattened to 3072 values. All
functions take X (n, d) with d = prod(image_shape) and return a new (n, d) array.
"""

from __future__ import annotations

import numpy as np

from klayer.core import kernels
from klayer.core.layers import Array
from klayer.core.losses import Labels, Mix


def hflip(X: Array, image_shape: tuple[int, int, int]) -> Array:
    """Every image mirrored left-right. (n, d) -> (n, d)."""
    n = X.shape[0]
    return np.ascontiguousarray(X.reshape(n, *image_shape)[..., ::-1]).reshape(n, -1)


def random_flip(X: Array, image_shape: tuple[int, int, int], rng: np.random.Generator) -> Array:
    """Mirror each image with probability 1/2."""
    return random_moves(X, image_shape, True, 0, rng)


def random_translate(
    X: Array, image_shape: tuple[int, int, int], max_shift: int, rng: np.random.Generator
) -> Array:
    """Shift each image by (dy, dx), each uniform in [-max_shift, max_shift], zero-filled.

    Zero is the training mean after standardization, so the uncovered border looks
    like an average pixel. (n, d) -> (n, d).
    """
    k = max_shift
    dy, dx = rng.integers(-k, k + 1, size=(2, X.shape[0]))
    return moved(X, image_shape, None, dy, dx)


def random_moves(X: Array, image_shape: tuple[int, int, int], flip: bool, max_shift: int,
                 rng: np.random.Generator) -> Array:
    """``random_flip`` (when ``flip``) then ``random_translate`` (when ``max_shift``), with
    the same draws from rng, in one pass over the images (``moved``)."""
    n = X.shape[0]
    mirror = np.asarray(rng.random(n) < 0.5) if flip else None
    k = max_shift
    dy, dx = rng.integers(-k, k + 1, size=(2, n)) if k else (None, None)
    return moved(X, image_shape, mirror, dy, dx)


def moved(X: Array, image_shape: tuple[int, int, int], mirror: np.ndarray | None,
          dy: np.ndarray | None = None, dx: np.ndarray | None = None) -> Array:
    """Image i mirrored left-right where mirror[i], then moved dy[i] rows down and dx[i]
    columns right, zero-filled (None: no mirror, no move). (n, d) -> a new (n, d) array,
    in one C pass for float32 (``kernels.move_images``); in NumPy, the images that drew
    one move move together (``shift``)."""
    n = X.shape[0]
    none = np.zeros(n, np.int64)
    flags, ys, xs = (none if a is None else a for a in (mirror, dy, dx))
    out = kernels.move_images(X, image_shape, flags, ys, xs)
    if out is not None:
        return out
    out = X.copy()
    rows = np.flatnonzero(flags)
    if rows.size:
        out[rows] = hflip(X[rows], image_shape)
    if dy is None and dx is None:
        return out
    src, out = out, np.empty_like(X)
    for a, b in sorted(set(zip(ys.tolist(), xs.tolist(), strict=True))):
        rows = np.flatnonzero((ys == a) & (xs == b))
        out[rows] = shift(src[rows], image_shape, a, b)
    return out


def shift(X: Array, image_shape: tuple[int, int, int], dy: int, dx: int,
          fill: Array | None = None) -> Array:
    """Every image moved dy rows down and dx columns right; uncovered pixels take ``fill``
    (d,) (the raw value that standardizes to 0: the training mean), or 0. (n, d) -> (n, d)."""
    n = X.shape[0]
    c, h, w = image_shape
    out = np.zeros((n, c, h, w), X.dtype) if fill is None else np.empty((n, c, h, w), X.dtype)
    if fill is not None:
        out[:] = fill.reshape(c, h, w)
    if abs(dy) >= h or abs(dx) >= w:  # moved out of the frame: only the fill is left
        return out.reshape(n, -1)
    src = X.reshape(n, c, h, w)
    out[:, :, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        src[:, :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out.reshape(n, -1)


def tta_views(flip: bool, shift_by: int) -> list[tuple[bool, int, int]]:
    """Test-time views as (mirrored, dy, dx), the plain image first: the image, with
    ``shift_by`` its four diagonal shifts (five crops of the padded image), and with
    ``flip`` the mirror image of each."""
    s = shift_by
    moves = [(0, 0)] + ([(-s, -s), (-s, s), (s, -s), (s, s)] if s else [])
    return [(m, dy, dx) for m in ((False, True) if flip else (False,)) for dy, dx in moves]


def mixup(X: Array, y: Labels, alpha: float, rng: np.random.Generator) -> tuple[Array, Mix]:
    """Mixup (Zhang et al. 2018): each row becomes w x_i + (1 - w) x_p(i), p a random
    permutation of the mini-batch and w ~ Beta(alpha, alpha) shared by the batch.
    Returns the mixed rows (n, d) and the loss's second labels and weights (``Mix``)."""
    n = X.shape[0]
    w = rng.beta(alpha, alpha)
    perm = rng.permutation(n)
    mixed = w * X + (1 - w) * X[perm]
    return mixed.astype(X.dtype, copy=False), (y[perm], np.full(n, w))


def cutmix(X: Array, y: Labels, image_shape: tuple[int, int, int], alpha: float,
           rng: np.random.Generator) -> tuple[Array, Mix]:
    """CutMix (Yun et al. 2019): a box of each image is replaced by the same box of the
    image p(i), p a random permutation; the box covers about 1 - w of the image, w ~
    Beta(alpha, alpha), centred uniformly and clipped at the border. The labels' weight
    is the share of the image left uncovered."""
    n = X.shape[0]
    c, h, w = image_shape
    keep = rng.beta(alpha, alpha)
    perm = rng.permutation(n)
    bh, bw = int(h * np.sqrt(1 - keep)), int(w * np.sqrt(1 - keep))  # box size
    cy, cx = int(rng.integers(h)), int(rng.integers(w))  # box centre
    top, bottom = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    left, right = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    out = X.reshape(n, c, h, w).copy()
    out[:, :, top:bottom, left:right] = X.reshape(n, c, h, w)[perm, :, top:bottom, left:right]
    share = 1 - (bottom - top) * (right - left) / (h * w)  # of image i left
    return out.reshape(n, -1), (y[perm], np.full(n, share))
