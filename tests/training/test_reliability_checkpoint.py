"""Checkpoint files and Trainer.state_dict: exact round trips, pruning, corruption detection.

In-process and fast; the crash / signal / disk-full scenarios with real processes are in
test_reliability.py.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from klayer.core.config import TrainConfig
from klayer.data.batchfile import DataError
from klayer.data.datasets import Data, Split, make_synthetic
from klayer.training import checkpoint
from klayer.training.checkpoint import CheckpointError
from klayer.training.runfolder import METRIC_FIELDS
from klayer.training.stop import Stopped
from klayer.training.trainer import Diverged, ResumeMismatch, Trainer


def image_data(n: int = 300, seed: int = 0) -> Data:
    """A tiny image dataset (3 x 4 x 4), so flips and translations draw random numbers."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(n + 100, 48), dtype=np.uint8)
    y = rng.integers(0, 10, size=n + 100)
    return Data(Split(X[:n], y[:n]), Split(X[n : n + 50], y[n : n + 50]),
                Split(X[n + 50 :], y[n + 50 :]), num_classes=10, name="tiny-images",
                image_shape=(3, 4, 4))


# every random stream, optimizer slots, per-epoch PreciseBN, evaluations, skips
HARD = TrainConfig(dataset="synthetic", hidden=(16, 16, 16), n_batch=40, steps=90,
                   schedule="one_cycle", optimizer="adam", dropout=0.2, flip=True,
                   translate=1, skip=True, bn_stats="precise", precise_per_epoch=2,
                   precise_examples=120, evals_per_cycle=9, checkpoint_every=0)


def states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        if k == "elapsed":
            continue
        if k == "metrics":  # the seconds column is wall-clock time
            cols = [i for i, f in enumerate(METRIC_FIELDS) if f != "seconds"]
            np.testing.assert_array_equal(a[k][:, cols], b[k][:, cols])
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            assert a[k].dtype == b[k].dtype, k


@pytest.mark.parametrize("cut", [1, 37, 89])
def test_state_dict_round_trip_continues_bit_identically(tmp_path: Path, cut: int) -> None:
    data = image_data()
    ref = Trainer(HARD, data)
    ref.run()
    first = Trainer(HARD, data, run_dir=tmp_path)
    with pytest.raises(Stopped) as stopped:
        first.run(should_stop=lambda: 15 if first.t == cut else None)
    assert stopped.value.step == cut and stopped.value.checkpoint is not None
    second = Trainer(HARD, data, run_dir=tmp_path)
    found = second.resume(warn=pytest.fail)
    assert found is not None and found[0] == cut
    second.run()
    states_equal(ref.state_dict(), second.state_dict())


@pytest.mark.parametrize("cfg", [
    replace(HARD, whiten="zca", mixup=0.3, cutmix=1.0, mix_prob=0.8, tta_flip=True, tta_shift=1),
    replace(HARD, batch_norm=False, layer_norm=True, mixup=0.2),
    replace(HARD, ema=0.9)], ids=["zca-mix", "layer-norm", "ema"])
def test_whitened_mixed_and_layer_norm_runs_resume_bit_identically(
        tmp_path: Path, cfg: TrainConfig) -> None:
    data = image_data()
    ref = Trainer(cfg, data)
    ref.run()
    first = Trainer(cfg, data, run_dir=tmp_path)
    with pytest.raises(Stopped):
        first.run(should_stop=lambda: 15 if first.t == 37 else None)
    second = Trainer(cfg, data, run_dir=tmp_path)
    assert second.resume(warn=pytest.fail) is not None
    second.run()
    states_equal(ref.state_dict(), second.state_dict())


def test_checkpoints_every_n_steps_keep_the_last_two(tmp_path: Path) -> None:
    data = make_synthetic(n_train=200, seed=0)
    cfg = TrainConfig(dataset="synthetic", hidden=(8,), n_batch=20, steps=55,
                      schedule="constant", checkpoint_every=10)
    Trainer(cfg, data, run_dir=tmp_path).run()
    folder = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(folder)] == [55, 50]
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000050.npz",
                                                        "ckpt-00000055.npz"]
    with np.load(folder / "ckpt-00000055.npz", allow_pickle=False) as z:  # plain arrays
        assert str(z["format"]) == checkpoint.FORMAT and int(z["step"]) == 55


def test_any_flipped_byte_is_detected(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, 3, {"a": np.arange(100.0), "s": np.array("x")})
    good = path.read_bytes()
    assert checkpoint.load(path)["a"].sum() == 4950
    rng = np.random.default_rng(0)
    outcomes = set()
    for pos in rng.choice(len(good), size=150, replace=False):
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(bad))
        try:
            arrays = checkpoint.load(path)  # only bytes no reader looks at may change
            np.testing.assert_array_equal(arrays["a"], np.arange(100.0))
            outcomes.add("same")
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


def npz_with_lying_header(shape: str) -> bytes:
    """An .npz whose one member claims ``shape`` but stores 8 bytes."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': " + shape + ", }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 8
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.npy", npy)
    return buf.getvalue()


@pytest.mark.parametrize("shape", ["(1000000000000,)", "(4000000000, 4000000000)", "(2,)"])
def test_a_header_promising_more_than_is_stored_allocates_nothing(tmp_path: Path,
                                                                    shape: str) -> None:
    path = tmp_path / "ckpt-00000001.npz"
    path.write_bytes(npz_with_lying_header(shape))
    with pytest.raises(CheckpointError, match="promises"):
        checkpoint.load(path)


def test_object_arrays_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises((TypeError, ValueError)):
        checkpoint.save(tmp_path, 1, {"o": np.array([{"a": 1}], dtype=object)})
    foreign = tmp_path / "ckpt-00000002.npz"
    np.savez(foreign, x=np.arange(3))  # a valid .npz, but not a checkpoint
    with pytest.raises(CheckpointError, match="not a klayer checkpoint"):
        checkpoint.load(foreign)
    objects = tmp_path / "ckpt-00000003.npz"
    np.savez(objects, allow_pickle=True, x=np.array([None, 1], dtype=object))
    with pytest.raises(CheckpointError, match="not a plain array"):
        checkpoint.load(objects)


def short_run(tmp_path: Path, cfg: TrainConfig, stop_at: int) -> None:
    t = Trainer(cfg, make_synthetic(n_train=200, seed=0), run_dir=tmp_path)
    with pytest.raises(Stopped):
        t.run(should_stop=lambda: 2 if t.t == stop_at else None)


CFG = TrainConfig(dataset="synthetic", hidden=(8,), n_batch=20, steps=60,
                  schedule="constant", checkpoint_every=10)


def test_corrupt_newest_falls_back_with_a_warning(tmp_path: Path) -> None:
    short_run(tmp_path, CFG, 25)  # checkpoints 20 and 25
    folder = tmp_path / "checkpoints"
    newest = folder / "ckpt-00000025.npz"
    newest.write_bytes(newest.read_bytes()[:-100])
    warnings: list[str] = []
    t = Trainer(CFG, make_synthetic(n_train=200, seed=0), run_dir=tmp_path)
    assert t.resume(warnings.append) == (20, folder / "ckpt-00000020.npz")
    assert len(warnings) == 1 and "ckpt-00000025.npz" in warnings[0]
    assert "falling back" in warnings[0]
    assert (folder / "ckpt-00000025.npz.corrupt").exists() and not newest.exists()


def test_all_corrupt_is_an_error_never_a_fresh_start(tmp_path: Path) -> None:
    short_run(tmp_path, CFG, 25)
    folder = tmp_path / "checkpoints"
    for p in folder.glob("*.npz"):
        p.write_bytes(b"garbage")
    t = Trainer(CFG, make_synthetic(n_train=200, seed=0), run_dir=tmp_path)
    for _ in range(2):  # refused again on a second try: nothing renamed away
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            t.resume(lambda m: None)
    assert len(list(folder.glob("*.npz"))) == 2


def test_other_settings_or_data_are_refused(tmp_path: Path) -> None:
    short_run(tmp_path, CFG, 15)
    other = TrainConfig(**{**CFG.__dict__, "eta": 0.02})
    t = Trainer(other, make_synthetic(n_train=200, seed=0), run_dir=tmp_path)
    with pytest.raises(ResumeMismatch, match="eta"):
        t.resume(pytest.fail)
    t = Trainer(CFG, make_synthetic(n_train=200, seed=1), run_dir=tmp_path)
    with pytest.raises(DataError, match="differs"):
        t.resume(pytest.fail)
    moved = TrainConfig(**{**CFG.__dict__, "data_dir": "/elsewhere"})  # may change
    assert Trainer(moved, make_synthetic(n_train=200, seed=0),
                   run_dir=tmp_path).resume(pytest.fail) is not None


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_divergence_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="synthetic", hidden=(8,), batch_norm=False, n_batch=20,
                      steps=200, schedule="constant", eta=1e6, checkpoint_every=1)
    t = Trainer(cfg, make_synthetic(n_train=200, seed=0), run_dir=tmp_path)
    with pytest.raises(Diverged, match="smaller eta") as e:
        t.run()
    last = t.last_checkpoint
    assert last is not None and str(last) in str(e.value) and last.exists()
    assert checkpoint.load(last)["step"] < t.t + 1
    assert (tmp_path / "metrics.csv").read_text().startswith("step,")


def test_temporaries_of_a_crashed_write_are_removed(tmp_path: Path) -> None:
    short_run(tmp_path, CFG, 15)
    stray = tmp_path / "checkpoints" / ".ckpt-00000020.npz.abc123.tmp"
    stray.write_bytes(b"PK\x03\x04half")
    t = Trainer(CFG, make_synthetic(n_train=200, seed=0), run_dir=tmp_path)
    assert t.resume(pytest.fail) == (15, tmp_path / "checkpoints" / "ckpt-00000015.npz")
    assert not stray.exists()
