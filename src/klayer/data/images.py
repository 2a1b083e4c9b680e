"""Images a user brings, as CIFAR-10 rows: PNG/JPEG files, ``.npy`` arrays, batch files.

Every input becomes uint8 rows of 3,072 values in CIFAR-10's order (the 1,024 red
pixels, then green, then blue, each row by row), the layout the models were trained on.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from klayer.data.batchfile import D_CIFAR, DataError, load_batch

SIDE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_images(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(X (n, 3072) uint8, a label per row) from one file; DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _picture(path)[None, :], [path.name]
    if suffix == ".npy":
        X = _array(path)
    else:  # a CIFAR-10 batch file (data_batch_1, test_batch, ...)
        X, _ = load_batch(path)
    return X, [f"{path.name}[{i}]" for i in range(len(X))]


def _picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if rgb.size != (SIDE, SIDE):
        warnings.warn(f"{path}: resized from {rgb.size[0]}x{rgb.size[1]} to {SIDE}x{SIDE} "
                      "RGB, as CIFAR-10's images are", stacklevel=2)
        rgb = rgb.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, np.uint8).transpose(2, 0, 1).reshape(-1)  # (32, 32, 3) -> 3072


def _array(path: Path) -> np.ndarray:
    """A .npy of n x 3072 (CIFAR rows) or n x 32 x 32 x 3 (pictures) uint8 values."""
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a NumPy array file ({e})") from None
    if a.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 pixels (0..255), found {a.dtype}")
    if a.shape[-3:] == (SIDE, SIDE, 3) and a.ndim in (3, 4):
        return a.reshape(-1, SIDE, SIDE, 3).transpose(0, 3, 1, 2).reshape(-1, D_CIFAR)
    if a.shape[-1] == D_CIFAR and a.ndim in (1, 2):
        return a.reshape(-1, D_CIFAR)
    raise DataError(f"{path}: shape {a.shape}; expected n x {D_CIFAR} or n x 32 x 32 x 3")
