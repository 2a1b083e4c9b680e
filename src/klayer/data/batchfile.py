"""One CIFAR-10 "python version" batch file, read safely; the errors of dataset files.

The batches are pickled dicts, and unpickling runs code named in the file, so they go
through ``_SafeUnpickler``, which only rebuilds NumPy arrays; ``load_batch`` then checks
what came out.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

D_CIFAR = 3072  # 3 x 32 x 32 pixels per row


class DataError(Exception):
    """A dataset file is missing, corrupt, truncated or foreign; the message names it."""


class DataNotFoundError(DataError):
    """The dataset is not where we looked; the message says how to get it."""


class ChecksumError(DataError):
    """A file's size or MD5 differs from the expected one."""


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    """``name`` from the first of ``modules`` that imports (numpy 2 renamed core to _core)."""
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {modules} has {name}")  # pragma: no cover


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes; latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_reconstruct = _numpy_attr(_MULTIARRAY, "_reconstruct")
_frombuffer = _numpy_attr(_NUMERIC, "_frombuffer")

# Everything a CIFAR-10 batch (pickled by Python 2 or 3, any protocol) needs to rebuild
# its arrays; none of these can run code of the file's choosing.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "_reconstruct"): _reconstruct for m in _MULTIARRAY},
    **{(m, "ndarray"): np.ndarray for m in _MULTIARRAY},
    **{(m, "dtype"): np.dtype for m in _MULTIARRAY},
    **{(m, "_frombuffer"): _frombuffer for m in _NUMERIC},
    ("_codecs", "encode"): _latin1_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_SAFE_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _unpickle(path: Path) -> Any:
    """The object pickled in ``path``, loaded without executing anything foreign."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: no such file; run `klayer data fetch` or pass "
                                "--data-dir") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    try:
        # Python 2 pickles: strs stay bytes, so keys are b"data", b"labels".
        return _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # corrupt bytes raise anything from EOFError to MemoryError
        raise DataError(f"{path}: not a readable CIFAR-10 batch "
                        f"({type(e).__name__}: {e})") from e


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """``batch[key]`` under a bytes or str key."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: no {key!r} entry (keys: {sorted(map(repr, batch))[:6]})")


def load_batch(path: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file as (X (n, 3072) uint8, y (n,) int64), validated.

    Raises DataError naming the file if it is not a dict holding a 2-D uint8 ``data``
    array with 3072 columns and ``labels`` of the same length in 0..num_classes-1.
    """
    path = Path(path)
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, found {type(batch).__name__}")
    X, labels = _field(batch, "data", path), _field(batch, "labels", path)
    if not isinstance(X, np.ndarray) or X.dtype != np.uint8:
        what = X.dtype if isinstance(X, np.ndarray) else type(X).__name__
        raise DataError(f"{path}: data must be a uint8 array, found {what}")
    if X.ndim != 2 or X.shape[1] != D_CIFAR or X.shape[0] < 1:
        raise DataError(f"{path}: data has shape {X.shape}, expected (n >= 1, {D_CIFAR})")
    try:
        y = np.asarray(labels)
    except Exception as e:
        raise DataError(f"{path}: labels are not a list of integers ({e})") from e
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be a list of integers, found {y.dtype} {y.shape}")
    if len(y) != len(X):
        raise DataError(f"{path}: {len(y)} labels for {len(X)} images")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{path}: labels outside 0..{num_classes - 1} "
                        f"(min {y.min()}, max {y.max()})")
    return np.ascontiguousarray(X), y.astype(np.int64)
