"""Checkpoint files: a run's complete state as one ``.npz``, written atomically, the last two kept.

A checkpoint is a flat mapping of plain arrays (no pickles, so
``np.load(path, allow_pickle=False)`` reads it) saved as
``RUN_DIR/checkpoints/ckpt-<step>.npz`` (step zero-padded to 8 digits) with two more keys:

* ``format``  0-d string ``"klayer-checkpoint-2"``
* ``digest``  0-d string, SHA-256 over every other key's name, dtype, shape and bytes

Writing goes through ``files.atomic_write`` (temporary file, fsync, rename, fsync of the
folder), so a crash leaves the old checkpoints and at most a stray ``.ckpt-*.tmp`` file.
After each write all but the newest ``keep`` checkpoints are removed.

Reading never unpickles and never trusts an array header: each member's shape and dtype
must account for exactly the bytes stored, the zip CRCs and the digest must match.
``load_latest`` tries the newest checkpoint first and falls back to older ones (with a
warning per unusable file, which is renamed to ``*.corrupt``) but never silently
starts over: if checkpoints exist and none is usable it raises CheckpointError.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from klayer.data.files import FormatError, ModelFileError, atomic_write, check_format, read_npz

FORMAT = "klayer-checkpoint-2"
FOLDER = "checkpoints"
KEEP = 2
_NAME = re.compile(r"ckpt-(\d+)\.npz")


class CheckpointError(ModelFileError):
    """A checkpoint file is missing, corrupt, truncated, foreign or does not fit the run."""


class CheckpointFormatError(CheckpointError, FormatError):
    """A checkpoint of another format than ``FORMAT``: refused (exit 2), never skipped."""


def path_for(folder: str | Path, step: int) -> Path:
    """The file name of the checkpoint after ``step`` updates."""
    return Path(folder) / f"ckpt-{step:08d}.npz"


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the arrays' names, dtypes, shapes and contents (keys in sorted order)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        if key in ("format", "digest"):
            continue
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(folder: str | Path, step: int, arrays: dict[str, np.ndarray],
         keep: int = KEEP) -> Path:
    """Write ``arrays`` as the checkpoint for ``step`` into ``folder``; prune older ones.

    Raises OSError (disk full, read-only folder, ...) with the older checkpoints intact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in out.items():
        if v.dtype.hasobject:
            raise TypeError(f"checkpoint entry {k!r} is an object array")
    out["format"] = np.array(FORMAT)
    out["digest"] = np.array(digest(out))
    path = path_for(folder, step)
    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **out))
    for _, old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``ckpt-<step>.npz`` in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def remove_temporaries(folder: str | Path, pattern: str = ".ckpt-*.tmp") -> list[Path]:
    """Delete the half-written files (``atomic_write``'s ``.<name>.*.tmp``) a crash left."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(pattern):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def load(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint's arrays (without ``format`` and ``digest``), verified.

    Raises CheckpointError naming the file if it is missing, truncated, corrupt, holds
    anything but plain arrays, is not a klayer checkpoint or fails its digest;
    CheckpointFormatError (a FormatError) if its format is another than ``FORMAT``.
    """
    path = Path(path)
    try:
        arrays = read_npz(path)
    except ModelFileError as e:
        raise CheckpointError(str(e).replace("npz file", "checkpoint")) from None
    fmt = arrays.get("format")
    if fmt is None or fmt.shape != () or fmt.dtype.kind != "U":
        raise CheckpointError(f"{path}: not a klayer checkpoint (no format key)")
    try:
        check_format(path, str(fmt[()]), FORMAT)
    except FormatError as e:
        raise CheckpointFormatError(str(e)) from None
    stored = arrays.get("digest")
    if stored is None or stored.shape != () or stored.dtype.kind != "U":
        raise CheckpointError(f"{path}: no digest")
    if str(stored[()]) != digest(arrays):
        raise CheckpointError(f"{path}: digest mismatch (the file is corrupt)")
    del arrays["format"], arrays["digest"]
    return arrays


def load_latest(folder: str | Path, restore: Callable[[dict[str, np.ndarray]], None],
                warn: Callable[[str], None]) -> tuple[int, Path] | None:
    """Restore the newest usable checkpoint in ``folder``; return its (step, path).

    ``restore(arrays)`` applies a checkpoint; it raises CheckpointError if the file's
    content does not fit (then the next older one is tried) and any other exception
    to stop the search (say, the run's settings differ). Each unusable file is reported
    through ``warn``. Once an older checkpoint is restored, the corrupt newer ones are
    renamed to ``*.corrupt`` so they never shadow the checkpoints the run writes next.
    Returns None when ``folder`` holds no checkpoint at all; raises CheckpointError
    listing every problem when it holds some (or only ``*.corrupt`` ones) but none is
    usable, and then renames nothing. A checkpoint of another format (FormatError)
    stops the search at once: it is not damaged, and is left as it is.
    """
    candidates = list_checkpoints(folder)
    problems, corrupt = [], []
    for i, (step, path) in enumerate(candidates):
        then = "; falling back to the previous one" if i + 1 < len(candidates) else ""
        try:
            arrays = load(path)
        except FormatError:  # not damaged: the newest says what the run folder holds
            raise
        except CheckpointError as e:
            problems.append(str(e))
            corrupt.append(path)
            warn(f"corrupt checkpoint {e}{then}")
            continue
        try:
            restore(arrays)
        except CheckpointError as e:
            problems.append(f"{path}: {e}")
            warn(f"unusable checkpoint {path}: {e}{then}")
            continue
        for bad in corrupt:
            try:
                bad.rename(bad.with_name(bad.name + ".corrupt"))
            except OSError:
                pass
        return step, path
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {folder}: " + "; ".join(problems))
    renamed = sorted(Path(folder).glob("ckpt-*.npz.corrupt")) if Path(folder).is_dir() else []
    if renamed:
        raise CheckpointError(f"no usable checkpoint in {folder}, only corrupt ones: "
                              + ", ".join(p.name for p in renamed))
    return None
