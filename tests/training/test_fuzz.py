"""Hypothesis fuzzing of everything `klayer` reads: config files, flags, dataset batches,
model files and checkpoints.

Bad input may only ever end in a clean exit (2 for settings, 4 for files) with a message
that names the key, flag or file, and nothing in a file may ever be executed. Valid
settings stop at the start of training (``Trainer.run`` is replaced by a sentinel), so
each example costs milliseconds. KLAYER_FUZZ_EXAMPLES=N sets the number of examples per
test; the examples are derandomized (CI sees the same ones every time) unless
KLAYER_FUZZ_RANDOM is set, for long local runs that look further.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest_data_helpers import make_cifar_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klayer.cli.main import main
from klayer.core.config import TrainConfig, key_name
from klayer.core.network import Network
from klayer.data.batchfile import DataError, load_batch
from klayer.data.files import ModelFileError
from klayer.training import checkpoint, modelfile
from klayer.training.checkpoint import CheckpointError

N = int(os.environ.get("KLAYER_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N, deadline=None, database=None,
                derandomize="KLAYER_FUZZ_RANDOM" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
KEYS = [key_name(f) for f in fields(TrainConfig)]


class WouldTrain(Exception):
    """Raised instead of training: everything before it accepted the settings."""


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    def run(self: object, *a: object, **k: object) -> None:
        raise WouldTrain

    monkeypatch.setattr("klayer.training.trainer.Trainer.run", run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (function-scoped fixtures are shared by all examples)."""
    path = Path(tempfile.mkdtemp(prefix="klayer-fuzz-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def outcome(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str, str]:
    """(exit code or "train", stderr) of `klayer ARGV`; anything else propagates and fails."""
    capsys.readouterr()
    try:
        rc: int | str = main(argv)
    except WouldTrain:
        rc = "train"
    except SystemExit as e:  # argparse's own usage errors
        rc = int(e.code) if isinstance(e.code, int) else 2
    return rc, capsys.readouterr().err


# --- settings -------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(-3, 3000), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0),
    st.booleans(), st.text(max_size=12),
    st.sampled_from(["sgd", "adam", "cyclic", "constant", "one_cycle", "he", "normal",
                     "float64", "before", "after", "pytorch", "precise", "full", ""]),
)
values = st.one_of(scalars, st.lists(st.integers(-2, 300), max_size=4),
                   st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3), scalars,
                                                                   max_size=2))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not \
            math.isfinite(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


config_files = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8)),
                    values, max_size=6).map(
        lambda d: (d, "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in d.items()))),
    st.binary(max_size=200).map(lambda b: ({}, b.decode("latin-1"))),
)


def names_the_problem(err: str, names: list[str]) -> bool:
    return any(n in err for n in names) or "TOML" in err


@FUZZ
@given(config_files)
def test_random_config_files_exit_2_or_start(
        no_training: Path, capsys: pytest.CaptureFixture[str],
        config: tuple[dict[str, Any], str]) -> None:
    values_, text = config
    with scratch() as d:
        (d / "run.toml").write_text(text, encoding="utf-8", errors="surrogateescape")
        rc, err = outcome(["train", "--config", str(d / "run.toml"), "--dataset", "synthetic",
                           "--out", str(d / "out"), "--quiet"], capsys)
    assert rc in (2, "train"), err
    if rc == 2:
        assert "klayer train: error:" in err and "Traceback" not in err, err
        assert names_the_problem(err, [*values_, "n_batch", "hidden"]), err


flag_names = [f for f in fields(TrainConfig) if f.name not in ("dataset", "data_dir")]
flag_values = st.one_of(
    st.integers(-3, 3000).map(str), st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=10),
    st.lists(st.integers(-2, 300), max_size=4).map(lambda w: ",".join(map(str, w))),
    st.sampled_from(["0", "1", "-1", "1e-400", "1e400", "nan", "adam", "cyclic", "50,50"]),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(flag_names), flag_values), max_size=4))
def test_random_flag_values_exit_2_or_start(
        no_training: Path, capsys: pytest.CaptureFixture[str],
        flags: list[tuple[Any, str]]) -> None:
    argv, names = [], []
    for f, value in flags:
        flag = "--" + key_name(f).replace("_", "-")
        names += [flag, key_name(f)]
        if str(f.type) == "bool":
            argv.append(flag if value[:1] < "m" else "--no-" + flag[2:])
        else:
            argv.append(f"{flag}={value}")
    with scratch() as d:
        rc, err = outcome(["train", "--dataset", "synthetic", "--out", str(d / "out"),
                           "--quiet", *argv], capsys)
    assert rc in (2, "train"), err
    if rc == 2:
        assert "Traceback" not in err
        assert names_the_problem(err, [*names, "n_batch", "hidden"]), (argv, err)


# --- dataset files ------------------------------------------------------------------------------


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


MARKER = Path(tempfile.gettempdir()) / f"klayer-fuzz-executed-{os.getpid()}"
X8 = np.random.default_rng(0).integers(0, 256, size=(8, 3072), dtype=np.uint8)
GOOD_BATCH = pickle.dumps({b"data": X8, b"labels": list(range(8))}, protocol=2)
EVIL_BATCHES = [pickle.dumps({b"data": Evil(MARKER), b"labels": [1]}, protocol=p)
                for p in (0, 2, 4)]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """One of ``seeds`` cut short, with bytes flipped, inserted or deleted."""
    raw = bytearray(draw(st.sampled_from(seeds)))
    raw = raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
    for _ in range(draw(st.integers(0, 4))):
        if not raw:
            break
        pos = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            raw[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[pos]
    return bytes(raw)


batch_bytes = st.one_of(st.binary(max_size=300), mutated([GOOD_BATCH, *EVIL_BATCHES]))


@FUZZ
@given(batch_bytes)
def test_random_or_mutated_batches_are_refused_or_valid(raw: bytes) -> None:
    with scratch() as d:
        path = d / "data_batch_1"
        path.write_bytes(raw)
        try:
            X, y = load_batch(path)
            assert X.dtype == np.uint8 and X.shape[1] == 3072 and len(y) == len(X)
            assert 0 <= y.min() and y.max() <= 9
        except DataError as e:
            assert str(path) in str(e)
    assert not MARKER.exists(), "a batch file executed code"


@pytest.fixture(scope="module")
def cifar_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    make_cifar_folder(folder, rows=8)
    return folder


@settings(FUZZ, max_examples=max(10, N // 3))
@given(st.one_of(batch_bytes, st.just(EVIL_BATCHES[1])))
def test_cli_with_a_bad_batch_exits_4_naming_the_file(
        no_training: Path, capsys: pytest.CaptureFixture[str], cifar_template: Path,
        raw: bytes) -> None:
    with scratch() as d:
        folder = Path(shutil.copytree(cifar_template, d / "cifar-10-batches-py"))
        (folder / "data_batch_3").write_bytes(raw)
        rc, err = outcome(["train", "--dataset", "cifar10", "--data-dir", str(d),
                           "--val-size", "8", "--n-batch", "8", "--hidden", "8",
                           "--steps", "2", "--schedule", "constant", "--out", str(d / "out"),
                           "--quiet"], capsys)
    assert rc in (4, "train"), err
    if rc == 4:
        assert "klayer train: data error:" in err and "data_batch_3" in err, err
    assert not MARKER.exists(), "a batch file executed code"


# --- model files and checkpoints ---------------------------------------------------------------


def model_bytes() -> bytes:
    net = Network(TrainConfig(hidden=(4,)).net_config(d=6, num_classes=3), rng=0)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as d:
        modelfile.save(net, Path(d) / "m.npz", metadata={"dataset": "synthetic"},
                       extras={"mean": np.zeros(6), "std": np.ones(6)})
        buf.write((Path(d) / "m.npz").read_bytes())
    return buf.getvalue()


def checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint.save(d, 7, {"param/W1": np.arange(12.0).reshape(3, 4),
                                      "config": np.array('{"a": 1}'),
                                      "rng": np.array(["{}", "{}"])})
        return path.read_bytes()


def npz_with_pickled_member() -> bytes:
    """An .npz whose 'metadata' member is an object array that runs code when unpickled."""
    arr = np.empty(1, dtype=object)
    arr[0] = Evil(MARKER)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("metadata.npy", buf.getvalue())
        z.writestr("format.npy", _npy(np.array(modelfile.FORMAT)))
    return out.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


GOOD_MODEL, GOOD_CKPT = model_bytes(), checkpoint_bytes()
FOREIGN = [EVIL_BATCHES[1], npz_with_pickled_member(), GOOD_BATCH]
model_files = st.one_of(st.binary(max_size=400), mutated([GOOD_MODEL, GOOD_CKPT, *FOREIGN]))


@FUZZ
@given(model_files)
def test_random_or_mutated_model_files_are_refused_or_valid(raw: bytes) -> None:
    with scratch() as d:
        path = d / "model.npz"
        path.write_bytes(raw)
        try:
            net, meta, extras = modelfile.load(path)
            assert isinstance(meta, dict) and all(np.isfinite(p).all()
                                                  for p in net.params.values())
        except ModelFileError as e:
            assert str(path) in str(e)
    assert not MARKER.exists(), "a model file executed code"


@FUZZ
@given(model_files)
def test_random_or_mutated_checkpoints_are_refused_or_intact(raw: bytes) -> None:
    with scratch() as d:
        path = d / "ckpt-00000007.npz"
        path.write_bytes(raw)
        try:
            arrays = checkpoint.load(path)  # the digest matched: the content is the original
            np.testing.assert_array_equal(arrays["param/W1"], np.arange(12.0).reshape(3, 4))
        except CheckpointError as e:
            assert str(path) in str(e)
    assert not MARKER.exists(), "a checkpoint executed code"


def npz_with_lying_header() -> bytes:
    """A model file whose W1 header claims 7 TiB of data (np.load would try to allocate it)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    lying = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(GOOD_MODEL)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            raw = src.read(info)
            dst.writestr(info, lying + b"\0" * 8 if info.filename == "param/W1.npy" else raw)
    return out.getvalue()


@pytest.mark.parametrize("raw", [b"", b"\x00" * 100, GOOD_MODEL[: len(GOOD_MODEL) // 2],
                                 *FOREIGN, npz_with_lying_header()],
                         ids=["empty", "zeros", "truncated", "pickle", "npz-with-pickle",
                              "batch", "lying-header"])
def test_evaluate_refuses_bad_model_files_with_exit_4(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        raw: bytes) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.npz").write_bytes(raw)
    rc, err = outcome(["evaluate", "model.npz"], capsys)
    assert rc == 4 and "klayer evaluate: data error: model.npz" in err, err
    assert not MARKER.exists()
