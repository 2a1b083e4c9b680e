"""klayer.data.fetch: download against a local server, safe extraction, locating, digits.

Every download test serves a tiny archive from 127.0.0.1; the only file a failed fetch
may leave in the data folder is the lock file (.klayer-fetch.lock), which is harmless.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest_data_helpers import cifar_archive, make_cifar_folder, md5, serve, tar_gz

from klayer.data import fetch
from klayer.data.batchfile import ChecksumError, DataError, DataNotFoundError
from klayer.data.datasets import load_cifar10
from klayer.data.fetch import (
    ARCHIVE_NAME,
    FOLDER_NAME,
    LOCK_NAME,
    ChecksumWarning,
    fetch_cifar10,
    load_digits_data,
    locate_cifar10,
    resolve_data_dir,
)


def leftovers(root: Path) -> list[str]:
    """Everything in ``root`` except the lock file."""
    return sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)


def get(root: Path, url: str, payload: bytes, **kw: object) -> Path:
    return fetch_cifar10(root, url=url, md5=md5(payload), size=len(payload), progress=False,
                         timeout=10, **kw)  # type: ignore[arg-type]


# --- download -------------------------------------------------------------------------------


def test_download_extracts_and_keeps_the_archive(tmp_path: Path) -> None:
    payload = cifar_archive(tmp_path)
    root = tmp_path / "data"
    with serve(payload) as server:
        folder = get(root, server.url, payload)
        assert folder == root / FOLDER_NAME and server.requests == 1
        assert leftovers(root) == sorted([ARCHIVE_NAME, FOLDER_NAME])
        assert (root / ARCHIVE_NAME).read_bytes() == payload
        assert get(root, server.url, payload) == folder  # already there: no new request
        assert server.requests == 1
    assert load_cifar10(folder, val_size=8).n_train == 32


def test_progress_bar_does_not_break_download(tmp_path: Path) -> None:
    payload = cifar_archive(tmp_path)
    with serve(payload) as server:
        fetch_cifar10(tmp_path / "d", url=server.url, md5=md5(payload), size=None,
                      progress=True)
    assert (tmp_path / "d" / FOLDER_NAME / "test_batch").is_file()


@pytest.mark.parametrize("what", ["md5", "size"])
def test_checksum_mismatch_leaves_nothing(tmp_path: Path, what: str) -> None:
    payload = cifar_archive(tmp_path)
    root = tmp_path / "data"
    wrong = {"md5": "0" * 32} if what == "md5" else {"size": len(payload) + 1}
    with serve(payload) as server, pytest.raises(ChecksumError, match="expected"):
        fetch_cifar10(root, url=server.url, progress=False,
                      **{"md5": md5(payload), "size": len(payload), **wrong})  # type: ignore
    assert leftovers(root) == []


def test_server_dying_mid_download_leaves_nothing(tmp_path: Path) -> None:
    payload = cifar_archive(tmp_path)
    root = tmp_path / "data"
    with serve(payload, die_after=len(payload) // 3) as server:
        with pytest.raises(DataNotFoundError, match="could not download"):
            get(root, server.url, payload)
    assert leftovers(root) == []


def test_connection_refused_says_to_download_by_hand(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError, match="--data-dir") as e:
        fetch_cifar10(root, url=f"http://127.0.0.1:{port}/x.tar.gz", progress=False, timeout=5)
    assert "by hand" in str(e.value)
    assert leftovers(root) == []


def test_interrupt_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = cifar_archive(tmp_path)
    root = tmp_path / "data"

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_extract", interrupted)
    with serve(payload) as server, pytest.raises(KeyboardInterrupt):
        get(root, server.url, payload)
    assert leftovers(root) == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _evil_archives(outside: Path) -> dict[str, bytes]:
    good = [(_member(f"{FOLDER_NAME}/{n}"), b"x") for n in fetch.REQUIRED]
    return {
        "dotdot": tar_gz([*good, (_member(f"{FOLDER_NAME}/../../evil"), b"evil")]),
        "absolute": tar_gz([*good, (_member(str(outside / "evil")), b"evil")]),
        "symlink": tar_gz([(_member(FOLDER_NAME, tarfile.SYMTYPE, str(outside)), None),
                           *good]),
        "hardlink": tar_gz([*good, (_member("h", tarfile.LNKTYPE, str(outside / "evil")),
                                    None)]),
        "device": tar_gz([*good, (_member("dev", tarfile.CHRTYPE), None)]),
    }


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_archive_members_are_refused(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    payload = _evil_archives(outside)[kind]
    root = tmp_path / "a" / "data"
    with serve(payload) as server, pytest.raises(DataError, match="refused member"):
        get(root, server.url, payload)
    assert leftovers(root) == []
    assert list(outside.iterdir()) == [] and not (tmp_path / "a" / "evil").exists()


def test_archive_without_batches_is_refused(tmp_path: Path) -> None:
    payload = tar_gz([(_member("other/file"), b"x")])
    root = tmp_path / "data"
    with serve(payload) as server, pytest.raises(DataError, match=FOLDER_NAME):
        get(root, server.url, payload)
    assert leftovers(root) == []


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    full = cifar_archive(tmp_path)
    payload = full[: len(full) // 2]  # served and checksummed as is: the tar itself is cut
    root = tmp_path / "data"
    with serve(payload) as server, pytest.raises(DataError, match="cannot extract"):
        get(root, server.url, payload)
    assert leftovers(root) == []


def test_two_processes_fetch_once(tmp_path: Path) -> None:
    payload = cifar_archive(tmp_path)
    root = tmp_path / "data"
    code = ("import sys; from klayer.data.fetch import fetch_cifar10; "
            "print(fetch_cifar10(sys.argv[1], url=sys.argv[2], md5=sys.argv[3], "
            "size=int(sys.argv[4]), progress=False))")
    with serve(payload, delay=1.0) as server:  # slow enough for the runs to overlap
        args = [sys.executable, "-c", code, str(root), server.url, md5(payload),
                str(len(payload))]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o.strip() for o, _ in outs} == {str(root / FOLDER_NAME)}
    assert server.requests == 1
    assert leftovers(root) == sorted([ARCHIVE_NAME, FOLDER_NAME])
    assert load_cifar10(root / FOLDER_NAME, val_size=8).test.n == 8


# --- locate ----------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLAYER_DATA_DIR", raising=False)


def test_resolve_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_env: None) -> None:
    import platformdirs

    assert resolve_data_dir(None) == Path(platformdirs.user_cache_dir("klayer"))
    monkeypatch.setenv("KLAYER_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_locate_in_each_layout(tmp_path: Path, no_env: None) -> None:
    make_cifar_folder(tmp_path / "a" / FOLDER_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChecksumWarning)  # tiny files are not the official
        assert locate_cifar10(tmp_path / "a") == tmp_path / "a" / FOLDER_NAME
        assert locate_cifar10(tmp_path / "a" / FOLDER_NAME) == tmp_path / "a" / FOLDER_NAME
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / ARCHIVE_NAME).write_bytes(cifar_archive(tmp_path))
        assert locate_cifar10(str(tmp_path / "b")) == tmp_path / "b" / FOLDER_NAME
    assert load_cifar10(tmp_path / "b" / FOLDER_NAME, val_size=8).n_train == 32
    assert leftovers(tmp_path / "b") == sorted([ARCHIVE_NAME, FOLDER_NAME])


def test_locate_follows_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar_folder(tmp_path / "env" / FOLDER_NAME)
    monkeypatch.setenv("KLAYER_DATA_DIR", str(tmp_path / "env"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChecksumWarning)
        assert locate_cifar10() == tmp_path / "env" / FOLDER_NAME
        with pytest.raises(DataNotFoundError):  # the argument wins over the variable
            locate_cifar10(tmp_path / "elsewhere")


def test_locate_missing_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="klayer data fetch") as e:
        locate_cifar10(tmp_path)
    assert "--data-dir" in str(e.value)


def test_locate_names_the_missing_batch_files(tmp_path: Path) -> None:
    make_cifar_folder(tmp_path / FOLDER_NAME)
    (tmp_path / FOLDER_NAME / "data_batch_3").unlink()
    (tmp_path / FOLDER_NAME / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="incomplete, data_batch_3, test_batch missing"):
        locate_cifar10(tmp_path)


def test_checksums_warn_or_fail_and_are_remembered(tmp_path: Path, no_env: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / FOLDER_NAME
    make_cifar_folder(folder)
    with pytest.warns(ChecksumWarning) as caught:
        locate_cifar10(tmp_path)
    assert len(caught) == 1  # one warning naming the folder and every differing file
    assert str(caught[0].message).startswith(f"{folder}: MD5 of ")
    assert all(n in str(caught[0].message) for n in fetch.CIFAR10_FILE_MD5)
    with pytest.raises(ChecksumError, match="data_batch_1"):
        locate_cifar10(tmp_path, strict_checksums=True)
    monkeypatch.setattr(fetch, "_md5", lambda p: pytest.fail("hashed again"))
    with warnings.catch_warnings():  # the stamp remembers the verdict, the marker the warning
        warnings.simplefilter("error")
        assert locate_cifar10(tmp_path) == folder
    official = {n: md5((folder / n).read_bytes()) for n in fetch.CIFAR10_FILE_MD5}
    monkeypatch.setattr(fetch, "CIFAR10_FILE_MD5", official)
    monkeypatch.setattr(fetch, "_md5", lambda p: official[p.name])
    (folder / fetch.STAMP_NAME).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert locate_cifar10(tmp_path, strict_checksums=True) == folder


LOCATE = "import sys; from klayer.data.fetch import locate_cifar10; locate_cifar10(sys.argv[1])"


def _warnings_of_a_new_process(root: Path) -> int:
    """How many checksum warnings a fresh process locating CIFAR-10 in ``root`` shows."""
    r = subprocess.run([sys.executable, "-c", LOCATE, str(root)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr.count("ChecksumWarning")


def test_checksum_warning_shows_once_per_folder_across_processes(tmp_path: Path) -> None:
    folder = tmp_path / FOLDER_NAME
    make_cifar_folder(folder)
    assert [_warnings_of_a_new_process(tmp_path) for _ in range(3)] == [1, 0, 0]
    assert _warnings_of_a_new_process(folder) == 0  # the same folder, however it is named
    with pytest.raises(ChecksumError):  # strict still refuses what was only warned about
        locate_cifar10(tmp_path, strict_checksums=True)
    st = (folder / "data_batch_2").stat()
    os.utime(folder / "data_batch_2", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert [_warnings_of_a_new_process(tmp_path) for _ in range(2)] == [1, 0]  # changed: again
    other = tmp_path / "other" / FOLDER_NAME  # another folder warns for itself
    make_cifar_folder(other)
    assert _warnings_of_a_new_process(other.parent) == 1


def test_checksum_warning_repeats_where_it_cannot_be_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar_folder(tmp_path / FOLDER_NAME)
    real_open = os.open

    def read_only(path: str | Path, *args: Any, **kw: Any) -> int:
        if Path(path).name.startswith(fetch.WARNED_PREFIX):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(fetch.os, "open", read_only)
    for _ in range(2):
        with pytest.warns(ChecksumWarning):
            locate_cifar10(tmp_path)


def test_strict_refuses_a_foreign_archive(tmp_path: Path) -> None:
    (tmp_path / ARCHIVE_NAME).write_bytes(cifar_archive(tmp_path))
    with pytest.raises(ChecksumError, match=ARCHIVE_NAME):
        locate_cifar10(tmp_path, strict_checksums=True)
    assert not (tmp_path / FOLDER_NAME).exists()


# --- a data folder that is not there; klayer data where ------------------------------------


def test_a_data_dir_that_does_not_exist_says_so(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "no" / "such"
    r = subprocess.run([sys.executable, "-m", "klayer", "train", "--data-dir", str(gone),
                        "--quiet", "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert f"data folder {gone} (from --data-dir) does not exist" in r.stderr, r.stderr
    assert f"klayer data fetch --data-dir {gone}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataNotFoundError, match=r"\(from --data-dir\) is a file, not a folder"):
        locate_cifar10(tmp_path / "file")
    monkeypatch.setenv("KLAYER_DATA_DIR", str(gone))
    with pytest.raises(DataNotFoundError, match=r"\(from \$KLAYER_DATA_DIR\) does not exist"):
        locate_cifar10()


def where(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    """The folder `klayer data where` prints (alone on stdout, for $(klayer data where))
    and what it says on stderr about the data; run in-process, it always exits 0."""
    from klayer.cli.main import main

    assert main(["data", "where", *args]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    return captured.out.splitlines() + captured.err.splitlines()


def test_data_where_says_whether_cifar_is_there(tmp_path: Path, no_env: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    assert where(capsys, "--data-dir", str(root)) == [
        str(root), f"CIFAR-10 missing: data folder {root} (from --data-dir) does not exist; "
        f"check the path, or run `klayer data fetch --data-dir {root}` to download CIFAR-10 "
        "(170 MB) into it"]
    root.mkdir()
    folder, line = where(capsys, "--data-dir", str(root))
    assert folder == str(root) and line.startswith("CIFAR-10 missing: run `klayer data fetch")
    (root / ARCHIVE_NAME).write_bytes(b"an archive")
    assert where(capsys, "--data-dir", str(root))[1].startswith("CIFAR-10 archive only")
    (root / ARCHIVE_NAME).unlink()
    make_cifar_folder(root / FOLDER_NAME)
    (root / FOLDER_NAME / "test_batch").unlink()
    assert where(capsys, "--data-dir", str(root))[1].startswith(
        f"CIFAR-10 incomplete in {root / FOLDER_NAME} (test_batch missing): run `klayer")
    make_cifar_folder(root / FOLDER_NAME)
    expected = [str(root), f"CIFAR-10 batches found in {root / FOLDER_NAME}"]
    assert where(capsys, "--data-dir", str(root)) == expected
    assert [p.name for p in root.iterdir()] == [FOLDER_NAME]  # it only looked


def test_data_where_follows_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KLAYER_DATA_DIR", str(tmp_path))
    make_cifar_folder(tmp_path)  # the batches folder itself
    assert where(capsys) == [str(tmp_path), f"CIFAR-10 batches found in {tmp_path}"]


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_and_determinism() -> None:
    a, b, c = load_digits_data(seed=0), load_digits_data(seed=0), load_digits_data(seed=1)
    assert (a.n_train, a.val.n, a.test.n, a.d) == (1257, 270, 270, 64)
    assert a.name == "digits" and a.num_classes == 10 and a.image_shape is None
    assert a.train.X.dtype == np.float64
    np.testing.assert_array_equal(a.train.X, b.train.X)
    assert not np.array_equal(a.train.y, c.train.y)
    all_y = np.concatenate([a.train.y, a.val.y, a.test.y])
    assert np.bincount(all_y).min() > 150  # every class present, nothing lost
    with pytest.raises(ValueError):
        load_digits_data(val_fraction=0.6, test_fraction=0.5)
