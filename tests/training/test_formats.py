"""File formats and the settings that leave a result unchanged.

Model files and checkpoints carry a format string; one of another format (an older
klayer's, or an unknown one) is refused with a FormatError naming the format found and
the one expected, and the command line exits 2 (a refusal, not damaged data: 4).
RESULT_NEUTRAL is the one list of settings that change nothing in a training's result.
"""

from __future__ import annotations

import io
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from klayer.cli.main import main
from klayer.core.config import RESULT_NEUTRAL, TrainConfig, key_name, to_toml
from klayer.core.network import Network
from klayer.data.files import FormatError, ModelFileError
from klayer.training import checkpoint, modelfile
from klayer.training.checkpoint import CheckpointError
from klayer.training.plan import load_data
from klayer.training.stop import Stopped
from klayer.training.trainer import Trainer

CFG = TrainConfig(dataset="synthetic", hidden=(8,), n_batch=20, steps=40,
                  schedule="constant", checkpoint_every=10)


def with_format(path: Path, fmt: str | None) -> None:
    """Rewrite the .npz at ``path`` with another ``format`` (None: without one)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if fmt is None:
        del arrays["format"]
    else:
        arrays["format"] = np.array(fmt)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


# --- model files ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["klayer-model-0", "klayer-model-2", "klayer-checkpoint-1"])
def test_a_model_file_of_another_format_is_refused_naming_both(tmp_path: Path,
                                                               fmt: str) -> None:
    path = tmp_path / "model.npz"
    modelfile.save(Network(CFG.net_config(d=4, num_classes=3), rng=0), path)
    assert modelfile.load(path)[0].config.d == 4
    with_format(path, fmt)
    with pytest.raises(FormatError) as e:
        modelfile.load(path)
    assert str(path) in str(e.value) and repr(fmt) in str(e.value)
    assert repr(modelfile.FORMAT) in str(e.value)


def test_a_model_file_without_a_format_is_foreign_not_another_version(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    modelfile.save(Network(CFG.net_config(d=4, num_classes=3), rng=0), path)
    with_format(path, None)
    with pytest.raises(ModelFileError, match="missing key 'format'") as e:
        modelfile.load(path)
    assert not isinstance(e.value, FormatError)


def test_evaluate_of_an_older_model_file_exits_2_naming_the_formats(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    modelfile.save(Network(CFG.net_config(d=4, num_classes=3), rng=0), tmp_path / "m.npz")
    with_format(tmp_path / "m.npz", "klayer-model-0")
    assert main(["evaluate", "m.npz"]) == 2
    err = capsys.readouterr().err
    assert "klayer evaluate: error: m.npz: format 'klayer-model-0'" in err, err
    assert "'klayer-model-1'" in err and "Traceback" not in err


# --- checkpoints ---------------------------------------------------------------------


def stopped_run(run: Path, cfg: TrainConfig = CFG, at: int = 25) -> Trainer:
    """A run folder as `klayer train` leaves it when stopped after step ``at``."""
    t = Trainer(cfg, load_data(cfg), run_dir=run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(to_toml(t.cfg.to_dict()))
    with pytest.raises(Stopped):
        t.run(should_stop=lambda: 2 if t.t == at else None)
    return t


def test_a_checkpoint_of_another_format_is_refused_not_skipped(tmp_path: Path) -> None:
    stopped_run(tmp_path)  # checkpoints 20 and 25
    folder = tmp_path / "checkpoints"
    for _, path in checkpoint.list_checkpoints(folder):
        with_format(path, "klayer-checkpoint-0")
    newest = folder / "ckpt-00000025.npz"
    with pytest.raises(FormatError) as e:
        checkpoint.load(newest)
    assert str(newest) in str(e.value) and "'klayer-checkpoint-0'" in str(e.value)
    assert f"'{checkpoint.FORMAT}'" in str(e.value)
    assert isinstance(e.value, CheckpointError)  # but not damage: no fallback, no rename
    warnings: list[str] = []
    with pytest.raises(FormatError):
        Trainer(CFG, load_data(CFG), run_dir=tmp_path).resume(warnings.append)
    assert not warnings and newest.exists() and not list(folder.glob("*.corrupt"))


def test_resume_from_an_older_checkpoint_exits_2_naming_the_formats(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    stopped_run(run)
    for _, path in checkpoint.list_checkpoints(run / "checkpoints"):
        with_format(path, "klayer-checkpoint-0")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "klayer train: error:" in err and "format 'klayer-checkpoint-0'" in err, err
    assert f"'{checkpoint.FORMAT}'" in err and not (run / "model.npz").exists()


def test_resume_without_checkpoints_but_a_model_starts_over(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No special case for a run folder 'finished before checkpoints existed': a folder
    without checkpoints trains from step 0 (seeded: to the same results)."""
    run = tmp_path / "run"
    stopped_run(run)
    checkpoint.remove_temporaries(run / "checkpoints", "ckpt-*.npz")
    (run / "model.npz").write_bytes(b"")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "starting from step 0" in capsys.readouterr().err
    assert modelfile.load(run / "model.npz")[0].config.hidden == (8,)


# --- the settings that leave the result unchanged -------------------------------------


def test_result_neutral_names_train_config_keys() -> None:
    keys = {key_name(f) for f in fields(TrainConfig)}
    assert set(RESULT_NEUTRAL) <= keys and len(set(RESULT_NEUTRAL)) == len(RESULT_NEUTRAL)


def test_result_neutral_settings_leave_weights_and_metrics_unchanged(tmp_path: Path) -> None:
    ref = Trainer(CFG, load_data(CFG), run_dir=tmp_path / "ref").run()
    other = replace(CFG, data_dir=str(tmp_path), strict_checksums=True, checkpoint_every=3,
                    name="renamed")
    assert set(RESULT_NEUTRAL) == {k for k in RESULT_NEUTRAL
                                   if getattr(other, k) != getattr(CFG, k)}  # all changed
    res = Trainer(other, load_data(other), run_dir=tmp_path / "other").run()
    for k in ref.net.params:
        np.testing.assert_array_equal(ref.net.params[k], res.net.params[k], err_msg=k)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ref.rows]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in res.rows]


def test_resume_may_change_every_result_neutral_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    stopped_run(run)
    ref = Trainer(CFG, load_data(CFG)).run()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet", "--checkpoint-every", "7",
                 "--name", "renamed", "--strict-checksums"]) == 0, capsys.readouterr().err
    toml = (run / "config.toml").read_text()
    assert "checkpoint_every = 7\n" in toml and 'name = "renamed"' in toml
    net = modelfile.load(run / "model.npz")[0]
    for k in ref.net.params:
        np.testing.assert_array_equal(ref.net.params[k], net.params[k], err_msg=k)
    assert main(["train", "--resume", str(run), "--eta", "0.5"]) == 2
    assert "--data-dir, --strict-checksums, --checkpoint-every, --name and --quiet" in (
        capsys.readouterr().err)
