"""Files written and read safely: the one atomic writer and the one defensive ``.npz`` reader.

Every file klayer writes (run folders, checkpoints, model files, figures, reports, the
decoded data cache) goes through ``atomic_write``: readers see the old file or the
complete new one, never a part. Every ``.npz`` it reads (model files, checkpoints) goes
through ``read_npz``: no pickles, no array header trusted before the bytes are counted.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np

_MAX_HEADER = 1 << 16
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


class ModelFileError(ValueError):
    """A model file or checkpoint is missing, corrupt, truncated or not klayer's."""


class FormatError(ModelFileError):
    """A klayer file of another format version (an older klayer's, or an unknown one):
    klayer reads only the format it writes. A usage-level refusal (exit 2), not damage."""


def check_format(path: str | Path, found: object, expected: str) -> None:
    """FormatError naming ``path``, the format found and the one expected, unless they match."""
    if found != expected:
        shown = "no format" if found is None else f"format {found!r}"
        raise FormatError(f"{path}: {shown}, but this klayer reads only {expected!r} (files "
                          "of other klayer versions are not read; make it again)")


def file_stats(folder: Path, names: Iterable[str]) -> dict[str, list[int]]:
    """[size, mtime_ns] of each of ``names`` present in ``folder``: what caches key on."""
    stats = {}
    for name in names:
        if (folder / name).is_file():
            st = (folder / name).stat()
            stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file so that readers see the old file or the complete new one, never a part.

    Writes to a temporary file in the same folder, fsyncs it, renames it over ``path``
    and fsyncs the folder. On any error the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an uncompressed ``.npz`` without pickles, read defensively.

    Unlike ``np.load``, which allocates whatever shape a (corrupt) header claims before
    noticing the data is short, each member's header must account for exactly the
    bytes stored before anything is allocated; the zip CRCs are checked. Raises
    ModelFileError naming the file for anything else: missing, truncated, corrupt,
    compressed, object arrays.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return {info.filename[: -len(".npy")]: _read_member(zf, info)
                    for info in zf.infolist()}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile,
            RuntimeError, NotImplementedError, MemoryError, OverflowError) as e:
        raise ModelFileError(f"{path}: not a readable npz file "
                             f"({type(e).__name__}: {e})") from None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member, its header checked against the bytes stored before reading."""
    name = info.filename
    if not name.endswith(".npy"):
        raise ModelFileError(f"unexpected member {name!r}")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ModelFileError(f"member {name!r} is compressed; klayer reads only "
                             "uncompressed .npz files (np.savez, not savez_compressed)")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            raise ModelFileError(f"{name}: unsupported .npy version {version[0]}.{version[1]}")
        shape, fortran, dtype = _HEADER_READERS[version](f, max_header_size=_MAX_HEADER)
        if dtype.hasobject or dtype.itemsize == 0:
            raise ModelFileError(f"{name}: dtype {dtype} is not a plain array")
        count = math.prod(int(n) for n in shape)
        expected, stored = count * dtype.itemsize, info.file_size - f.tell()
        if expected != stored:
            raise ModelFileError(f"{name}: header promises {expected} bytes, {stored} stored")
        raw = f.read()  # checks the CRC at the end
        if len(raw) != expected:
            raise ModelFileError(f"{name}: truncated")
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(
        shape, order="F" if fortran else "C").copy()


def release_pages(a: np.ndarray) -> bool:
    """Drop the pages of ``a`` from this process's resident memory when it lies in a
    read-only file mapping (an ``np.memmap`` of mode "r", as CIFAR-10's decoded cache is
    opened): they stay in the page cache, and a later read maps them back from the file.
    Memory of the process's own, a writable mapping or a system without ``madvise`` is
    left alone. Returns whether the pages were dropped."""
    import ctypes
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    if not isinstance(a, np.memmap) or getattr(a, "mode", None) != "r" or advice is None \
            or a.nbytes == 0 or not a.flags.c_contiguous:
        return False
    page = mmap.PAGESIZE
    start = a.__array_interface__["data"][0]
    first = start - start % page  # madvise takes whole pages from a page boundary
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(start + a.nbytes - first),
                            ctypes.c_int(advice)) == 0
    except (OSError, AttributeError):  # no C library to call, or no madvise in it
        return False
