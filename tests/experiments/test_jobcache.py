"""Kept experiment trainings: their format, and what their key ignores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klayer.core.config import RESULT_NEUTRAL
from klayer.data.files import FormatError
from klayer.experiments import jobcache
from klayer.experiments.jobcache import Outcome
from klayer.experiments.runner import Context

IDENT = {"data": None, "code": "0" * 64, "numpy": "2", "kernels": "numpy"}
JOB: jobcache.Job = ("a label", {"dataset": "synthetic", "lambda": 0.01, "seed": 3}, None,
                     True)
OUTCOME = Outcome("a label", 3, {"lambda": 0.01}, {"test_accuracy": 0.5},
                  [{"step": 0.0, "val_accuracy": 0.4}], {})


def test_a_kept_training_carries_its_format_and_is_read_back(tmp_path: Path) -> None:
    path = jobcache.save(tmp_path, JOB, IDENT, OUTCOME)
    assert json.loads(path.read_text())["format"] == jobcache.FORMAT == "klayer-training-1"
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
    assert "'klayer-training-1'" in str(e.value)


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
