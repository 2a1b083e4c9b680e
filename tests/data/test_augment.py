"""Augmentation on flattened image rows (flips, translations, shifts) and test-time views."""

from __future__ import annotations

import numpy as np
import pytest

from klayer.core import kernels
from klayer.core.config import NetConfig
from klayer.core.losses import log_softmax
from klayer.core.network import EVAL_CHUNK, Network
from klayer.data.augment import (
    cutmix,
    hflip,
    mixup,
    moved,
    random_flip,
    random_moves,
    random_translate,
    shift,
    tta_views,
)
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


def moved_one_by_one(X: np.ndarray, mirror: np.ndarray, dy: np.ndarray,
                     dx: np.ndarray) -> np.ndarray:
    """Reference: each image mirrored where mirror says, then ``shifted``, one by one."""
    imgs = X.reshape(-1, *SHAPE)
    return np.stack([shifted(img[..., ::-1] if m else img, a, b)
                     for img, m, a, b in zip(imgs, mirror, dy, dx, strict=True)]
                    ).reshape(len(X), -1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # NumPy's code; the C pass
def test_flips_then_translations_draw_and_move_as_the_reference(dtype: type) -> None:
    """``random_moves`` (and random_flip, random_translate) take their draws from rng in
    the order of the code before it (the flips' uniforms, then the moves' integers) and
    move each image as the one-image reference does."""
    X = images(200, seed=5).astype(dtype)
    n = len(X)
    for flip, k in ((True, 2), (True, 0), (False, 1)):
        rng, ref = np.random.default_rng(6), np.random.default_rng(6)
        mirror = ref.random(n) < 0.5 if flip else np.zeros(n, bool)
        dy, dx = ref.integers(-k, k + 1, size=(2, n)) if k else np.zeros((2, n), int)
        want = moved_one_by_one(X, mirror, dy, dx)
        np.testing.assert_array_equal(random_moves(X, SHAPE, flip, k, rng), want)
        assert rng.random() == ref.random()  # no draw more or less
    rng, ref = np.random.default_rng(8), np.random.default_rng(8)
    mirror = ref.random(n) < 0.5
    np.testing.assert_array_equal(random_flip(X, SHAPE, rng),
                                  moved_one_by_one(X, mirror, *np.zeros((2, n), int)))
    dy, dx = ref.integers(-2, 3, size=(2, n))
    np.testing.assert_array_equal(random_translate(X, SHAPE, 2, rng),
                                  moved_one_by_one(X, np.zeros(n, bool), dy, dx))


@pytest.mark.skipif(kernels._C is None, reason="klayer._kernels is not built")
def test_the_c_moves_match_the_reference_and_check_their_input() -> None:
    """float32 rows take ``kernels.move_images``: the reference's copies, moves past the
    frame (any integer dtype) and any non-zero mirror flag included; bad arguments are
    refused before anything is written."""
    rng = np.random.default_rng(7)
    X = images(300, seed=8).astype(np.float32)
    mirror = rng.integers(0, 3, 300) * 128  # 0, 128, 256: all but 0 mirror
    dy, dx = rng.integers(-6, 7, size=(2, 300))
    got = kernels.move_images(X, SHAPE, mirror, dy, dx)
    assert got is not None
    clip = np.clip(dy, -SHAPE[1], SHAPE[1]), np.clip(dx, -SHAPE[2], SHAPE[2])
    np.testing.assert_array_equal(got, moved_one_by_one(X, mirror != 0, *clip))
    far = np.full(300, 2**63, np.uint64)  # no wrap-around to a small move
    np.testing.assert_array_equal(kernels.move_images(X, SHAPE, mirror, far, dx),
                                  np.zeros_like(X))
    np.testing.assert_array_equal(moved(X, SHAPE, mirror != 0, dy, dx),
                                  moved(X.astype(np.float64), SHAPE, mirror != 0, dy, dx))
    with pytest.raises(TypeError, match="dy must hold integers"):
        kernels.move_images(X, SHAPE, mirror, dy + 0.5, dx)
    flags, d64 = (mirror != 0).astype(np.uint8), dy.astype(np.int64)
    with pytest.raises(ValueError, match="mirror flags"):
        kernels._C.move_images(X, np.empty_like(X), flags, d64[:5], d64, *SHAPE)
    with pytest.raises(ValueError, match="out: expected"):
        kernels._C.move_images(X, np.empty((299, D), np.float32), flags, d64, d64, *SHAPE)
    with pytest.raises(ValueError, match="overlaps the input"):
        kernels._C.move_images(X, X, flags, d64, d64, *SHAPE)


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


# --- shifts and test-time views ----------------------------------------------------------


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (0, -2), (-1, 3), (2, 2)])
def test_shift_moves_pixels_and_fills_the_border(dy: int, dx: int) -> None:
    X = images(2)
    fill = np.arange(D, dtype=np.float64)
    got = shift(X, SHAPE, dy, dx, fill).reshape(2, *SHAPE)
    src, F = X.reshape(2, *SHAPE), fill.reshape(SHAPE)
    _, h, w = SHAPE
    for r in range(h):
        for c in range(w):
            inside = 0 <= r - dy < h and 0 <= c - dx < w
            want = src[:, :, r - dy, c - dx] if inside else np.broadcast_to(F[:, r, c], (2, 3))
            np.testing.assert_array_equal(got[:, :, r, c], want)
    np.testing.assert_array_equal(shift(X, SHAPE, dy, dx), shift(X, SHAPE, dy, dx, 0 * fill))
    np.testing.assert_array_equal(shift(X, SHAPE, 0, 0), X)


def test_tta_views_start_with_the_plain_image() -> None:
    assert tta_views(False, 0) == [(False, 0, 0)]
    assert tta_views(True, 0) == [(False, 0, 0), (True, 0, 0)]
    views = tta_views(True, 2)
    assert len(views) == 10 and views[0] == (False, 0, 0) and len(set(views)) == 10
    assert {(dy, dx) for _, dy, dx in views} == {(0, 0), (-2, -2), (-2, 2), (2, -2), (2, 2)}


def test_shifted_views_average_as_on_standardized_images() -> None:
    """evaluate's folded path (raw rows, border filled with the mean) gives the accuracy of
    averaging the probabilities of views made from standardized rows (border 0)."""
    rng = np.random.default_rng(3)
    n = 300

    def split() -> Split:
        return Split(rng.integers(0, 256, (n, D), dtype=np.uint8), rng.integers(0, 4, n))

    data = Data(split(), split(), split(), num_classes=4, image_shape=SHAPE)
    net = Network(NetConfig(d=D, num_classes=4, hidden=(16,), dtype="float64"), rng=rng)
    net.forward(data.standardize(data.train.X, dtype=np.float64), train=True)  # BN stats
    Z = data.standardize(data.test.X, dtype=np.float64)
    probs = sum(np.exp(log_softmax(net.scores(shift(hflip(Z, SHAPE) if m else Z, SHAPE, dy, dx))))
                for m, dy, dx in tta_views(True, 1))
    want = np.mean(probs.argmax(axis=1) == data.test.y)
    got = evaluate(net, data, data.test.X, data.test.y, tta_flip=True, tta_shift=1)
    assert got.accuracy == want
    plain = evaluate(net, data, data.test.X, data.test.y)
    assert got.loss == plain.loss  # the loss stays single-view
    assert got.accuracy != plain.accuracy  # the views changed some answers


# --- mixup and cutmix ----------------------------------------------------------------------


def test_mixup_blends_each_row_with_its_partner() -> None:
    X, y = images(8), np.arange(8)
    mixed, (y2, w) = mixup(X, y, 0.4, np.random.default_rng(0))
    assert np.all(w == w[0]) and 0 < w[0] < 1
    partner = X[y2]  # y is the row index here, so y2 says which row each was mixed with
    np.testing.assert_allclose(mixed, w[0] * X + (1 - w[0]) * partner, rtol=1e-12)
    assert sorted(y2) == list(range(8))  # a permutation
    again, (y3, _) = mixup(X, y, 0.4, np.random.default_rng(0))
    np.testing.assert_array_equal(again, mixed)
    np.testing.assert_array_equal(y3, y2)


def test_cutmix_pastes_a_box_and_weights_labels_by_the_share_left() -> None:
    rng = np.random.default_rng(1)
    X = np.repeat(np.arange(6.0)[:, None], D, axis=1)  # image i is all i
    y = np.arange(6)
    for _ in range(20):
        out, (y2, w) = cutmix(X, y, SHAPE, 1.0, rng)
        own = (out == X).mean(axis=1)  # share of each image's pixels still its own
        moved = y2 != y
        np.testing.assert_allclose(own[moved], w[moved])
        np.testing.assert_array_equal(out[~moved], X[~moved])
        box = out.reshape(6, *SHAPE) != X.reshape(6, *SHAPE)
        if moved.any():  # the pasted pixels are the partner's, the same box in every channel
            i = int(np.flatnonzero(moved)[0])
            assert np.all(out[i][box[i].reshape(-1)] == y2[i])
            assert np.all(box[i] == box[i][:1])


def test_mixed_batches_follow_mix_prob() -> None:
    from klayer.core.config import TrainConfig
    from klayer.training.minibatches import MiniBatches

    rng = np.random.default_rng(0)
    n = 400
    data = Data(Split(rng.integers(0, 256, (n, D), dtype=np.uint8), rng.integers(0, 4, n)),
                Split(np.zeros((4, D), np.uint8), np.zeros(4)),
                Split(np.zeros((4, D), np.uint8), np.zeros(4)), num_classes=4,
                image_shape=SHAPE)

    def mixed(**kw: float) -> int:
        """How many of 200 mini-batches came mixed."""
        cfg = TrainConfig(n_batch=20, **kw)  # type: ignore[arg-type]
        batches = MiniBatches(cfg, data, n // 20, np.float32, seed=0)
        return sum(batches(t)[2] is not None for t in range(200))

    assert mixed() == 0 and mixed(mixup=0.2, mix_prob=0.0) == 0
    assert mixed(mixup=0.2) == mixed(cutmix=1.0) == 200
    assert 70 <= mixed(mixup=0.2, cutmix=1.0, mix_prob=0.5) <= 130  # about half
