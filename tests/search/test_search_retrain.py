"""`klayer search best --retrain`: stopped and continued, finished runs read back, other
runs' folders refused."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from test_search import FAST, TRAIN, journal, klayer, spawn

from klayer.search import storage as search_storage
from klayer.search import studies as search
from klayer.training.stop import Stopped

# 100 cycles of 40 steps: long enough to stop in the middle (about 1 s here)
RETRAIN = ("search", "best", "--study", "lam", "--retrain", "--cycles", "100")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-trial lambda study on synthetic data, and its best trial retrained unstopped."""
    cwd = tmp_path_factory.mktemp("retrain")
    r = klayer("search", "init", "--study", "lam", "--param", "lambda=1e-5..1e-1:log",
               "--trials", "3", *TRAIN, cwd=cwd)
    assert r.returncode == 0, r.stderr
    w = klayer("search", "worker", "--study", "lam", *FAST, cwd=cwd)
    assert w.returncode == 0, w.stdout + w.stderr
    whole = klayer(*RETRAIN, "--out", "whole", "--quiet", cwd=cwd)
    assert whole.returncode == 0, whole.stderr
    return cwd


def model(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "model.npz") as z:
        return {k: z[k] for k in z.files}


def summary(folder: Path) -> dict[str, object]:
    s = json.loads((folder / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in ("wall_seconds", "steps_per_second")}


def test_a_stopped_retrain_continues_to_the_same_weights(study: Path) -> None:
    p = spawn(*RETRAIN, "--out", "stopped", cwd=study)
    assert p.stdout is not None
    evals = 0
    for line in p.stdout:  # one line per evaluation: stop after a few, mid-run
        evals += line.startswith("step ")
        if evals == 5:
            p.send_signal(signal.SIGINT)
            break
    out = line + p.stdout.read()
    assert p.wait(timeout=60) == 130, out
    cmd = "klayer " + " ".join(RETRAIN) + " --out stopped"
    assert f"continue with the same command: {cmd}" in out
    folder = study / "stopped"
    ckpts = sorted((folder / "checkpoints").glob("ckpt-*.npz"))
    assert len(ckpts) == 1 and not (folder / "model.npz").exists()
    stopped_at = int(ckpts[0].stem.split("-")[1])
    assert 0 < stopped_at < 4000

    again = klayer(*RETRAIN, "--out", "stopped", cwd=study)
    assert again.returncode == 0, again.stderr
    assert f"continuing from its checkpoint at step {stopped_at} of 4000" in again.stdout
    whole, resumed = model(study / "whole"), model(folder)
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)
    assert summary(folder) == summary(study / "whole")


def test_a_finished_retrain_is_read_back_not_trained_again(study: Path) -> None:
    before, result = model(study / "whole"), summary(study / "whole")
    r = klayer(*RETRAIN, "--out", "whole", cwd=study)
    assert r.returncode == 0, r.stderr
    assert "trained before; its results are read again" in r.stdout
    assert "step " not in r.stdout  # no evaluation ran: nothing was trained
    table = r.stdout.split("\nsplit")[1]  # the summary printed: the run's own figures
    assert f"{result['test_accuracy']:.2%}" in table.split("\ntest")[1].split("\n")[0]
    after = model(study / "whole")
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert summary(study / "whole") == result


def test_a_folder_of_another_run_is_refused_before_training(study: Path) -> None:
    files = {p: p.read_bytes() for p in (study / "whole").rglob("*") if p.is_file()}
    r = klayer("search", "best", "--study", "lam", "--retrain", "--cycles", "2",
               "--out", "whole", cwd=study)
    assert r.returncode == 2
    assert "whole holds another run's checkpoints" in r.stderr and "cycles" in r.stderr
    assert {p: p.read_bytes() for p in (study / "whole").rglob("*") if p.is_file()} == files

    bare = study / "bare"  # results without checkpoints: which run they are is unknown
    bare.mkdir()
    (bare / "summary.json").write_text("{}")
    r = klayer(*RETRAIN, "--out", "bare", cwd=study)
    assert r.returncode == 2 and "holds the summary.json of another run" in r.stderr
    assert [p.name for p in bare.iterdir() if not p.name.startswith(".")] == ["summary.json"]


def test_a_multi_seed_retrain_stopped_in_its_second_seed_goes_on(study: Path) -> None:
    st, info = search_storage.load_study("lam", journal(study, "lam"))
    data = search.load_study_data(info)
    calls = itertools.count()  # asked before every step: 40 for the first seed, then 15

    def stop() -> int | None:
        return signal.SIGINT if next(calls) == 40 + 15 else None

    with pytest.raises(Stopped) as e:
        search.retrain_best(st, info, 1, study / "two", data=data, seeds=2, should_stop=stop)
    assert (e.value.step, e.value.total) == (15, 40)
    events: list[tuple[str, dict[str, float]]] = []
    _, results = search.retrain_best(st, info, 1, study / "two", data=data, seeds=2,
                                     callback=lambda k, i: events.append((k, i)))
    assert [(i["step"], i["seed"]) for k, i in events if k == "resume"] == [
        (40, results[0].config.seed), (15, results[1].config.seed)]
    _, whole = search.retrain_best(st, info, 1, study / "two-whole", data=data, seeds=2)
    for a, b in zip(results, whole, strict=True):
        assert a.config.seed == b.config.seed
        for k in a.net.params:
            np.testing.assert_array_equal(a.net.params[k], b.net.params[k], err_msg=k)
        assert a.summary["test_accuracy"] == b.summary["test_accuracy"]


def test_a_retraining_kept_without_checkpoints_is_refused(study: Path) -> None:
    import shutil

    old = study / "old"  # as an earlier klayer left it: results, config.toml, no checkpoints
    shutil.copytree(study / "whole", old, ignore=shutil.ignore_patterns("checkpoints"))

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in old.rglob("*")
                if p.is_file() and not p.name.startswith(".")}

    before = files()
    r = klayer(*RETRAIN, "--out", "old", cwd=study)
    assert r.returncode == 2 and "holds the model.npz and summary.json of another run, " \
        "without klayer-checkpoint-2 checkpoints" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "step " not in r.stdout
    assert files() == before and not (old / "checkpoints").exists()
