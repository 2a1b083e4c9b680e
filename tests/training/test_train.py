"""The training loop on synthetic data, PreciseBN, and `klayer train` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klayer.core.config import TrainConfig
from klayer.core.network import Network
from klayer.data.datasets import make_synthetic
from klayer.training import modelfile
from klayer.training.evaluation import population_stats
from klayer.training.plan import make_plan
from klayer.training.runfolder import read_metrics
from klayer.training.trainer import train


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


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov"])
def test_each_steps_cost_has_the_penalty_of_its_weights(optimizer: str) -> None:
    """Plain SGD and momentum hand back the updated weights' sum of squares (from the
    update's own pass, with the C kernels); the next step's cost uses it, and it is the
    penalty that a pass of its own would compute. Weights changed from outside (a
    checkpoint loaded) are summed again."""
    from klayer.core.kernels import BACKEND
    from klayer.core.losses import l2_penalty
    from klayer.training.trainer import Trainer

    data = make_synthetic(seed=2)
    cfg = TrainConfig(dataset="synthetic", hidden=(16, 8), n_batch=50, steps=5,
                      schedule="constant", eta=0.05, lam=0.01, optimizer=optimizer)
    tr = Trainer(cfg, data)
    for _ in range(3):
        tr.step()
        if BACKEND == "c":
            assert tr._squares is not None
            assert tr._squares == pytest.approx(l2_penalty(tr.net.weights(), 1.0), rel=1e-6)
    state = tr.state_dict()
    tr.step()
    tr.load_state_dict(state)
    assert tr._squares is None


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
                "kernels", "matmul"):
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


# --- issue 20: what a newcomer trips over ------------------------------------------------


def test_cli_train_runs_the_length_asked_and_records_it(tmp_path: Path) -> None:
    """--steps and --epochs were rounded up to whole cycles (--steps 10 ran 4,500)."""
    r = run_cli("train", "--dataset", "synthetic", "--steps", "10", "--quiet", "--out", "s",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["steps"] == 10
    r = run_cli("train", "--dataset", "digits", "--epochs", "3", "--quiet", "--out", "e",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["epochs"] == pytest.approx(3.0, abs=0.01)
    toml = (tmp_path / "e" / "config.toml").read_text()
    assert "epochs = 3.0" in toml and f"n_s = {summary['n_s']}" in toml and "cycles" not in toml
    r = run_cli("train", "--dataset", "synthetic", "--quiet", "--out", "d", cwd=tmp_path)
    toml = (tmp_path / "d" / "config.toml").read_text()
    assert "cycles = 2.0" in toml and "n_s = " in toml  # defaults written out too
    again = run_cli("train", "--config", "d/config.toml", "--quiet", "--out", "d2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "d2" / "config.toml").read_text() == toml


def test_cli_evaluate_finds_the_runs_data_without_data_dir(tmp_path: Path) -> None:
    """evaluate RUN/model.npz (and RUN) use the data folder the run's config.toml records."""
    from conftest_data_helpers import make_cifar_folder

    make_cifar_folder(tmp_path / "cifar" / "cifar-10-batches-py", rows=120)
    r = run_cli("train", "--data-dir", "cifar", "--val-size", "100", "--hidden", "8",
                "--n-batch", "50", "--steps", "20", "--quiet", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    env_cwd = tmp_path  # no --data-dir, and no CIFAR-10 in the default places
    for target in ("run/model.npz", "run"):
        ev = subprocess.run([sys.executable, "-m", "klayer", "evaluate", target, "--split", "val"],
                            cwd=env_cwd, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "KLAYER_DATA_DIR": "nowhere"})
        assert ev.returncode == 0, ev.stderr
        assert "val accuracy" in ev.stdout and "(100 examples)" in ev.stdout
    ev = run_cli("evaluate", "cifar", cwd=tmp_path)
    assert ev.returncode == 2 and "no model.npz" in ev.stderr


@pytest.mark.parametrize(("args", "expect"), [
    (["train", "--hiden", "50,50"], "unrecognized arguments: --hiden (did you mean --hidden?)"),
    (["train", "--epoch", "3"], "unrecognized arguments: --epoch (did you mean --epochs?)"),
    (["evaluate", "m.npz", "--splt", "val"], "(did you mean --split?)"),
])
def test_unknown_flags_get_the_subcommands_usage_and_a_hint(
        args: list[str], expect: str, capsys: pytest.CaptureFixture[str]) -> None:
    from klayer.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and expect in err, err
    assert f"usage: klayer {args[0]} " in err  # the subcommand's usage, not klayer's


def test_cli_train_refused_on_a_full_disk_leaves_no_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.toml failing with ENOSPC left an empty run folder (the README says none)."""
    from klayer.cli.main import main
    from klayer.training import runfolder
    from klayer.training.runfolder import OutputError

    def full(path: Path, text: str) -> None:
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(runfolder, "write_text", full)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", "synthetic", "--steps", "5", "--quiet",
                 "--out", "runs/new/run"]) == 5
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_plot_warns_about_runs_of_different_datasets(tmp_path: Path) -> None:
    for dataset in ("synthetic", "digits"):
        r = run_cli("train", "--dataset", dataset, "--steps", "5", "--schedule", "constant",
                    "--quiet", "--out", dataset, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = run_cli("plot", "synthetic", "digits", "--out", "cmp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "different datasets (digits: digits; synthetic: synthetic)" in r.stderr
    r = run_cli("plot", "digits", "digits", "--out", "cmp2", cwd=tmp_path)
    assert r.returncode == 0 and "different datasets" not in r.stderr, r.stderr


def test_progress_bar_shows_the_final_values() -> None:
    """The bar's figures were refreshed every 50 steps only, so the last were stale."""
    import io

    from tqdm import tqdm

    from klayer.cli.train import Progress

    progress = Progress(60, quiet=True)
    progress.quiet = False
    stream = io.StringIO()
    progress.bar = tqdm(total=60, file=stream, mininterval=0)
    for t in range(1, 61):
        progress("step", {"step": t, "lr": 1e-3 * t, "loss": 2.0 / t})
    progress("eval", {"step": 60, "epoch": 1.0, "lr": 0.06, "train_loss": 0.1,
                      "val_loss": 0.2, "val_accuracy": 0.4321})
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert "60/60" in last and "val_acc=43.21%" in last and "lr=6.0e-02" in last, last
    assert "loss=0.033" in last, last


def test_cli_train_seeds_reports_mean_and_std_and_reads_back(tmp_path: Path) -> None:
    args = ("train", "--dataset", "synthetic", "--hidden", "16", "--steps", "40", "--quiet",
            "--seeds", "3", "--seed", "5", "--out", "many")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seeds = json.loads((tmp_path / "many" / "seeds.json").read_text())
    assert seeds["seeds"] == [5, 6, 7]
    tests = [json.loads((tmp_path / "many" / f"seed-{s}" / "summary.json").read_text())
             ["test_accuracy"] for s in (5, 6, 7)]
    assert seeds["test_accuracy"]["values"] == tests and len(set(tests)) > 1
    assert seeds["test_accuracy"]["mean"] == pytest.approx(np.mean(tests))
    assert seeds["test_accuracy"]["std"] == pytest.approx(np.std(tests, ddof=1))
    assert "test_accuracy" in r.stdout and "±" in r.stdout
    again = run_cli(*args, cwd=tmp_path)  # finished seeds are read back, not trained again
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("read back") == 3


def test_cli_train_n_train_trains_on_the_first_examples(tmp_path: Path) -> None:
    r = run_cli("train", "--dataset", "synthetic", "--n-train", "100", "--n-batch", "20",
                "--hidden", "64", "--schedule", "constant", "--eta", "0.05", "--lambda", "0",
                "--epochs", "150", "--quiet", "--out", "small", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert summary["n_train"] == 100 and summary["steps"] == 750
    assert summary["train_accuracy"] >= 0.99  # the assignment's check: 100 examples overfit
    r = run_cli("train", "--dataset", "synthetic", "--n-train", "99999", "--out", "x",
                cwd=tmp_path)
    assert r.returncode == 2 and "n_train (99999) exceeds" in r.stderr


def test_flip_fraction_tests_a_partly_mirrored_test_set(tmp_path: Path) -> None:
    """--flip-fraction (the bonus' 50 % mirrored test images): with the running and
    with adaptive statistics; at 1.0 it is the whole test set mirrored."""
    from conftest_data_helpers import make_cifar_folder

    from klayer.data.augment import hflip
    from klayer.data.datasets import load_cifar10
    from klayer.training.evaluation import evaluate

    make_cifar_folder(tmp_path / "c", rows=120)
    data = load_cifar10(tmp_path / "c", val_size=100)
    base = dict(hidden=(16,), n_batch=50, steps=30, adaptive_bn=True)
    plain = train(TrainConfig(**base), data)  # type: ignore[arg-type]
    assert "test_accuracy_partly_flipped" not in plain.summary
    half = train(TrainConfig(**base, flip_fraction=0.5), data)  # type: ignore[arg-type]
    assert half.summary["flip_fraction"] == 0.5
    assert 0 <= half.summary["test_accuracy_adaptive_bn_partly_flipped"] <= 1
    whole = train(TrainConfig(**base, flip_fraction=1.0), data)  # type: ignore[arg-type]
    assert data.image_shape is not None
    mirrored = hflip(np.asarray(data.test.X), data.image_shape)
    expect = evaluate(whole.net, data, mirrored, data.test.y).accuracy
    assert whole.summary["test_accuracy_partly_flipped"] == expect
    with pytest.raises(ValueError, match="flip_fraction must be in"):
        TrainConfig(flip_fraction=1.5)
