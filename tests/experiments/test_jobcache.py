"""Kept experiment trainings: their format, and what their key holds and ignores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from klayer.core.config import RESULT_NEUTRAL
from klayer.data.files import FormatError
from klayer.experiments import jobcache
from klayer.experiments.jobcache import Outcome
from klayer.experiments.runner import Context

IDENT = {"data": None, "klayer": "0.1.0", "numpy": "2", "kernels": "numpy"}
JOB: jobcache.Job = ("a label", {"dataset": "synthetic", "lambda": 0.01, "seed": 3}, None,
                     True)
OUTCOME = Outcome("a label", 3, {"lambda": 0.01}, {"test_accuracy": 0.5},
                  [{"step": 0.0, "val_accuracy": 0.4}], {})


def test_a_kept_training_carries_its_format_and_is_read_back(tmp_path: Path) -> None:
    path = jobcache.save(tmp_path, JOB, IDENT, OUTCOME)
    assert json.loads(path.read_text())["format"] == jobcache.FORMAT == "klayer-training-2"
    assert jobcache.load(tmp_path, JOB, IDENT, pytest.fail) == OUTCOME


@pytest.mark.parametrize(("fmt", "shown"), [("klayer-training-0", "format 'klayer-training-0'"),
                                            ("something-else", "format 'something-else'"),
                                            (None, "no format")])
def test_a_kept_training_of_another_format_is_refused_naming_both(
        tmp_path: Path, fmt: str | None, shown: str) -> None:
    path = jobcache.save(tmp_path, JOB, IDENT, OUTCOME)
    payload = json.loads(path.read_text())
    if fmt is None:
        del payload["format"]
    else:
        payload["format"] = fmt
    path.write_text(json.dumps(payload))
    with pytest.raises(FormatError) as e:
        jobcache.load(tmp_path, JOB, IDENT, pytest.fail)  # refused, not trained again
    assert str(path) in str(e.value) and shown in str(e.value)
    assert "'klayer-training-2'" in str(e.value)


def test_an_experiment_refuses_a_kept_training_of_another_format(tmp_path: Path) -> None:
    ctx = Context(base={"dataset": "synthetic", "seed": 0}, quick=True, out=tmp_path,
                  log=lambda m: None, keep=True)
    jobs = [("seed 0", ctx.config({}, 0), None, True)]
    ctx.map_jobs(jobs)
    (path,) = (tmp_path / "trainings").glob("*.json")
    path.write_text(path.read_text().replace(jobcache.FORMAT, "klayer-training-0"))
    with pytest.raises(FormatError, match="klayer-training-0"):
        ctx.map_jobs(jobs)


def test_the_key_ignores_exactly_the_result_neutral_settings() -> None:
    neutral = {"data_dir": "/somewhere", "strict_checksums": True, "checkpoint_every": 7,
               "name": "renamed"}
    assert set(neutral) == set(RESULT_NEUTRAL)
    for ident in (IDENT, {**IDENT, "data": {"folder": "/x", "files": []}}):
        moved = (JOB[0], {**JOB[1], **neutral}, JOB[2], JOB[3])
        assert jobcache.key(moved, ident) == jobcache.key(JOB, ident)
        other = (JOB[0], {**JOB[1], "lambda": 0.02}, JOB[2], JOB[3])
        assert jobcache.key(other, ident) != jobcache.key(JOB, ident)


def test_a_kept_training_is_read_back_only_by_the_same_version_and_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs: list[str] = []
    ctx = Context(base={"dataset": "synthetic", "seed": 0}, quick=True, out=tmp_path,
                  log=logs.append, keep=True, identity=jobcache.identity(None))
    jobs = [("seed 0", ctx.config({}, 0), None, True)]
    ctx.map_jobs(jobs)
    assert jobcache.identity(None) == ctx.identity  # the same klayer: nothing else counts
    logs.clear()
    ctx.map_jobs(jobs)
    assert any("(1 read back)" in m for m in logs)
    for change in ("version", "settings"):
        if change == "version":  # another klayer version: its trainings are not reused
            monkeypatch.setattr(jobcache, "__version__", "0.0.1+other")
            ctx.identity = jobcache.identity(None)
            assert ctx.identity["klayer"] == "0.0.1+other"
        else:  # any other setting that decides the result, the seed included
            jobs = [("seed 0", ctx.config({"lambda": 0.02}, 0), None, True),
                    ("seed 0", ctx.config({}, 1), None, True)]
        logs.clear()
        ctx.map_jobs(jobs)
        assert not any("read back" in m for m in logs), (change, logs)
    assert len(list((tmp_path / "trainings").glob("*.json"))) == 4
    logs.clear()
    ctx.map_jobs(jobs)  # and each is reused by the same run again
    assert any("(2 read back)" in m for m in logs)


def test_the_data_identity_follows_the_batch_files(tmp_path: Path) -> None:
    from conftest_data_helpers import make_cifar_folder

    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_folder(folder, rows=40)
    ident = jobcache.identity(folder)
    assert ident == jobcache.identity(tmp_path / "." / "cifar-10-batches-py")  # however spelled
    assert ident["data"]["folder"] == str(folder.resolve())
    time.sleep(0.05)  # past the file system's clock tick
    make_cifar_folder(folder, rows=40, seed=1)  # other images in the same files
    assert jobcache.key(JOB, jobcache.identity(folder)) != jobcache.key(JOB, ident)


def test_a_post_evaluation_enters_the_key_by_its_name_the_same_in_every_process() -> None:
    import subprocess
    import sys

    from klayer.experiments.registry import _bn_stats_post

    code = ("from klayer.experiments import jobcache, registry; print(jobcache.key(('a', {}, "
            "registry._bn_stats_post, True), {}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == jobcache.key(("a", {}, _bn_stats_post, True), {})
    assert jobcache.key(("a", {}, None, True), {}) != r.stdout.strip()
