"""Input whitening (``--whiten pca|zca``): the math, the fit/apply split, the model file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest_data_helpers import make_cifar_folder

from klayer.core.config import TrainConfig
from klayer.core.network import Network
from klayer.data import whitening
from klayer.data.datasets import Data, Split
from klayer.training import modelfile
from klayer.training.evaluation import evaluate
from klayer.training.trainer import train


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    """Rows with strongly correlated, unequally scaled features (n, d)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.geomspace(3.0, 0.1, d)[:, None]
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


def data_of(train: np.ndarray, other: np.ndarray) -> Data:
    y = np.arange(len(train)) % 3
    z = np.arange(len(other)) % 3
    return Data(Split(train, y), Split(other, z), Split(other, z), num_classes=3)


@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_whitened_training_rows_have_the_promised_covariance(kind: str) -> None:
    eps = 1e-3
    data = data_of(correlated(4000, 12, 0), correlated(50, 12, 1)).whitened(kind, eps)
    Z = data.standardize(data.train.X, np.float64)  # standardized, then whitened
    C = Z.T @ Z / len(Z)  # (d, d)
    S = data.standardize(data.train.X, np.float64) @ np.linalg.inv(data.whiten)  # unwhitened
    lam = np.linalg.eigvalsh(S.T @ S / len(S))  # eigenvalues of the standardized covariance
    np.testing.assert_allclose(np.sort(np.diag(C)) if kind == "pca" else np.linalg.eigvalsh(C),
                               np.sort(lam / (lam + eps)), rtol=1e-8, atol=1e-10)
    if kind == "pca":  # principal axes: decorrelated
        np.testing.assert_allclose(C - np.diag(np.diag(C)), 0.0, atol=1e-8)
    else:  # W = U diag U^T: symmetric, the least rotation that whitens
        np.testing.assert_allclose(data.whiten, data.whiten.T, atol=1e-12)


def test_whitening_is_fitted_on_the_training_split_only() -> None:
    train = correlated(2000, 10, 0)
    a = data_of(train, correlated(40, 10, 1)).whitened("zca", 0.1)
    b = data_of(train, 100.0 * correlated(40, 10, 2) - 7.0).whitened("zca", 0.1)
    np.testing.assert_array_equal(a.whiten, b.whiten)  # other splits do not enter the fit
    np.testing.assert_array_equal(a.mean, b.mean)
    alone = whitening.fit([a.with_transform(a.mean, a.std).standardize(train, np.float64)],
                          10, "zca", 0.1)
    np.testing.assert_allclose(a.whiten, alone, rtol=1e-9, atol=1e-12)
    assert data_of(train, train[:40]).whitened("none", 0.1).whiten.size == 0


def test_training_rows_and_evaluation_see_the_same_whitened_inputs() -> None:
    data = data_of(correlated(600, 16, 0), correlated(200, 16, 1)).whitened("zca", 0.05)
    idx = np.array([5, 0, 599, 5, 17])
    rows, alone = data.train_rows(idx), data.standardize(data.train.X[idx])
    # the kept rows were whitened 600 at a time, these 5 at a time: BLAS may sum each
    # row's d products in another order for another row count, so the two agree to the
    # rounding of a float32 dot product of d terms (each off by <= d eps sum |terms|)
    z = (data.train.X[idx] - data.mean) / data.std  # (5, d) standardized, not whitened
    s = np.abs(z) @ np.abs(data.whiten)  # (5, d): each entry's sum of |terms|
    assert np.all(np.abs(rows - alone) <= 2 * data.d * np.finfo(np.float32).eps * s)
    buf = np.empty((5, 16), np.float32)
    assert data.train_rows(idx, out=buf) is buf
    net = Network(TrainConfig(hidden=(8,)).net_config(d=16, num_classes=3), rng=0)
    # evaluate folds mean, std and whitening into W1; here they are applied to the inputs
    logits = net.scores(data.standardize(data.val.X, np.float64).astype(np.float32))
    m = evaluate(net, data, data.val.X, data.val.y)
    assert m.accuracy == np.mean(logits.argmax(axis=1) == data.val.y)


def test_the_folded_whitening_scores_as_whitened_rows_do() -> None:
    """At a width where the fold's P W1 runs on klayer's products (float32, in blocks of
    MATMUL_MAX_ROWS rows of P: two here), the folded first layer on raw rows gives the
    scores of the network on the whitened rows, to float32 rounding (float64
    reference)."""
    from klayer.core.kernels import MATMUL_MAX_ROWS
    from klayer.training.evaluation import folded

    d = MATMUL_MAX_ROWS + 76
    train = correlated(2000, d, 2) * 40 + 120  # pixel-like scale: mean / std near 3
    data = data_of(train, correlated(200, d, 3) * 40 + 120).whitened("zca", 0.05)
    net = Network(TrainConfig(hidden=(64,)).net_config(d=d, num_classes=3), rng=1)
    X = data.val.X.astype(np.float32)
    ref = net.astype("float64").scores(data.standardize(data.val.X, np.float64))
    fold = folded(net, data)
    assert fold is not None
    got = fold.scores(X)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()  # seen: 3e-7


def test_pca_refuses_image_augmentation_by_name() -> None:
    with pytest.raises(ValueError, match="flip, translate cannot apply"):
        TrainConfig(whiten="pca", flip=True, translate=2)
    with pytest.raises(ValueError, match="whiten_eps"):
        TrainConfig(whiten="zca", whiten_eps=0.0)
    with pytest.raises(ValueError, match="whiten"):
        TrainConfig(whiten="zac")


def test_a_whitened_model_file_carries_its_whitening(tmp_path: Path) -> None:
    cwd = tmp_path
    make_cifar_folder(cwd / "cifar" / "cifar-10-batches-py", rows=120)
    r = subprocess.run([sys.executable, "-m", "klayer", "train", "--data-dir", "cifar",
                        "--val-size", "100", "--hidden", "8", "--n-batch", "50", "--steps", "20",
                        "--whiten", "zca", "--whiten-eps", "0.5", "--flip", "--quiet",
                        "--out", "run"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    net, _, extras = modelfile.load(cwd / "run" / "model.npz")
    assert extras["whiten"].shape == (3072, 3072)
    ev = subprocess.run([sys.executable, "-m", "klayer", "evaluate", "run", "--data-dir", "cifar",
                         "--split", "test"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert ev.returncode == 0, ev.stderr
    # the model file alone reproduces the test accuracy the run reported
    import json

    summary = json.loads((cwd / "run" / "summary.json").read_text())
    from klayer.data.datasets import load_cifar10

    raw = load_cifar10(cwd / "cifar" / "cifar-10-batches-py", val_size=100)
    X = (raw.test.X - extras["mean"]) / extras["std"] @ extras["whiten"]
    acc = np.mean(net.scores(X.astype(np.float32)).argmax(axis=1) == raw.test.y)
    assert acc == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert f"{acc:.2%}" in ev.stdout
    # klayer predict whitens as training did: its probabilities are the model's
    np.save(cwd / "rows.npy", np.asarray(raw.test.X[:5]))  # (5, 3072) uint8, CIFAR's order
    pr = subprocess.run([sys.executable, "-m", "klayer", "predict", "run", "rows.npy",
                         "--json"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert pr.returncode == 0, pr.stderr
    got = np.array([list(p["probabilities"].values())
                    for p in json.loads(pr.stdout)["predictions"]])
    s = net.scores(X[:5].astype(np.float32)).astype(np.float64)
    want = np.exp(s - s.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, want / want.sum(axis=1, keepdims=True), atol=1e-5)
    # a model file whose whitening is malformed is refused by name
    files = dict(np.load(cwd / "run" / "model.npz"))
    files["extra/whiten"] = files["extra/whiten"][:5]
    np.savez(cwd / "bad.npz", **files)
    with pytest.raises(modelfile.ModelFileError, match="extra/whiten"):
        modelfile.load(cwd / "bad.npz")


def test_training_with_whitening_learns() -> None:
    rng = np.random.default_rng(0)
    X = correlated(1500, 20, 3)
    w = rng.normal(size=(20, 3))
    y = (X @ w).argmax(axis=1)
    data = Data(Split(X[:1000], y[:1000]), Split(X[1000:1250], y[1000:1250]),
                Split(X[1250:], y[1250:]), num_classes=3)
    for kind in ("none", "zca", "pca"):
        res = train(TrainConfig(dataset="synthetic", hidden=(16,), whiten=kind, epochs=10,
                                n_batch=50, lam=0.0), data)
        assert res.summary["test_accuracy"] > 0.85, kind


def test_test_time_views_of_whitened_images_are_made_after_whitening() -> None:
    from klayer.core.losses import log_softmax
    from klayer.data.augment import hflip, shift, tta_views

    rng = np.random.default_rng(4)
    shape = (3, 4, 4)
    X = rng.integers(0, 256, (1500, 48)).astype(np.uint8)
    y = rng.integers(0, 10, 1500)
    data = Data(Split(X[:500], y[:500]), Split(X[500:], y[500:]), Split(X[500:], y[500:]),
                num_classes=10, image_shape=shape).whitened("zca", 0.1)
    net = Network(TrainConfig(hidden=(32,), dtype="float64").net_config(d=48), rng=1)
    net.params["W1"] *= 10  # views then change many answers
    Z = data.standardize(data.test.X, np.float64)  # whitened, then views as in training
    probs = sum(np.exp(log_softmax(net.scores(shift(hflip(Z, shape) if m else Z, shape, a, b))))
                for m, a, b in tta_views(True, 1))
    got = evaluate(net, data, data.test.X, data.test.y, tta_flip=True, tta_shift=1)
    assert got.accuracy == np.mean(probs.argmax(axis=1) == data.test.y)


def test_pca_coordinates_are_no_image_and_bad_values_are_named() -> None:
    from klayer.training.plan import validate_for_data

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (200, 48)).astype(np.uint8)
    data = Data(Split(X[:150], np.arange(150) % 3), Split(X[150:], np.arange(50) % 3),
                Split(X[150:], np.arange(50) % 3), num_classes=3, image_shape=(3, 4, 4))
    assert data.whitened("pca", 0.1).image_shape is None  # nothing may flip or shift it
    assert data.whitened("zca", 0.1).image_shape == (3, 4, 4)
    for bad in ({"whiten_eps": float("inf")}, {"mixup": float("inf")},
                {"cutmix": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tta_shift \(4\) must be less than the image size"):
        validate_for_data(TrainConfig(n_batch=50, tta_shift=4), data)
    validate_for_data(TrainConfig(n_batch=50, tta_shift=3), data)


def _resident_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_the_raw_rows_leave_memory_once_their_whitened_copy_is_kept(tmp_path: Path) -> None:
    """A read-only mapped file's pages leave the resident set and read back the same;
    memory of the process's own is never touched."""
    from klayer.data.files import release_pages

    rows = np.random.default_rng(0).integers(0, 256, (4096, 3072), dtype=np.uint8)  # 12 MiB
    np.save(tmp_path / "x.npy", rows)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert int(mapped.sum(dtype=np.int64)) == int(rows.sum(dtype=np.int64))  # all paged in
    before = _resident_file_kib()
    assert release_pages(mapped[:4000])
    assert before - _resident_file_kib() > 10_000  # KiB: most of the 12 MiB left
    np.testing.assert_array_equal(mapped, rows)  # and reads back from the file
    assert not release_pages(rows) and not release_pages(rows[:, ::2])
    np.testing.assert_array_equal(rows, np.load(tmp_path / "x.npy"))


def test_evaluation_of_whitened_training_rows_reads_the_kept_copy() -> None:
    """With the whitened training split kept, its evaluation and PreciseBN read those rows
    (the same values as whitening them again): the metrics agree with the folded raw
    path to rounding, and the population statistics exactly."""
    from klayer.training.evaluation import evaluate, population_stats

    data = data_of(correlated(1200, 16, 0), correlated(200, 16, 1)).whitened("zca", 0.05)
    net = Network(TrainConfig(hidden=(8,)).net_config(d=16, num_classes=3), rng=0)
    folded_path = evaluate(net, data, data.train.X, data.train.y)
    before = net.copy()
    population_stats(before, data, data.train.X, 0)
    assert data.kept_rows(data.train.X, np.float32) is None
    whole = data.whitened_train(np.float32)
    assert whole is not None
    assert data.kept_rows(data.train.X[:50], np.float32) is not None
    assert data.kept_rows(data.train.X[1:], np.float32) is None  # not from the first row
    kept_path = evaluate(net, data, data.train.X, data.train.y)
    assert kept_path.accuracy == pytest.approx(folded_path.accuracy, abs=1.5 / data.train.n)
    assert kept_path.loss == pytest.approx(folded_path.loss, rel=1e-5)
    after = net.copy()
    population_stats(after, data, data.train.X, 0)
    for k in before.stats:
        np.testing.assert_array_equal(before.stats[k], after.stats[k])
