"""The training loop on synthetic data, PreciseBN, and `klayer train` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klayer import modelfile
from klayer.config import TrainConfig
from klayer.data import make_synthetic
from klayer.network import Network
from klayer.train import make_plan, population_stats, read_metrics, train


def test_short_run_on_synthetic_data_learns() -> None:
    data = make_synthetic(seed=0)
    cfg = TrainConfig(dataset="synthetic", hidden=(64, 64), n_batch=50, cycles=2, n_s=200,
                      eta_max=0.1, lam=1e-4)
    result = train(cfg, data)
    s = result.summary
    assert s["steps"] == 800 and s["seed"] == 0
    assert s["val_accuracy"] >= 0.80, s  # chance is 0.10
    assert s["test_accuracy"] >= 0.80, s
    rows = result.rows
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 800
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 2
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no duplicates


def test_training_is_reproducible_per_seed() -> None:
    data = make_synthetic(seed=1)
    cfg = TrainConfig(dataset="synthetic", hidden=(16,), n_batch=50, steps=60,
                      schedule="constant", eta=0.05, dropout=0.2)
    a, b = train(cfg, data), train(cfg, data)
    for k in a.net.params:
        np.testing.assert_array_equal(a.net.params[k], b.net.params[k])
    c = train(TrainConfig(**{**cfg.__dict__, "seed": 7}), data)
    assert not np.array_equal(a.net.params["W1"], c.net.params["W1"])


def test_plan_defaults() -> None:
    plan = make_plan(TrainConfig(), n_train=45000)
    assert (plan.steps_per_epoch, plan.n_s, plan.total_steps) == (450, 2250, 9000)
    assert plan.lr(0) == pytest.approx(1e-5) and plan.lr(2250) == pytest.approx(0.1)
    assert plan.lr(4500) == pytest.approx(1e-5)
    assert plan.eval_every == 450  # ten evaluations per cycle
    with pytest.raises(ValueError, match="n_batch"):
        make_plan(TrainConfig(n_batch=500), n_train=400)


def test_precise_bn_equals_statistics_of_the_concatenated_data() -> None:
    data = make_synthetic(n_train=600, seed=2)
    net = Network(TrainConfig(hidden=(12,)).net_config(d=data.d), rng=0)
    net.params["W1"] *= 3
    X = data.train.X[:500]
    population_stats(net, data, X, n=500)
    S = data.standardize(X, dtype=np.float32) @ net.params["W1"] + net.params["b1"]
    np.testing.assert_allclose(net.stats["mu1"], S.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.stats["var1"], S.var(axis=0), rtol=1e-4)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_train_writes_the_run_folder(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('hidden = [32]\nn_batch = 50\nn_s = 50\nlambda = 0.001\n')
    r = run_cli("train", "--dataset", "synthetic", "--config", "run.toml", "--cycles", "1",
                "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names >= {"config.toml", "metrics.csv", "summary.json", "model.npz", "loss.png",
                     "cost.png", "accuracy.png", "lr.png"}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "steps", "wall_seconds",
                "steps_per_second", "seed", "klayer_version", "numpy_version", "python_version",
                "kernels"):
        assert key in summary
    assert 0 <= summary["test_accuracy"] <= 1 and summary["steps"] == 100
    assert "hidden = [32]" in (out / "config.toml").read_text()
    rows = read_metrics(out / "metrics.csv")
    assert rows[-1]["step"] == 100 and len(rows) == 11
    net, meta, extras = modelfile.load(out / "model.npz")
    assert net.config.hidden == (32,) and meta["dataset"] == "synthetic" and "mean" in extras
    assert "test" in r.stdout and "run folder" in r.stdout
    # evaluate and plot on the same run
    ev = run_cli("evaluate", "out/model.npz", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "test accuracy" in ev.stdout and (out / "confusion_test.png").is_file()
    pl = run_cli("plot", "out", "out", "--labels", "a,b", "--out", "cmp", cwd=tmp_path)
    assert pl.returncode == 0, pl.stderr
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"loss.png", "cost.png",
                                                              "accuracy.png"}


def test_cli_length_flag_replaces_the_config_files_length(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text("hidden = [8]\ncycles = 3\nschedule = \"constant\"\n")
    r = run_cli("train", "--dataset", "synthetic", "--config", "run.toml", "--steps", "20",
                "--quiet", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert int(read_metrics(tmp_path / "o" / "metrics.csv")[-1]["step"]) == 20
    r = run_cli("train", "--dataset", "synthetic", "--steps", "20", "--epochs", "1",
                "--out", "o2", cwd=tmp_path)  # two lengths on the command line still clash
    assert r.returncode == 2 and "only one training length" in r.stderr


def test_cli_train_says_which_settings_the_dataset_ignores(tmp_path: Path) -> None:
    r = run_cli("train", "--dataset", "digits", "--val-size", "100", "--flip", "--translate", "2",
                "--steps", "5", "--schedule", "constant", "--quiet", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ignored for the digits data: val_size (CIFAR-10 only)" in r.stderr
    assert "ignored for the digits data, which are not images: flip, translate" in r.stderr
    r = run_cli("train", "--dataset", "digits", "--steps", "5", "--schedule", "constant",
                "--quiet", "--out", "o2", cwd=tmp_path)
    assert r.returncode == 0 and "ignored" not in r.stderr, r.stderr


def test_cli_train_refused_for_its_data_leaves_no_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for out in (["--out", "runs/new/run"], []):  # --out, or the default runs/<stamp>-run
        r = run_cli("train", "--data-dir", "empty", "--quiet", *out, cwd=tmp_path)
        assert r.returncode == 4, r.stderr
        assert "CIFAR-10" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "runs").exists()


def test_cli_train_out_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    r = run_cli("train", "--dataset", "synthetic", "--out", "taken", cwd=tmp_path)
    assert r.returncode == 2 and "--out: cannot create taken" in r.stderr, r.stderr
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--hidden", "50,0"], "--hidden"),
        (["--eta-min", "1", "--eta-max", "0.1"], "eta_min"),
        (["--lambda", "-1"], "lambda must be >= 0"),
        (["--n-batch", "100000"], "n_batch"),
        (["--config", "missing.toml"], "cannot read"),
        (["--optimizer", "rmsprop"], "rmsprop"),
    ],
)
def test_cli_train_usage_errors_exit_2(tmp_path: Path, args: list[str], match: str) -> None:
    r = run_cli("train", "--dataset", "synthetic", "--out", "o", *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert match in r.stderr
