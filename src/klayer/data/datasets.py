"""Datasets: CIFAR-10 with a decoded cache, a synthetic stand-in, splits, standardization.

Images stay uint8 (60,000 x 3072 is 184 MB; float64 would be 1.5 GB): ``Data.standardize``
turns the rows the training loop asks for into floats, one mini-batch at a time. The first
CIFAR-10 load writes the decoded pixels beside the batches as ``.npy`` files, so later
loads map them from disk in well under a second. Whitened data (``Data.whitened``) are
the exception: their training split is whitened once and kept whole, in the training dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from klayer.core import kernels
from klayer.core.network import EVAL_CHUNK
from klayer.data import whitening
from klayer.data.batchfile import D_CIFAR, load_batch
from klayer.data.files import atomic_write, file_stats, release_pages

log = logging.getLogger(__name__)
Decoded = tuple[np.ndarray, np.ndarray, list[int]]  # X (N, 3072) uint8, y (N,), rows per batch

CIFAR_SHAPE = (3, 32, 32)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")
BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CACHE_X = "klayer-decoded-v1-X.npy"
CACHE_Y = "klayer-decoded-v1-y.npy"
CACHE_KEY = "klayer-decoded-v1.json"
STD_FLOOR = 1e-8  # a constant feature then standardizes to 0 instead of dividing by 0
SPLITS = ("full", "assignment")
SYNTH_SPREAD = 1.1  # blob spread vs unit noise: an MLP gets ~90 %, a linear model ~65 %
SYNTH_MODES = 5  # blobs per class


def feature_stats(X: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) std of X (n, d), as float64 (d,) arrays.

    Integer inputs are summed exactly in int64, ``chunk`` rows at a time, so uint8
    images (even a memory map) never exist as one big float array.
    """
    n = X.shape[0]
    if X.dtype.kind not in "iu":
        return X.mean(axis=0, dtype=np.float64), X.std(axis=0, dtype=np.float64)
    s1 = np.zeros(X.shape[1], dtype=np.int64)
    s2 = np.zeros(X.shape[1], dtype=np.int64)
    for i in range(0, n, chunk):
        c = X[i : i + chunk].astype(np.int64)
        s1 += c.sum(axis=0)
        s2 += np.einsum("ij,ij->j", c, c)
    var = (n * s2 - s1 * s1) / float(n) ** 2  # exact numerator: no cancellation
    return s1 / n, np.sqrt(np.maximum(var, 0.0))


@dataclass(eq=False)
class Split:
    """One part of a dataset: raw inputs X (n, d) (uint8 images or floats), labels y (n,)."""

    X: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        if self.X.ndim != 2 or self.y.shape != (self.X.shape[0],):
            raise ValueError(f"Split needs X (n, d) and y (n,), got {self.X.shape} "
                             f"and {self.y.shape}")

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.X.shape[0])


@dataclass(eq=False)
class Data:
    """Train/val/test splits plus the per-feature mean and std that standardize them.

    Leave ``mean``/``std`` out to compute them from ``train`` only, so nothing leaks from
    validation or test data; ``classes`` defaults to "0", "1", ... .
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str = "custom"
    image_shape: tuple[int, int, int] | None = None
    mean: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    std: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    classes: tuple[str, ...] = ()
    whiten: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty((0, 0)))
    _scale: dict[Any, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False)
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        d = self.d
        for part in (self.val, self.test):
            if part.X.shape[1] != d:
                raise ValueError(f"splits differ in width: {part.X.shape[1]} != {d}")
        if self.mean.size == 0 or self.std.size == 0:
            self.mean, self.std = feature_stats(self.train.X)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.maximum(np.asarray(self.std, dtype=np.float64), STD_FLOOR)
        if self.mean.shape != (d,) or self.std.shape != (d,):
            raise ValueError(f"mean/std must have shape ({d},), got {self.mean.shape} "
                             f"and {self.std.shape}")
        self.whiten = np.asarray(self.whiten, dtype=np.float64)
        if self.whiten.size and self.whiten.shape != (d, d):
            raise ValueError(f"whiten must have shape ({d}, {d}), got {self.whiten.shape}")
        if not self.classes:
            self.classes = tuple(str(i) for i in range(self.num_classes))

    @property
    def d(self) -> int:
        """Input dimension."""
        return int(self.train.X.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return self.train.n

    def standardize(self, X_raw: np.ndarray, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """(X_raw - mean) / std, then whitened if ``whiten`` is set: a new (n, d) array."""
        return standardized(X_raw, *self._scaling(dtype), self.whitening(dtype))

    def whitening(self, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """The whitening matrix (d, d) in ``dtype``, converted once and kept (empty
        without whitening)."""
        return self._typed("whiten", self.whiten, dtype)

    def train_rows(self, idx: np.ndarray, dtype: npt.DTypeLike = np.float32,
                   out: np.ndarray | None = None) -> np.ndarray:
        """``standardize(train.X[idx])``: a mini-batch, in one fused pass where it can be.

        With the C kernels, float32 and uint8 rows, the rows are gathered, converted and
        standardized in one pass (same rounding as ``standardize``) into ``out`` when it
        fits: a training loop's buffer, reused so that no step pays page faults for a
        new 1.2 MB array. Whitened rows come from the whole training split, whitened
        once (``standardize`` in chunks: the same values, up to the rounding of BLAS,
        which may sum a product's terms in another order for another number of rows)
        and kept.
        """
        X_raw = self.train.X
        whole = self.whitened_train(dtype)
        if whole is not None:
            if (out is None or out.shape != (len(idx), self.d) or out.dtype != whole.dtype
                    or not out.flags.writeable):
                return whole[idx]
            return np.take(whole, idx, axis=0, out=out)
        shift, inv_std = self._scaling(dtype)
        if (X_raw.dtype == np.uint8 and X_raw.ndim == 2 and X_raw.flags.c_contiguous
                and kernels.enabled(shift, inv_std)):
            return kernels.gather_standardize(X_raw, idx, shift, inv_std, out)
        return self.standardize(X_raw[idx], dtype)

    def whitened_train(self, dtype: npt.DTypeLike = np.float32) -> np.ndarray | None:
        """The training split standardized and whitened, whole (n, d) in ``dtype``: made
        on the first call (``standardize`` in chunks) and kept; None without whitening.
        Once it is made, the raw training rows' file pages leave the resident memory
        (``files.release_pages``): training and evaluation read the kept rows instead."""
        if not self.whiten.size:
            return None
        key = ("train", np.dtype(dtype))
        if key not in self._cache:
            X_raw = self.train.X
            whole = np.empty(X_raw.shape, dtype)  # (n, d), filled a chunk at a time
            for i in range(0, len(X_raw), EVAL_CHUNK):
                whole[i : i + EVAL_CHUNK] = self.standardize(X_raw[i : i + EVAL_CHUNK], dtype)
            self._cache[key] = whole
            release_pages(X_raw)
        return self._cache[key]

    def kept_rows(self, X_raw: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray | None:
        """The kept whitened rows of X_raw when it is the training split or its first rows
        (the same memory) and ``whitened_train(dtype)`` was made; else None."""
        whole, train = self._cache.get(("train", np.dtype(dtype))), self.train.X
        if (whole is None or X_raw.ndim != 2 or len(X_raw) > len(train)
                or X_raw.strides != train.strides
                or X_raw.__array_interface__["data"][0] != train.__array_interface__["data"][0]):
            return None
        return whole[: len(X_raw)]

    def chunks(self, X_raw: np.ndarray, dtype: npt.DTypeLike = np.float32,
               size: int = EVAL_CHUNK) -> Iterator[np.ndarray]:
        """``standardize`` of X_raw, ``size`` rows at a time (views of the kept whitened
        rows where they serve: not to be written)."""
        kept = self.kept_rows(X_raw, dtype)
        for i in range(0, len(X_raw), size):
            yield kept[i : i + size] if kept is not None else self.standardize(
                X_raw[i : i + size], dtype)

    def _scaling(self, dtype: npt.DTypeLike) -> tuple[np.ndarray, np.ndarray]:
        """The shift (mean) and scale (1 / std) in ``dtype``, made once per dtype: the
        standardizations run once per mini-batch."""
        key = np.dtype(dtype)
        if key not in self._scale:
            self._scale[key] = scaling(self.mean, self.std, key)
        return self._scale[key]

    def _typed(self, name: str, a: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
        key = (name, np.dtype(dtype))
        if key not in self._cache:
            self._cache[key] = a.astype(dtype)
        return self._cache[key]

    def with_transform(self, mean: np.ndarray, std: np.ndarray,
                       whiten: np.ndarray | None = None) -> Data:
        """A copy (sharing the splits) that standardizes (and whitens) as given."""
        return replace(self, mean=np.asarray(mean), std=np.asarray(std),
                       whiten=np.empty((0, 0)) if whiten is None else np.asarray(whiten))

    def whitened(self, kind: str, eps: float) -> Data:
        """A copy whitened by ``kind`` (none, pca, zca; see ``whitening.fit``), fitted on the
        training split's standardized rows only. The latest one is kept (searches and
        experiments train many nets on one Data)."""
        if kind == "none":
            return self
        kept = self._cache.get("whitened")  # one copy: each holds a whitened training split
        if kept is None or kept[0] != (kind, eps):
            W = whitening.fit(self.chunks(self.train.X, np.float64), self.d, kind, eps)
            copy = self.with_transform(self.mean, self.std, W)
            if kind == "pca":  # principal coordinates are no image: nothing may flip them
                copy = replace(copy, image_shape=None)
            self._cache["whitened"] = kept = ((kind, eps), copy)
        return kept[1]

    def transform_arrays(self) -> dict[str, np.ndarray]:
        """What a model file keeps of the inputs' transform: mean, std (and whiten)."""
        arrays = {"mean": self.mean, "std": self.std}
        return {**arrays, "whiten": self.whiten} if self.whiten.size else arrays


def scaling(mean: np.ndarray, std: np.ndarray,
            dtype: npt.DTypeLike) -> tuple[np.ndarray, np.ndarray]:
    """The shift (mean) and scale (1 / std) of a standardization, in ``dtype``."""
    return np.asarray(mean).astype(dtype), (1.0 / np.asarray(std)).astype(dtype)


def standardized(X_raw: np.ndarray, shift: np.ndarray, inv_std: np.ndarray,
                 whiten: np.ndarray | None = None) -> np.ndarray:
    """(X_raw - shift) * inv_std, then @ ``whiten`` (d, d) when it has any entries: a new
    (n, d) array in shift's dtype. The one transform of inputs: training, evaluation and
    ``klayer predict`` (the C gather rounds as this does)."""
    out = np.array(X_raw, dtype=shift.dtype)  # a plain copy, even of a memmap slice
    out -= shift
    out *= inv_std
    if whiten is not None and whiten.size:
        out = out @ whiten  # (n, d) @ (d, d)
    return out


def data_fingerprint(data: Data) -> str:
    """sha256 of the dataset's name, shapes, every label and 64 sample rows per split: equal
    for the same data. What a checkpoint and a search study record of their data.

    Float inputs are rounded to 6 digits first, so the same synthetic data made on
    another machine (last-bit differences of sin) has the same fingerprint.
    """
    h = hashlib.sha256()
    meta = {"name": data.name, "num_classes": data.num_classes,
            "image_shape": list(data.image_shape) if data.image_shape else None,
            "shapes": [list(s.X.shape) for s in (data.train, data.val, data.test)],
            "dtype": str(data.train.X.dtype)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for split in (data.train, data.val, data.test):
        n = split.n
        rows = np.asarray(split.X[np.unique(np.linspace(0, n - 1, min(n, 64)).astype(int))])
        if rows.dtype.kind == "f":
            rows = np.round(rows.astype(np.float64), 6).astype("<f4")
        h.update(np.ascontiguousarray(rows).tobytes())
        h.update(np.ascontiguousarray(split.y, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


def _read_cache(folder: Path, files: dict[str, list[int]]) -> Decoded | None:
    """The cached (X memmap, y, rows per batch) if made from exactly these ``files``;
    None for anything stale, unreadable or malformed, so the caller rebuilds it."""
    try:
        key = json.loads((folder / CACHE_KEY).read_text())
        rows = [int(r) for r in key["rows"]]
        if key["files"] != files or len(rows) != len(files) or min(rows) < 1:
            return None
        X = np.load(folder / CACHE_X, mmap_mode="r", allow_pickle=False)
        y = np.load(folder / CACHE_Y, allow_pickle=False)
    except (OSError, ValueError, EOFError, TypeError, KeyError) as e:
        log.debug("ignoring decoded cache in %s: %s", folder, e)
        return None
    n = sum(rows)
    if (X.shape != (n, D_CIFAR) or X.dtype != np.uint8 or y.shape != (n,)
            or y.dtype != np.int64 or y.min() < 0 or y.max() > 9):
        log.debug("ignoring malformed decoded cache in %s", folder)
        return None
    return X, y, rows


def _write_cache(folder: Path, key: dict[str, Any], X: np.ndarray, y: np.ndarray) -> None:
    """Store the decoded arrays; a folder that is not writable only means no cache."""
    try:
        (folder / CACHE_KEY).unlink(missing_ok=True)  # invalid until both arrays are in
        atomic_write(folder / CACHE_X, lambda f: np.save(f, X))
        atomic_write(folder / CACHE_Y, lambda f: np.save(f, y))
        atomic_write(folder / CACHE_KEY, lambda f: f.write(json.dumps(key).encode()))
    except OSError as e:
        log.debug("not caching decoded CIFAR-10 in %s: %s", folder, e)


def _load_all(folder: Path) -> Decoded:
    """Every image, batches 1-5 then test, with each batch's row count.

    Maps the decoded cache when it matches the batch files' sizes and mtimes; otherwise
    decodes the batches (a missing one is DataNotFoundError), (re)writes the cache and
    maps that, so both paths use memory alike.
    """
    files = file_stats(folder, BATCHES)
    if cached := _read_cache(folder, files):
        return cached
    parts = [load_batch(folder / name) for name in BATCHES]
    rows = [len(y) for _, y in parts]
    X, y = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    del parts
    _write_cache(folder, {"files": files, "rows": rows}, X, y)
    return _read_cache(folder, files) or (X, y, rows)


def load_cifar10(folder: str | Path, split: str = "full", val_size: int = 5000) -> Data:
    """CIFAR-10 from a ``cifar-10-batches-py`` folder, pixels kept as uint8.

    split="full": train on batches 1-5 except their last ``val_size`` images, which
    validate (45,000 / 5,000 by default). split="assignment": train on data_batch_1,
    validate on data_batch_2. Both test on test_batch.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    X, y, rows = _load_all(Path(folder))
    n_train = sum(rows[:-1])
    if split == "full":
        if not 1 <= val_size <= n_train - 1:
            raise ValueError(f"val_size must be in [1, {n_train - 1}], got {val_size}")
        cuts = [0, n_train - val_size, n_train]
    else:
        cuts = [0, rows[0], rows[0] + rows[1]]
    train, val = (Split(X[a:b], y[a:b]) for a, b in pairwise(cuts))
    test = Split(X[n_train:], y[n_train:])
    return Data(train, val, test, num_classes=10, name="cifar10", image_shape=CIFAR_SHAPE,
                classes=CIFAR_CLASSES)


def make_synthetic(n_train: int = 2000, n_val: int = 500, n_test: int = 500, d: int = 32,
                   num_classes: int = 10, seed: int = 0) -> Data:
    """A seeded, learnable stand-in for CIFAR-10 that needs no files.

    Each class is a union of a few Gaussian blobs scattered among the other classes'
    blobs, so a hidden layer helps: a linear classifier cannot wrap one class's blobs
    without taking in others'. Inputs are float64 (n, d).
    """
    if min(n_train, n_val, n_test, d) < 1 or num_classes < 2:
        raise ValueError("make_synthetic needs n_train, n_val, n_test, d >= 1 and "
                         "num_classes >= 2")
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, SYNTH_SPREAD, size=(num_classes, SYNTH_MODES, d))
    n = n_train + n_val + n_test
    y = rng.integers(0, num_classes, size=n)
    mode = rng.integers(0, SYNTH_MODES, size=n)
    X = centers[y, mode] + rng.normal(0.0, 1.0, size=(n, d))
    X += np.sin(X)  # the twist: blobs bend, so even one per class is not exactly linear
    cuts = (n_train, n_train + n_val)
    train, val, test = map(Split, np.split(X, cuts), np.split(y, cuts))
    return Data(train, val, test, num_classes=num_classes, name="synthetic")
