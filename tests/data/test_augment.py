"""Augmentation on flattened image rows (flips, translations) and test-time flip averaging."""

from __future__ import annotations

import numpy as np
import pytest

from klayer.core.config import NetConfig
from klayer.core.losses import log_softmax
from klayer.core.network import EVAL_CHUNK, Network
from klayer.data.augment import hflip, random_flip, random_translate
from klayer.data.datasets import Data, Split
from klayer.training.evaluation import evaluate, evaluate_many, folded

SHAPE = (3, 4, 5)  # (c, h, w): not square, so a transposition would be caught
D = 3 * 4 * 5


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D))


def test_hflip_mirrors_every_row_of_every_channel() -> None:
    X = images(3)
    F = hflip(X, SHAPE).reshape(3, *SHAPE)
    A = X.reshape(3, *SHAPE)
    for j in range(SHAPE[2]):
        np.testing.assert_array_equal(F[..., j], A[..., SHAPE[2] - 1 - j])
    np.testing.assert_array_equal(hflip(hflip(X, SHAPE), SHAPE), X)


def test_random_flip_mirrors_about_half_the_images_and_keeps_the_input() -> None:
    X = images(4000)
    before = X.copy()
    out = random_flip(X, SHAPE, np.random.default_rng(1))
    np.testing.assert_array_equal(X, before)
    same = np.all(out == X, axis=1)
    mirrored = np.all(out == hflip(X, SHAPE), axis=1)
    assert np.all(same ^ mirrored)  # each row is one or the other (random data: never both)
    assert 0.45 < mirrored.mean() < 0.55
    np.testing.assert_array_equal(out, random_flip(X, SHAPE, np.random.default_rng(1)))


def shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Reference: img (c, h, w) moved down by dy and right by dx, zeros where uncovered."""
    c, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i - dy, j - dx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_random_translate_is_a_zero_filled_shift_within_the_range(k: int) -> None:
    X = images(300, seed=2) + 10.0  # no zeros in the data: the border is the fill
    out = random_translate(X, SHAPE, k, np.random.default_rng(3))
    seen = set()
    for x, o in zip(X.reshape(-1, *SHAPE), out.reshape(-1, *SHAPE), strict=True):
        shifts = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)
                  if np.array_equal(o, shifted(x, dy, dx))]
        assert len(shifts) == 1
        seen.add(shifts[0])
    assert len(seen) == (2 * k + 1) ** 2  # every shift is drawn
    np.testing.assert_array_equal(random_translate(X, SHAPE, 0, np.random.default_rng(3)), X)


def test_test_time_flips_average_the_two_softmax_outputs() -> None:
    rng = np.random.default_rng(4)
    n = 500

    def split() -> Split:
        return Split(rng.integers(0, 256, (n, D), dtype=np.uint8), rng.integers(0, 4, n))

    data = Data(split(), split(), split(), num_classes=4, image_shape=SHAPE)
    net = Network(NetConfig(d=D, num_classes=4, hidden=(8,), batch_norm=False), rng=rng)
    X = data.standardize(data.test.X, dtype=net.dtype)
    p = np.exp(log_softmax(net.scores(X))) + np.exp(log_softmax(net.scores(hflip(X, SHAPE))))
    expected = float(np.mean(p.argmax(axis=1) == data.test.y))
    plain = evaluate(net, data, data.test.X, data.test.y)
    tta = evaluate(net, data, data.test.X, data.test.y, tta_flip=True)
    assert tta.accuracy == pytest.approx(expected, abs=1 / n)  # float32 ties may differ
    assert tta.accuracy != plain.accuracy  # the flip changes predictions of a random net
    assert tta.loss == plain.loss  # the loss stays that of the images as they are


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_evaluation_folds_the_standardization_into_the_first_layer(dtype: str) -> None:
    rng = np.random.default_rng(5)
    n = 2537  # three evaluation chunks, the last one short
    assert n > 2 * EVAL_CHUNK and n % EVAL_CHUNK

    def split() -> Split:
        return Split(rng.integers(0, 256, (n, D), dtype=np.uint8), rng.integers(0, 4, n))

    data = Data(split(), split(), split(), num_classes=4, image_shape=SHAPE)
    net = Network(NetConfig(d=D, num_classes=4, hidden=(16, 16), skip=True, dtype=dtype),
                  rng=rng)
    net.forward(data.standardize(data.train.X[:500], dtype=net.dtype), train=True)  # BN stats
    X = data.standardize(data.test.X, dtype=np.float64).astype(dtype)
    ref = net.evaluate(X, data.test.y, lam=0.01)  # on standardized rows
    got = evaluate(net, data, data.test.X, data.test.y, lam=0.01)  # raw rows, folded
    rtol = 1e-5 if dtype == "float32" else 1e-12
    assert got.loss == pytest.approx(ref.loss, rel=rtol)
    assert got.cost == pytest.approx(ref.cost, rel=rtol)
    assert got.accuracy == pytest.approx(ref.accuracy, abs=1 / n)  # float32 near-ties only
    if dtype == "float64":
        assert got.accuracy == ref.accuracy


def test_a_constant_non_zero_feature_is_evaluated_unfolded() -> None:
    rng = np.random.default_rng(6)
    X = rng.integers(0, 256, (400, D), dtype=np.uint8)
    X[:, 7] = 200  # constant in training: std at its floor, |mean| / std huge
    data = Data(Split(X, rng.integers(0, 4, 400)), Split(X[:100], rng.integers(0, 4, 100)),
                Split(X[:100], rng.integers(0, 4, 100)), num_classes=4, image_shape=SHAPE)
    net = Network(NetConfig(d=D, num_classes=4, hidden=(8,)), rng=rng)
    assert folded(net, data) is None
    ref = net.evaluate(data.standardize(data.test.X, dtype=net.dtype), data.test.y)
    got = evaluate(net, data, data.test.X, data.test.y)
    assert got.accuracy == ref.accuracy and got.loss == pytest.approx(ref.loss, rel=1e-6)
    many = evaluate_many([net, net.copy()], data, data.test.X, data.test.y)
    assert all(m.accuracy == ref.accuracy for m in many)
