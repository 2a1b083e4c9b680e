"""Getting datasets onto disk: CIFAR-10's download, safe extraction and checksums; digits.

Writers hold a file lock in the data folder and build under temporary names beside the
target, then rename, so an interrupted or concurrent fetch never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shlex
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from contextlib import AbstractContextManager, suppress
from pathlib import Path, PurePosixPath

import numpy as np

from klayer.data.batchfile import ChecksumError, DataError, DataNotFoundError
from klayer.data.datasets import BATCHES, Data, Split
from klayer.data.files import atomic_write, file_stats

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SIZE = 170_498_071
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# The extracted files' MD5s, as torchvision's datasets/cifar.py lists them.
CIFAR10_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
REQUIRED = BATCHES  # what a complete batches folder holds
LOCK_NAME = ".klayer-fetch.lock"
TMP_PREFIX = ".klayer-tmp-"
STAMP_NAME = ".klayer-md5-v1.json"
WARNED_PREFIX = ".klayer-md5-warned-v1-"  # + a digest of the files' sizes and mtimes
ENV_VAR = "KLAYER_DATA_DIR"
HOW_TO_GET = ("run `klayer data fetch` (downloads 170 MB) or pass --data-dir "
              "(or set $KLAYER_DATA_DIR) to a folder holding cifar-10-batches-py/ "
              f"or {ARCHIVE_NAME}")
CHUNK = 1 << 20


class ChecksumWarning(UserWarning):
    """A dataset file differs from the official one (the message names it)."""


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: ``data_dir`` if given, else $KLAYER_DATA_DIR, else the user cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("klayer"))


def _locked(root: Path) -> AbstractContextManager[object]:
    """``root``'s fetch lock, held until the ``with`` block ends: one writer at a time."""
    import filelock

    try:
        root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(root / LOCK_NAME)).acquire()
    except OSError as e:
        raise DataError(f"{root}: cannot write there ({e}); pass --data-dir with a "
                        "writable folder") from e


def _missing(folder: Path) -> list[str]:
    return [name for name in REQUIRED if not (folder / name).is_file()]


def _batches_in(root: Path) -> Path | None:
    """``root`` or ``root/cifar-10-batches-py``, the first that holds every batch file."""
    return next((p for p in (root, root / FOLDER_NAME) if not _missing(p)), None)


def _incomplete(root: Path) -> tuple[Path, list[str]] | None:
    """(folder, the batch files missing there) where some batches are but not all."""
    for place in (root, root / FOLDER_NAME):
        if len(missing := _missing(place)) < len(REQUIRED):
            return place, missing
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, root: Path, progress: bool, timeout: float) -> Path:
    """``url`` saved to a temporary file in ``root`` (removed again on any failure)."""
    from tqdm import tqdm

    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tar.gz", dir=root)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=ARCHIVE_NAME,
                      disable=not progress) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:  # the server hung up early
                raise OSError(f"connection closed after {out.tell()} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (urllib.error.URLError, http.client.HTTPException, OSError)):
            raise DataNotFoundError(
                f"could not download {url}: {e}. Without network access, download the "
                "archive by hand from that URL into a folder and pass --data-dir with that "
                "folder") from e
        raise
    return tmp


def _verify_archive(path: Path, size: int | None, md5: str | None, label: str) -> None:
    """Raise ChecksumError unless ``path`` has the expected size and MD5."""
    got = path.stat().st_size
    if size is not None and got != size:
        raise ChecksumError(f"{label}: {got} bytes, expected {size} (incomplete or wrong file)")
    if md5 is not None and (digest := _md5(path)) != md5:
        raise ChecksumError(f"{label}: MD5 {digest}, expected {md5} (corrupt or wrong file)")


def _check_member(m: tarfile.TarInfo, dest: Path, archive: Path) -> None:
    """Refuse members that are not plain files/folders or that would land outside ``dest``."""
    name = PurePosixPath(m.name)
    bad = ""
    if name.is_absolute() or m.name.startswith(("/", "\\")):
        bad = "an absolute path"
    elif ".." in name.parts or "\\" in m.name:
        bad = "a path with '..'"
    elif not (m.isfile() or m.isdir()):
        bad = "a link or special file"
    else:
        target = os.path.realpath(dest / m.name)
        if os.path.commonpath([target, os.path.realpath(dest)]) != os.path.realpath(dest):
            bad = "a path outside the target folder"
    if bad:
        raise DataError(f"{archive}: refused member {m.name!r}: {bad}")


def _extract(archive: Path, root: Path) -> Path:
    """Extract the archive's ``cifar-10-batches-py`` into ``root`` atomically; return it.

    Members are checked before anything is written, and unpacking goes to a temporary
    folder beside the target that is renamed into place only when complete.
    """
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    old = root / f"{TMP_PREFIX}old-{os.getpid()}"
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(m, tmp, archive)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
            raise DataError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from e
        if _missing(tmp / FOLDER_NAME):
            raise DataError(f"{archive}: no {FOLDER_NAME}/ with {', '.join(REQUIRED)} inside")
        final = root / FOLDER_NAME
        if final.exists():  # incomplete leftovers from elsewhere: swap them out
            os.replace(final, old)
        os.replace(tmp / FOLDER_NAME, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def fetch_cifar10(data_dir: str | Path | None = None, url: str = CIFAR10_URL,
                  md5: str | None = CIFAR10_MD5, size: int | None = CIFAR10_SIZE,
                  progress: bool = True, timeout: float = 60) -> Path:
    """Download, verify and unpack CIFAR-10 into the data folder; return the batches folder.

    Does nothing if the batches are already there; reuses a verified archive already in
    the folder. Safe to run from several processes at once: one downloads, the others
    wait for the lock and then find the result. Failures leave no partial files.
    """
    root = resolve_data_dir(data_dir)
    with _locked(root):
        if not _missing(root / FOLDER_NAME):
            return root / FOLDER_NAME
        archive = root / ARCHIVE_NAME
        if archive.is_file():
            try:
                _verify_archive(archive, size, md5, str(archive))
                return _extract(archive, root)
            except ChecksumError:
                pass  # a stale or partial copy: download a fresh one to replace it
        tmp = _download(url, root, progress, timeout)
        try:
            _verify_archive(tmp, size, md5, f"download of {url}")
            folder = _extract(tmp, root)
            os.chmod(tmp, 0o644)  # mkstemp made it private
            os.replace(tmp, archive)
        finally:
            tmp.unlink(missing_ok=True)
        return folder


def _file_verdicts(folder: Path, stats: dict[str, list[int]]) -> dict[str, bool]:
    """For each official file present, whether its MD5 matches; remembered in a stamp keyed
    by the files' sizes and mtimes, so batches are not hashed on every training start."""
    stamp = folder / STAMP_NAME
    try:
        saved = json.loads(stamp.read_text())
        if saved["stats"] == stats:
            return {n: bool(saved["ok"][n]) for n in stats}
    except (OSError, ValueError, TypeError, KeyError):
        pass
    ok = {n: _md5(folder / n) == CIFAR10_FILE_MD5[n] for n in stats}
    with suppress(OSError):  # read-only data: fine, we hash again next time
        atomic_write(stamp, lambda f: f.write(json.dumps({"stats": stats, "ok": ok}).encode()))
    return ok


def _checksum_problem(message: str, strict: bool) -> None:
    if strict:
        raise ChecksumError(message)
    warnings.warn(ChecksumWarning(message + " (said once for these files; "
                                  "--strict-checksums refuses them)"), stacklevel=3)


def _first_warning(folder: Path, stats: dict[str, list[int]]) -> bool:
    """True the first time the checksum warning for these files is due, in any process.

    Every command and worker locates the data again; the warning is worth showing once
    per folder. The marker, created exclusively, is named by a digest of the files'
    sizes and mtimes, so changed files warn again. A read-only folder warns every time.
    """
    digest = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]
    marker = folder / f"{WARNED_PREFIX}{digest}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        return True
    for old in folder.glob(f"{WARNED_PREFIX}*"):  # markers of earlier versions of the files
        if old != marker:
            with suppress(OSError):
                old.unlink()
    return True


def _unpack_archive(root: Path, strict: bool) -> Path | None:
    """The batches folder unpacked from a lone archive in ``root``; None if there is none."""
    archive = root / ARCHIVE_NAME
    if not archive.is_file():
        return None
    with _locked(root):
        if not _missing(root / FOLDER_NAME):  # another process got there first
            return root / FOLDER_NAME
        try:
            _verify_archive(archive, CIFAR10_SIZE, CIFAR10_MD5, str(archive))
        except ChecksumError as e:
            _checksum_problem(f"{e}; it is not the official CIFAR-10 archive", strict)
        return _extract(archive, root)


def locate_cifar10(data_dir: str | Path | None = None, strict_checksums: bool = False) -> Path:
    """The ``cifar-10-batches-py`` folder for ``data_dir`` (see ``resolve_data_dir``).

    ``data_dir`` may be that folder itself, a folder holding it, or a folder holding only
    ``cifar-10-python.tar.gz`` (unpacked in place, once). Files that differ from the
    official ones give a ChecksumWarning (once per folder, see ``_first_warning``), or
    a ChecksumError when ``strict_checksums``.
    """
    root = resolve_data_dir(data_dir)
    if error := _no_data_dir(root, data_dir):
        raise error
    folder = _batches_in(root) or _unpack_archive(root, strict_checksums)
    if folder is None:
        if partial := _incomplete(root):
            raise DataNotFoundError(f"CIFAR-10 in {partial[0]} is incomplete, "
                                    f"{', '.join(partial[1])} missing: {HOW_TO_GET}")
        raise DataNotFoundError(f"CIFAR-10 not found in {root}: {HOW_TO_GET}")
    stats = file_stats(folder, CIFAR10_FILE_MD5)
    differ = [name for name, ok in _file_verdicts(folder, stats).items() if not ok]
    if differ and (strict_checksums or _first_warning(folder, stats)):
        _checksum_problem(f"{folder}: MD5 of {', '.join(differ)} differs from the official "
                          "CIFAR-10 files (a modified or stand-in copy?)", strict_checksums)
    return folder


def _fetch_command(root: Path, data_dir: str | Path | None) -> str:
    """The ``klayer data fetch`` command line that downloads into ``root``."""
    return "klayer data fetch" + (f" --data-dir {shlex.quote(str(root))}" if data_dir else "")


def _no_data_dir(root: Path, data_dir: str | Path | None) -> DataNotFoundError | None:
    """The error for a data folder named by --data-dir or $KLAYER_DATA_DIR that is not a
    folder, so that a typo reads as one rather than as missing data; else None."""
    who = "--data-dir" if data_dir else f"${ENV_VAR}" if os.environ.get(ENV_VAR) else None
    if root.is_dir() or who is None:
        return None
    if root.exists():
        return DataNotFoundError(f"data folder {root} (from {who}) is a file, not a folder; "
                                 f"name the folder that holds {FOLDER_NAME}/ or {ARCHIVE_NAME}")
    return DataNotFoundError(
        f"data folder {root} (from {who}) does not exist; check the path, or run "
        f"`{_fetch_command(root, data_dir)}` to download CIFAR-10 (170 MB) into it")


def cifar10_presence(data_dir: str | Path | None = None) -> tuple[Path, str]:
    """The data folder and one line saying whether CIFAR-10 is there and what to run.

    For ``klayer data where``; reads no file's contents, so it is instant.
    """
    root = resolve_data_dir(data_dir)
    fetch_it = f"run `{_fetch_command(root, data_dir)}`"
    if error := _no_data_dir(root, data_dir):
        return root, f"CIFAR-10 missing: {error}"
    if folder := _batches_in(root):
        return root, f"CIFAR-10 batches found in {folder}"
    if (root / ARCHIVE_NAME).is_file():
        return root, (f"CIFAR-10 archive only ({ARCHIVE_NAME}): the first training "
                      f"command unpacks it, or {fetch_it} to verify and unpack it now")
    if partial := _incomplete(root):
        return root, (f"CIFAR-10 incomplete in {partial[0]} ({', '.join(partial[1])} "
                      f"missing): {fetch_it}")
    return root, (f"CIFAR-10 missing: {fetch_it} (downloads 170 MB), or pass --data-dir "
                  "with a folder that holds it")


def load_digits_data(seed: int = 0, val_fraction: float = 0.15,
                     test_fraction: float = 0.15) -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline), split at random by seed."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be > 0 and sum to < 1, "
                         f"got {val_fraction} and {test_fraction}")
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, round(test_fraction * len(y)))
    n_val = max(1, round(val_fraction * len(y)))
    parts = np.split(order, [n_test, n_test + n_val])  # test, val, train
    test, val, train = (Split(X[p].astype(np.float64), y[p]) for p in parts)
    return Data(train, val, test, num_classes=10, name="digits")
