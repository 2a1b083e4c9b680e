"""klayer.data.datasets: safe batch loading, validation, splits, the decoded cache, synthetic
data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest_data_helpers import NAMES, batch_dict, make_cifar_folder, py2_pickle, write_batch

from klayer.data import datasets as kd
from klayer.data.batchfile import DataError, DataNotFoundError, load_batch
from klayer.data.datasets import Data, Split, load_cifar10, make_synthetic

RNG = np.random.default_rng(0)
X5 = RNG.integers(0, 256, size=(5, 3072), dtype=np.uint8)
Y5 = np.array([0, 9, 3, 3, 1])


# --- load_batch --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batch_round_trips_with_any_protocol(tmp_path: Path, protocol: int) -> None:
    write_batch(tmp_path / "b", X5, Y5, protocol=protocol)
    X, y = load_batch(tmp_path / "b")
    assert X.dtype == np.uint8 and X.shape == (5, 3072) and y.dtype == np.int64
    np.testing.assert_array_equal(X, X5)
    np.testing.assert_array_equal(y, Y5)


def test_python2_pickle_like_the_official_files_loads(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(py2_pickle(X5, Y5))
    X, y = load_batch(tmp_path / "b")
    np.testing.assert_array_equal(X, X5)
    np.testing.assert_array_equal(y, Y5)


def test_str_keys_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(pickle.dumps({"data": X5, "labels": Y5.tolist()}, protocol=2))
    np.testing.assert_array_equal(load_batch(tmp_path / "b")[1], Y5)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="refused global") as e:
        load_batch(path)
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


def _corruptions() -> dict[str, bytes]:
    good = pickle.dumps(batch_dict(X5, Y5), protocol=2)
    rng = np.random.default_rng(1)

    def dump(X: object, y: object) -> bytes:
        return pickle.dumps({b"data": X, b"labels": y}, protocol=2)

    return {
        "cut in half": good[: len(good) // 2],
        "empty": b"",
        "random bytes": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "random after header": b"\x80\x02" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "flipped opcode": good[:2] + bytes([good[2] ^ 0xFF]) + good[3:],
        "not a dict": pickle.dumps([1, 2, 3], protocol=2),
        "no labels": pickle.dumps({b"data": X5}, protocol=2),
        "wrong width": dump(X5[:, :100], Y5.tolist()),
        "1-D data": dump(X5[0], [1]),
        "zero rows": dump(X5[:0], []),
        "float data": dump(X5.astype(np.float32), Y5.tolist()),
        "label out of range": dump(X5, [0, 1, 2, 3, 10]),
        "negative label": dump(X5, [0, 1, 2, 3, -1]),
        "too few labels": dump(X5, [0, 1]),
        "float labels": dump(X5, [0.5] * 5),
        "ragged labels": dump(X5, [[1], [2, 3], 1, 1, 1]),
    }


@pytest.mark.parametrize("name", list(_corruptions()))
def test_broken_batches_raise_data_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "data_batch_3"
    path.write_bytes(_corruptions()[name])
    with pytest.raises(DataError) as e:
        load_batch(path)
    assert str(path) in str(e.value), str(e.value)


def test_random_corruption_never_escapes_as_another_error(tmp_path: Path) -> None:
    good = pickle.dumps(batch_dict(X5, Y5), protocol=2)
    rng = np.random.default_rng(2)
    path = tmp_path / "b"
    outcomes = set()
    for _ in range(300):
        raw = bytearray(good[: rng.integers(1, len(good) + 1)])
        for pos in rng.integers(0, len(raw), size=rng.integers(1, 4)):
            raw[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(raw))
        try:
            X, y = load_batch(path)
            assert X.shape[1] == 3072 and len(y) == len(X) and 0 <= y.min() <= y.max() <= 9
            outcomes.add("loaded")
        except DataError as e:
            assert str(path) in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


def test_missing_batch_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="klayer data fetch"):
        load_batch(tmp_path / "nope")


# --- load_cifar10 and its cache ------------------------------------------------------------


def test_full_split_and_cache_round_trip(tmp_path: Path) -> None:
    X, y = make_cifar_folder(tmp_path, rows=8)
    d1 = load_cifar10(tmp_path, val_size=10)
    assert (tmp_path / kd.CACHE_X).exists() and (tmp_path / kd.CACHE_KEY).exists()
    d2 = load_cifar10(tmp_path, val_size=10)  # from the cache
    for d in (d1, d2):
        assert isinstance(d.train.X, np.memmap)  # a view of the mapped cache, not a copy
        assert d.name == "cifar10" and d.image_shape == (3, 32, 32) and d.num_classes == 10
        assert (d.n_train, d.val.n, d.test.n, d.d) == (30, 10, 8, 3072)
        assert d.train.X.dtype == np.uint8 and d.train.y.dtype == np.int64
        np.testing.assert_array_equal(d.train.X, X[:30])
        np.testing.assert_array_equal(d.val.X, X[30:40])
        np.testing.assert_array_equal(d.test.X, X[40:])
        np.testing.assert_array_equal(np.concatenate([d.train.y, d.val.y, d.test.y]), y)
        np.testing.assert_allclose(d.mean, X[:30].mean(axis=0))
        np.testing.assert_allclose(d.std, X[:30].std(axis=0))
        assert d.classes[0] == "airplane"


def test_second_load_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar_folder(tmp_path)
    load_cifar10(tmp_path, val_size=4)
    monkeypatch.setattr(kd, "load_batch", lambda *a: pytest.fail("decoded again"))
    assert load_cifar10(tmp_path, val_size=4).n_train == 36


def test_assignment_split(tmp_path: Path) -> None:
    X, y = make_cifar_folder(tmp_path, rows=6)
    d = load_cifar10(tmp_path, split="assignment")
    np.testing.assert_array_equal(d.train.X, X[:6])
    np.testing.assert_array_equal(d.val.X, X[6:12])
    np.testing.assert_array_equal(d.test.y, y[30:])


def test_stale_or_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    make_cifar_folder(tmp_path, rows=4, seed=0)
    load_cifar10(tmp_path, val_size=2)
    X_new = RNG.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    write_batch(tmp_path / "test_batch", X_new, np.zeros(4, dtype=int))
    os.utime(tmp_path / "test_batch", ns=(1, 1))  # a different mtime even on coarse clocks
    np.testing.assert_array_equal(load_cifar10(tmp_path, val_size=2).test.X, X_new)
    (tmp_path / kd.CACHE_X).write_bytes(b"garbage")  # key still matches: arrays don't
    np.testing.assert_array_equal(load_cifar10(tmp_path, val_size=2).test.X, X_new)
    assert np.load(tmp_path / kd.CACHE_X).shape == (24, 3072)  # rewritten


def test_read_only_folder_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    X, _ = make_cifar_folder(tmp_path, rows=4)

    def refuse(*args: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(kd, "atomic_write", refuse)
    d = load_cifar10(tmp_path, val_size=2)
    np.testing.assert_array_equal(d.train.X, X[:18])
    assert not (tmp_path / kd.CACHE_X).exists() and not (tmp_path / kd.CACHE_KEY).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("val_size", [0, 40, -1])
def test_val_size_out_of_range(tmp_path: Path, val_size: int) -> None:
    make_cifar_folder(tmp_path, rows=8)
    with pytest.raises(ValueError, match="val_size"):
        load_cifar10(tmp_path, val_size=val_size)


def test_missing_or_broken_batch_in_folder(tmp_path: Path) -> None:
    make_cifar_folder(tmp_path, rows=4)
    (tmp_path / NAMES[2]).unlink()
    with pytest.raises(DataNotFoundError, match=NAMES[2]):
        load_cifar10(tmp_path, val_size=2)
    (tmp_path / NAMES[2]).write_bytes(b"\x80\x02junk")
    with pytest.raises(DataError, match=NAMES[2]):
        load_cifar10(tmp_path, val_size=2)


# --- Data, standardization, synthetic ---------------------------------------------------------


def test_standardize_uses_training_statistics() -> None:
    d = make_synthetic(seed=3)
    Z = d.standardize(d.train.X, dtype=np.float64)
    assert Z.dtype == np.float64 and Z.shape == (2000, 32)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-10)
    Z32 = d.standardize(d.val.X[:100])
    assert Z32.dtype == np.float32
    np.testing.assert_allclose(Z32, (d.val.X[:100] - d.mean) / d.std, rtol=1e-5, atol=1e-5)


def test_data_built_by_hand_floors_constant_features() -> None:
    X = np.zeros((4, 3))
    X[:, 0] = [1, 2, 3, 4]
    s = Split(X, [0, 1, 0, 1])
    d = Data(s, s, s, num_classes=2)
    assert d.std[1] > 0 and np.isfinite(d.standardize(X)).all()
    assert d.classes == ("0", "1") and d.d == 3 and d.n_train == 4
    e = d.with_transform(np.ones(3), np.full(3, 2.0))
    np.testing.assert_allclose(e.standardize(X[:1], np.float64), [[0, -0.5, -0.5]])
    with pytest.raises(ValueError):
        Split(X, [0, 1])


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b, c = make_synthetic(seed=5), make_synthetic(seed=5), make_synthetic(seed=6)
    np.testing.assert_array_equal(a.train.X, b.train.X)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.X, c.train.X)
    assert a.train.X.dtype == np.float64 and a.name == "synthetic" and a.image_shape is None
    assert (a.n_train, a.val.n, a.test.n, a.d) == (2000, 500, 500, 32)
    assert set(np.unique(a.train.y)) == set(range(10))
    # nearest training neighbour: far above chance (0.1) means the classes are learnable
    Zt, Zv = a.standardize(a.train.X, np.float64), a.standardize(a.val.X, np.float64)
    dist = (Zv**2).sum(1)[:, None] - 2 * Zv @ Zt.T + (Zt**2).sum(1)[None]
    assert (a.train.y[dist.argmin(1)] == a.val.y).mean() > 0.5


# --- the data fingerprint ----------------------------------------------------------------


def test_one_data_fingerprint_for_checkpoints_and_studies(tmp_path: Path) -> None:
    from klayer.core.config import TrainConfig
    from klayer.search import storage
    from klayer.training.trainer import Trainer

    fp = kd.data_fingerprint
    a = make_synthetic(seed=5)
    assert storage.data_fingerprint(a) == fp(a)  # what search studies record too
    assert fp(a) == fp(make_synthetic(seed=5)) and fp(a).startswith("sha256:")
    assert len({fp(a), fp(make_synthetic(seed=6)), fp(make_synthetic(seed=5, n_val=400))}) == 3
    flipped = Data(a.train, a.val, Split(a.test.X, (a.test.y + 1) % 10), num_classes=10,
                   name=a.name)
    assert fp(flipped) != fp(a)  # every label counts
    rounded = Data(Split(np.nextafter(a.train.X, np.inf), a.train.y), a.val, a.test, num_classes=10,
                   name=a.name)
    assert fp(rounded) == fp(a)  # last-bit differences of float inputs do not
    cfg = TrainConfig(dataset="synthetic", hidden=(4,), steps=1, n_batch=100)
    state = Trainer(cfg, a, run_dir=tmp_path).state_dict()
    assert str(state["data"]) == fp(a)  # what a checkpoint records
