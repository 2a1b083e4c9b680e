"""`klayer search` on journal storage: workers, budgets, refusals, faults, status, best."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from klayer.core.config import TrainConfig
from klayer.search import backend as search_backend
from klayer.search import space as search_space
from klayer.search import status
from klayer.search import storage as search_storage
from klayer.search import studies as search
from klayer.training import trainer as train
from klayer.training.stop import StopSignals

# About 0.1-0.3 s per trial on synthetic data. No pruning: these tests count on every
# trial training to its end (tests/search/test_pruning.py tests pruning).
TRAIN = ["--dataset", "synthetic", "--hidden", "16", "--n-batch", "50", "--n-s", "20",
         "--cycles", "1", "--evals-per-cycle", "2", "--checkpoint-every", "0", "--pruner", "none"]
LONG = ["--dataset", "synthetic", "--hidden", "16", "--n-batch", "50", "--n-s", "200000",
        "--cycles", "1", "--evals-per-cycle", "1", "--checkpoint-every", "0", "--pruner", "none"]
FAST = ["--poll", "0.2"]


def klayer(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env())


def spawn(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "klayer", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KLAYER_STORAGE", None)
    return env


def journal(cwd: Path, name: str) -> str:
    return str(cwd / "runs" / "search" / name / "journal.log")


def trials(cwd: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study, _ = search_storage.load_study(name, journal(cwd, name))
    return study.get_trials(deepcopy=False)


def wait_for(cond: Any, what: str, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def running(cwd: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    path = Path(journal(cwd, name))
    if not path.exists():
        return []
    return [t for t in trials(cwd, name) if t.state == TrialState.RUNNING
            and "worker" in t.user_attrs]


def training(cwd: Path, name: str) -> optuna.trial.FrozenTrial | None:
    """A trial whose worker is in its training loop, not writing to the journal.

    Its first evaluation (step 0) is the worker's last journal write before training;
    no lock file means that write has finished. A worker killed while it holds the
    journal lock stalls every other writer for Optuna's 30 s grace period.
    """
    lock = Path(journal(cwd, name) + ".lock")
    busy = [t for t in running(cwd, name) if 0 in t.intermediate_values]
    return busy[0] if busy and not os.path.lexists(lock) else None


def kill_workers(cwd: Path, name: str) -> None:
    """SIGKILL the worker processes of a study that are still alive (after a failure)."""
    for t in trials(cwd, name):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        cmdline = Path(f"/proc/{pid}/cmdline")
        if host == socket.gethostname() and pid.isdigit() and cmdline.exists() and \
                b"klayer" in cmdline.read_bytes():
            os.kill(int(pid), signal.SIGKILL)


def kill_one_of_two_workers(cwd: Path, name: str) -> tuple[optuna.trial.FrozenTrial, int, str]:
    """``search worker --jobs 2`` with one worker SIGKILLed in its training loop; (its
    trial then, its pid, the output), the command having ended with exit 0."""
    p = spawn("search", "worker", "--study", name, "--jobs", "2", *FAST, cwd=cwd)
    try:
        victim = wait_for(lambda: training(cwd, name), "a trial in its training loop")
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
        kill_workers(cwd, name)
    assert p.returncode == 0, out
    return victim, pid, out


@pytest.fixture(scope="module")
def lam_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lambda search of 8 trials done by 2 worker processes (shared by several tests)."""
    cwd = tmp_path_factory.mktemp("search")
    r = klayer("search", "init", "--study", "lam", "--param", "lambda=1e-5..1e-1:log",
               "--trials", "8", *TRAIN, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "created study lam" in r.stdout
    w = klayer("search", "worker", "--study", "lam", "--jobs", "2", *FAST, cwd=cwd)
    assert w.returncode == 0, w.stdout + w.stderr
    assert "started 2 workers" in w.stdout
    return cwd


def test_two_journal_workers_meet_the_budget(lam_study: Path) -> None:
    ts = trials(lam_study, "lam")
    numbers = [t.number for t in ts]
    assert len(numbers) == len(set(numbers))
    assert all(t.state == TrialState.COMPLETE for t in ts), [t.state for t in ts]
    assert len(ts) >= 8  # two workers finishing at once may overshoot by one
    lambdas = [t.params["lambda"] for t in ts]
    assert len(set(lambdas)) == len(lambdas)
    assert all(1e-5 <= v <= 1e-1 for v in lambdas)
    assert all(t.user_attrs["worker"] for t in ts)  # (under load one worker may do them all)
    for t in ts:  # the seed rule, and the results recorded
        assert t.user_attrs["seed"] == search_storage.trial_seed(0, t.number)
        assert 0 <= t.user_attrs["test_accuracy"] <= 1 and t.value == t.user_attrs[
            "val_accuracy"]
        assert t.intermediate_values  # learning curve for optuna-dashboard


def test_status_best_and_retrain(lam_study: Path) -> None:
    r = klayer("search", "status", "--study", "lam", cwd=lam_study)
    assert r.returncode == 0, r.stderr
    assert "8/8 COMPLETE" in r.stdout or "COMPLETE," in r.stdout
    assert "best: #" in r.stdout and "lambda" in r.stdout and "worker" in r.stdout
    ts = trials(lam_study, "lam")
    best = max(ts, key=lambda t: (t.value, -t.number))
    b = klayer("search", "best", "--study", "lam", "--retrain", "--cycles", "2", "--quiet",
               cwd=lam_study)
    assert b.returncode == 0, b.stderr
    assert f"best trial #{best.number}" in b.stdout and "test" in b.stdout
    out = lam_study / "runs" / "search" / "lam" / f"best-trial-{best.number}-2cycles"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 80  # 2 cycles of 2 n_s = 40 steps
    study, _ = search_storage.load_study("lam", journal(lam_study, "lam"))
    assert study.user_attrs["retrain"]["test_accuracy"] == summary["test_accuracy"]
    js = json.loads(klayer("search", "status", "--study", "lam", "--json",
                           cwd=lam_study).stdout)
    assert [t["number"] for t in js] == [t.number for t in ts]


def test_retrain_with_several_seeds_reports_their_mean(lam_study: Path) -> None:
    b = klayer("search", "best", "--study", "lam", "--retrain", "--cycles", "1", "--seeds", "3",
               "--quiet", "--out", "three", cwd=lam_study)
    assert b.returncode == 0, b.stderr
    study, info = search_storage.load_study("lam", journal(lam_study, "lam"))
    r = study.user_attrs["retrain"]
    best_seed = study.best_trial.user_attrs["seed"]
    assert r["seeds"] == search_storage.retrain_seeds(best_seed, 3) and r["seeds"][0] == best_seed
    assert len(set(r["seeds"])) == 3
    tests = [json.loads((lam_study / "three" / f"seed-{s}" / "summary.json").read_text())
             ["test_accuracy"] for s in r["seeds"]]
    assert r["test_accuracies"] == tests
    assert math.isclose(r["test_accuracy"], sum(tests) / 3)
    assert f"mean {r['test_accuracy']:.2%}" in b.stdout
    bad = klayer("search", "best", "--study", "lam", "--seeds", "2", cwd=lam_study)
    assert bad.returncode == 2 and "--retrain" in bad.stderr
    bad = klayer("search", "best", "--study", "lam", "--retrain", "--seeds", "0", cwd=lam_study)
    assert bad.returncode == 2 and "--seeds" in bad.stderr


def test_coarse_to_fine_child_study(lam_study: Path) -> None:
    r = klayer("search", "init", "--study", "fine", "--parent", "lam", "--top-k", "3",
               "--trials", "2", "--dataset", "synthetic", cwd=lam_study)
    assert r.returncode == 0, r.stderr
    study, info = search_storage.load_study("fine", journal(lam_study, "fine"))
    study = search_storage.load_study("lam", journal(lam_study, "lam"))[0]
    top = search_storage.top_trials(study, 3)
    assert info.parent is not None and info.parent["study"] == "lam"
    assert info.parent["trials"] == [t.number for t in top]
    lo, hi = info.space["lambda"]["low"], info.space["lambda"]["high"]
    values = [t.params["lambda"] for t in top]
    assert 1e-5 <= lo <= min(values) and max(values) <= hi <= 1e-1
    assert info.config.hidden == (16,) and info.config.n_s == 20  # the parent's base
    w = klayer("search", "worker", "--study", "fine", *FAST, cwd=lam_study)
    assert w.returncode == 0, w.stdout + w.stderr
    assert all(lo <= t.params["lambda"] <= hi for t in trials(lam_study, "fine"))


def test_workers_refuse_other_configuration_or_data(lam_study: Path) -> None:
    r = klayer("search", "worker", "--study", "lam", "--lambda", "0.5", cwd=lam_study)
    assert r.returncode == 2 and "configuration differs" in r.stderr and "lambda" in r.stderr
    r = klayer("search", "worker", "--study", "nope", cwd=lam_study)
    assert r.returncode == 2 and "no study 'nope'" in r.stderr
    r = klayer("search", "init", "--study", "lam", "--param", "lambda=0.1..0.2", *TRAIN,
               cwd=lam_study)
    assert r.returncode == 2 and "already exists" in r.stderr
    # a study whose data differ (same path, other fingerprint)
    other = lam_study / "other"
    other.mkdir()
    r = klayer("search", "init", "--study", "d", "--param", "lambda=0.1..0.2", *TRAIN,
               cwd=other)
    assert r.returncode == 0, r.stderr
    study, _ = search_storage.load_study("d", journal(other, "d"))
    study.set_user_attr(search_storage.A_DATA, "sha256:" + "0" * 64)
    r = klayer("search", "worker", "--study", "d", cwd=other)
    assert r.returncode == 2 and "data" in r.stderr and "differ" in r.stderr


def test_a_study_of_another_format_is_refused_naming_it(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "new", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "1", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study, info = search_storage.load_study("new", journal(tmp_path, "new"))
    assert study.user_attrs["klayer_format"] == search_storage.FORMAT == 1
    # as an earlier klayer made it (its attributes but no format), and of an unknown format
    for name, fmt in (("old", None), ("future", 2)):
        other = optuna.create_study(study_name=name, storage=info.store.storage)
        for key, value in study.user_attrs.items():
            if key != "klayer_format":
                other.set_user_attr(key, value)
        if fmt is not None:
            other.set_user_attr("klayer_format", fmt)
    for name, found, action in (("old", "has no study format", "status"),
                                ("old", "has no study format", "worker"),
                                ("future", "has study format 2", "best")):
        r = klayer("search", action, "--study", name, "--storage", journal(tmp_path, "new"),
                   cwd=tmp_path)
        assert r.returncode == 2 and found in r.stderr, r.stderr
        assert "reads study format 1 only" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_diverged_trial_fails_with_reason_and_the_worker_goes_on(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "div", "--param", "eta_max=0.01..0.1", "--trials",
               "2", *TRAIN, "--no-batch-norm", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study, _ = search_storage.load_study("div", journal(tmp_path, "div"))
    study.enqueue_trial({"eta_max": 1e12}, skip_if_exists=False)
    w = klayer("search", "worker", "--study", "div", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "div")
    assert ts[0].state == TrialState.FAIL and "diverged" in ts[0].user_attrs["fail_reason"]
    assert [t.state for t in ts[1:]] == [TrialState.COMPLETE] * 2


def test_batched_worker_trains_trials_together(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "b", "--param", "lambda=1e-4..1e-1:log",
               "--param", "eta_max=0.05..0.2", "--trials", "4", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # a fixed sampler seed: the trials' parameters, and so the checks below, are the same
    # every run (with other draws, a trial on its own order can end within 1e-4 by chance)
    w = klayer("search", "worker", "--study", "b", "--batch-trials", "4", "--sampler-seed", "0",
               *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "b")
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 4
    assert all(t.user_attrs["batch"] == [0, 1, 2, 3] for t in ts)
    assert {t.user_attrs["order_seed"] for t in ts} == {ts[0].user_attrs["seed"]}
    assert len({t.user_attrs["seed"] for t in ts}) == 4
    for t in ts:  # learning curves as lone trials report them: 2 per cycle of 40 steps, + end
        assert sorted(t.intermediate_values) == [0, 20, 40]
        assert t.intermediate_values[40] == t.value
    # a trial retrained alone replays its batch's mini-batch order, so it ends where the
    # trial did (float32: the wide first-layer product rounds a little differently)
    study, info = search_storage.load_study("b", journal(tmp_path, "b"))
    data = search.load_study_data(info)
    for t in ts:
        cfg = search.trial_config(t, info)
        assert cfg.shuffle_seed == ts[0].user_attrs["seed"] and cfg.seed == t.user_attrs["seed"]
        alone = train.train(cfg, data).summary
        assert alone["val_loss"] == pytest.approx(t.user_attrs["val_loss"], rel=1e-4)
        own = train.train(replace(cfg, order_seed=None), data).summary  # its own order
        if t.number:
            assert own["val_loss"] != pytest.approx(t.user_attrs["val_loss"], rel=1e-4)


def test_sigterm_fails_the_running_trials_of_every_worker(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "t", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "4", *LONG, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = spawn("search", "worker", "--study", "t", "--jobs", "2", *FAST, cwd=tmp_path)
    wait_for(lambda: len(running(tmp_path, "t")) == 2, "both workers' trials")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out
    ts = trials(tmp_path, "t")
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all("SIGTERM" in t.user_attrs["fail_reason"] for t in failed)
    # each stopped trial is queued again with its parameters, and so runs with its seed
    again = {t.system_attrs["failed_trial"]: t for t in ts if t.state == TrialState.WAITING}
    assert sorted(again) == sorted(t.number for t in failed), out
    for t in failed:
        assert again[t.number].params == t.params
        assert search_storage.seed_of(again[t.number], 0) == t.user_attrs["seed"]


def test_a_killed_worker_is_noticed_and_its_trial_retried(tmp_path: Path) -> None:
    args = [a if a != "200000" else "10000" for a in LONG]  # ~1-2 s trials
    r = klayer("search", "init", "--study", "k", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "3", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    victim, pid, out = kill_one_of_two_workers(tmp_path, "k")
    assert f"worker {pid} died (SIGKILL)" in out
    ts = trials(tmp_path, "k")
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [victim.number], out
    assert "SIGKILL" in failed[0].user_attrs["fail_reason"], out
    dead = failed[0]
    retries = [t for t in ts if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, out
    assert retries[0].params == dead.params
    assert retries[0].user_attrs["seed"] == search_storage.trial_seed(0, dead.number)
    assert sum(t.state == TrialState.COMPLETE for t in ts) >= 3


def test_a_dead_writers_journal_lock_can_be_freed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna frees the lock of a journal writer that died (after 30 s) only if the lock,
    a symlink to the journal, resolves; a relative one never does, and every worker
    then waits forever. So journals given by a relative path are opened absolute."""
    from klayer.search.backend import open_storage

    monkeypatch.chdir(tmp_path)
    storage = open_storage("runs/search/s/journal.log")
    lock = getattr(getattr(storage, "_backend", None), "_lock", None)
    if not hasattr(lock, "acquire"):
        pytest.skip("this Optuna keeps its journal lock elsewhere")
    link = tmp_path / "runs" / "search" / "s" / "journal.log.lock"
    lock.acquire()  # as a writer that is then killed would leave it
    try:
        assert os.path.lexists(link) and link.resolve() == (link.parent / "journal.log")
        assert os.path.exists(link), f"{link} -> {os.readlink(link)} does not resolve"
    finally:
        lock.release()


def test_reap_fails_abandoned_trials_and_queues_them_again(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "r", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "1", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study, _ = search_storage.load_study("r", journal(tmp_path, "r"))
    t = study.ask()  # a worker that asked and vanished
    t.suggest_float("lambda", 1e-4, 1e-1, log=True)
    t.set_user_attr("worker", "gone:1")
    s = klayer("search", "status", "--study", "r", "--stuck-after", "0s", cwd=tmp_path)
    assert "warning: 1 trial(s) RUNNING" in s.stdout and "gone:1" in s.stdout
    r = klayer("search", "reap", "--study", "r", "--older-than", "1h", cwd=tmp_path)
    assert r.returncode == 0 and "no trial" in r.stdout
    r = klayer("search", "reap", "--study", "r", "--older-than", "0s", cwd=tmp_path)
    assert r.returncode == 0 and "#0 (gone:1) marked FAIL" in r.stdout
    ts = trials(tmp_path, "r")
    assert ts[0].state == TrialState.FAIL and "reaped" in ts[0].user_attrs["fail_reason"]
    assert ts[1].state == TrialState.WAITING and ts[1].params == ts[0].params
    w = klayer("search", "worker", "--study", "r", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "r")
    assert ts[1].state == TrialState.COMPLETE and ts[1].user_attrs["seed"] == \
        search_storage.trial_seed(0, 0)


def test_a_worker_killed_before_labelling_its_trial_leaves_no_trial_running(
        tmp_path: Path) -> None:
    from klayer.search.pool import _Pool

    r = klayer("search", "init", "--study", "o", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "1", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study, info = search_storage.load_study("o", journal(tmp_path, "o"))
    t = study.ask()  # asked, never labelled: the child died in between
    t.suggest_float("lambda", 1e-4, 1e-1, log=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.2)  # the death comes after the ask
    child.kill()
    said: list[str] = []
    start = time.monotonic()
    # the only child: no sibling to wait for
    _Pool(study, info.store, [child], said.append).watch(StopSignals())
    assert time.monotonic() - start < 10, "with no live sibling the orphan is not waited on"
    ts = trials(tmp_path, "o")
    assert ts[0].state == TrialState.FAIL and "as it began the trial" in ts[0].user_attrs[
        "fail_reason"]
    assert ts[1].state == TrialState.WAITING and ts[1].params == ts[0].params
    assert any("failed and queued again" in line for line in said), said


# --- units ---------------------------------------------------------------------------------


def test_param_flags_and_space_tables() -> None:
    assert search_space.parse_param("lambda=1e-5..1e-1:log") == (
        "lambda", {"low": 1e-5, "high": 0.1, "log": True})
    assert search_space.parse_param("hidden=50,50|50,30,20") == (
        "hidden", {"choices": [[50, 50], [50, 30, 20]]})
    assert search_space.parse_param("batch-norm=true|false") == (
        "batch_norm", {"choices": [True, False]})
    base = TrainConfig()
    space = search_space.normalize_space({
        "lambda": {"low": 1e-5, "high": 1e-1, "log": True},
        "eta_max": {"low": 0.05, "high": 0.2}, "n_batch": [50, 100],
        "depth": {"low": 1, "high": 3}, "width": [50, 100], "init": ["he", "xavier"],
        "optimizer": ["sgd", "adam"], "batch_norm": [True, False]}, base)
    assert space["depth"] == {"low": 1, "high": 3, "int": True}
    assert "lambda log-uniform [1e-05, 0.1]" in search_space.describe_space(space)
    cfg = search_space.config_for(base, {"lambda": 0.01, "depth": 3, "width": 100,
                                   "batch_norm": False}, seed=7)
    assert (cfg.lam, cfg.hidden, cfg.batch_norm, cfg.seed) == (0.01, (100, 100, 100), False, 7)
    assert search_space.config_for(base, {"hidden": "50,30"}, 0).hidden == (50, 30)
    g = search_space.grid(space, points=3)
    assert len(g["lambda"]) == 3 and g["depth"] == [1, 2, 3] and g["n_batch"] == [50, 100]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"lamda": {"low": 0.1, "high": 1}}, "unknown search key 'lamda'"),
        ({"seed": [1, 2]}, "seed cannot be searched"),
        ({"lambda": {"low": 0.0, "high": 1, "log": True}}, "log range needs low > 0"),
        ({"lambda": {"low": 1, "high": 0.1}}, "must be below"),
        ({"n_batch": {"low": 10.5, "high": 20}}, "must be an integer"),
        ({"init": ["he", "kaiming"]}, "init"),
        ({"hidden": [[50, 0]]}, "hidden"),
        ({"hidden": [[50]], "depth": [1, 2]}, "not both"),
        ({}, "empty"),
    ],
)
def test_bad_spaces_are_refused_by_name(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(search_space.SearchError, match=match):
        search_space.normalize_space(raw, TrainConfig())


def test_child_space_narrows_to_the_top_trials() -> None:
    space = {"lambda": {"low": 1e-5, "high": 1e-1, "log": True, "int": False},
             "n_batch": {"low": 10, "high": 200, "step": 10, "int": True},
             "init": {"choices": ["he", "xavier", "normal"]}}
    dists = {"lambda": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
             "n_batch": optuna.distributions.IntDistribution(10, 200, step=10),
             "init": optuna.distributions.CategoricalDistribution(["he", "xavier", "normal"])}
    top = [optuna.trial.create_trial(params=p, distributions=dists, value=0.5)
           for p in ({"lambda": 1e-3, "n_batch": 50, "init": "he"},
                     {"lambda": 1e-2, "n_batch": 100, "init": "normal"})]
    child = search_space.child_space(space, top, margin=0.5)
    assert child["lambda"]["low"] == pytest.approx(10**-3.5)
    assert child["lambda"]["high"] == pytest.approx(10**-1.5)
    assert (child["n_batch"]["low"], child["n_batch"]["high"]) == (20, 130)  # outwards
    assert child["init"] == {"choices": ["he", "normal"]}


def test_durations_seeds_and_storage_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert status.parse_duration("90s") == 90 and status.parse_duration("1h30m") == 5400
    assert status.parse_duration("2d") == 172800 and status.parse_duration("15") == 15
    with pytest.raises(search_space.SearchError):
        status.parse_duration("soon")
    seed = search_storage.trial_seed
    assert seed(0, 3) != seed(0, 4) != seed(1, 4)
    monkeypatch.delenv("KLAYER_STORAGE", raising=False)
    assert search_storage.resolve_storage("s") == str(Path("runs/search/s/journal.log"))
    monkeypatch.setenv("KLAYER_STORAGE", "postgresql+psycopg://u:secret@h/db")
    assert search_storage.resolve_storage("s") == "postgresql+psycopg://u:secret@h/db"
    assert search_backend.masked(search_storage.resolve_storage("s")) == "postgresql+psycopg://u:***@h/db"


def test_run_study_from_python_coarse_then_fine(tmp_path: Path) -> None:
    from klayer.data.datasets import make_synthetic

    cfg = TrainConfig(dataset="synthetic", hidden=(16,), n_batch=50, n_s=20, cycles=1,
                      evals_per_cycle=1, checkpoint_every=0)
    data = make_synthetic(seed=0)
    space = {"lambda": {"low": 1e-5, "high": 1e-1, "log": True}}
    coarse, _ = search.run_study("c", cfg, space, 4, runs_dir=tmp_path, data=data)
    assert len(coarse.get_trials(states=(TrialState.COMPLETE,))) == 4
    fine, info = search.run_study("f", cfg, None, 2, runs_dir=tmp_path, parent="c", top_k=2,
                                  data=data)
    assert info.parent is not None and info.parent["study"] == "c"
    assert len(fine.get_trials(states=(TrialState.COMPLETE,))) == 2
    again, _ = search.run_study("f", cfg, None, 2, runs_dir=tmp_path, parent="c", data=data)
    assert len(again.get_trials()) == 2  # joined, nothing more to do


def test_bad_durations_are_refused() -> None:
    for text in ("-1", "-5m", "nan", "inf"):
        with pytest.raises(search_space.SearchError):
            status.parse_duration(text)
    assert status.parse_duration("0s") == 0  # reap --older-than 0s: every RUNNING trial


def test_a_configuration_the_data_cannot_take_fails_alone(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "nb", "--param", "n_batch=20..100000", "--trials",
               "2", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study, _ = search_storage.load_study("nb", journal(tmp_path, "nb"))
    study.enqueue_trial({"n_batch": 100000}, skip_if_exists=False)  # > the training set
    study.enqueue_trial({"n_batch": 50}, skip_if_exists=False)
    study.enqueue_trial({"n_batch": 25}, skip_if_exists=False)
    w = klayer("search", "worker", "--study", "nb", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "nb")
    assert ts[0].state == TrialState.FAIL and "invalid" in ts[0].user_attrs["fail_reason"]
    assert [t.state for t in ts[1:]] == [TrialState.COMPLETE] * 2


def test_a_grid_search_ends_cleanly_at_its_last_point(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "g", "--param", "lambda=1e-4..1e-2:log:points=3",
               "--sampler", "grid", "--trials", "3", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w = klayer("search", "worker", "--study", "g", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "g")
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 3
    assert len({t.params["lambda"] for t in ts}) == 3


@pytest.mark.parametrize(("args", "match"), [
    (["status", "--study", "s", "--storage", "folder"], "folder is a folder; name a journal"),
    (["status", "--study", "s", "--storage", "notes.txt"], "not an Optuna journal file"),
    (["worker", "--study", "s", "--poll", "nan"], "--poll must be"),
    (["worker", "--study", "s", "--sampler-seed", "-1"], "--sampler-seed must be in"),
])
def test_bad_storage_and_worker_flags_are_usage_errors(tmp_path: Path, args: list[str],
                                                      match: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("some notes\nnot a journal\n")
    r = klayer("search", *args, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "notes.txt").read_text() == "some notes\nnot a journal\n"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://klayer:s3cret@db/klayer", "postgresql+psycopg://klayer:***@db/klayer"),
    ("postgresql://u:p@ss@db:5432/k", "postgresql://u:***@db:5432/k"),  # a raw @ in it
    ("postgresql://u@db/k?sslmode=require&password=s3cret", "postgresql://u@db/k?sslmode="
     "require&password=***"),
    ("runs/search/lam/journal.log", "runs/search/lam/journal.log"),
])
def test_passwords_are_masked_wherever_they_sit(url: str, shown: str) -> None:
    assert search_backend.masked(url) == shown


def test_a_url_with_one_slash_is_refused_not_taken_for_a_path(tmp_path: Path) -> None:
    bad = "postgresql+psycopg:/klayer:s3cret@db/klayer"
    r = klayer("search", "init", "--study", "s", "--storage", bad, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "2", *TRAIN, cwd=tmp_path)
    assert r.returncode == 2 and "starts like a database URL" in r.stderr
    assert "s3cret" not in r.stdout + r.stderr and not list(tmp_path.iterdir())


def test_init_never_prints_a_password_and_hints_a_command_that_works(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "s.db") + "?password=s3cret"
    r = klayer("search", "init", "--study", "s", "--storage", url, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "2", *TRAIN, cwd=tmp_path)
    assert "s3cret" not in r.stdout + r.stderr, r.stdout + r.stderr
    if r.returncode == 0:  # SQLite takes no password; either way nothing shows it
        assert 'next: klayer search worker --study s --storage "$KLAYER_STORAGE"' in r.stdout


def test_an_init_cut_short_is_made_again_and_delete_asks_first(tmp_path: Path) -> None:
    init = ("search", "init", "--study", "h", "--param", "lambda=1e-4..1e-1:log", "--trials",
            "2", *TRAIN)
    (tmp_path / "runs" / "search" / "h").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        journal(tmp_path, "h")))
    half = optuna.create_study(study_name="h", storage=storage)  # killed before its settings
    half.set_user_attr("sampler", "random")
    r = klayer("search", "status", "--study", "h", cwd=tmp_path)
    assert r.returncode == 2 and "still being created" in r.stderr
    r = klayer(*init, cwd=tmp_path)
    assert r.returncode == 0 and "created study h" in r.stdout, r.stderr
    r = klayer(*init, cwd=tmp_path)  # a finished study is never replaced
    assert r.returncode == 2 and "already exists" in r.stderr
    no = subprocess.run([sys.executable, "-m", "klayer", "search", "delete", "--study", "h"],
                        cwd=tmp_path, input="nope\n", capture_output=True, text=True,
                        timeout=120, env=_env())
    assert no.returncode == 0 and "not deleted" in no.stdout
    assert klayer("search", "status", "--study", "h", cwd=tmp_path).returncode == 0
    r = klayer("search", "delete", "--study", "h", "--yes", cwd=tmp_path)
    assert r.returncode == 0 and "deleted study h (0 trials)" in r.stdout, r.stderr
    r = klayer("search", "status", "--study", "h", cwd=tmp_path)
    assert r.returncode == 2 and "no study 'h'" in r.stderr
    r = klayer("search", "delete", "--study", "gone", "--yes", cwd=tmp_path)
    assert r.returncode == 2 and "no study 'gone'" in r.stderr


def test_a_worker_must_use_the_studys_fault_timing(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "t", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "1", "--heartbeat-interval", "5", "--grace-period", "20", *TRAIN,
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, info = search_storage.load_study("t", journal(tmp_path, "t"))
    assert (info.heartbeat_interval, info.grace_period) == (5, 20)
    r = klayer("search", "worker", "--study", "t", "--grace-period", "3", cwd=tmp_path)
    assert r.returncode == 2 and "--grace-period 3: study 't' uses 20 s" in r.stderr
    r = klayer("search", "init", "--study", "u", "--param", "lambda=1e-4..1e-1:log",
               "--heartbeat-interval", "30", "--grace-period", "30", *TRAIN, cwd=tmp_path)
    assert r.returncode == 2 and "must exceed --heartbeat-interval" in r.stderr


def test_two_workers_finishing_the_last_trial_at_once_never_overshoot(tmp_path: Path) -> None:
    """Both asked while one COMPLETE trial was missing; the second to finish is not counted
    (the race that overshot 13/12 with four workers and short trials)."""
    from klayer.search.worker import Worker, WorkerOptions

    r = klayer("search", "init", "--study", "b", "--param", "lambda=1e-4..1e-1:log",
               "--trials", "1", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    opts = WorkerOptions(study="b", storage=journal(tmp_path, "b"), quiet=True)
    a, b = Worker(opts), Worker(opts)
    jobs_a, jobs_b = a._ask(1), b._ask(1)  # both see 0 of 1 COMPLETE
    a._run_jobs(jobs_a)
    b._run_jobs(jobs_b)
    states = [t.state for t in trials(tmp_path, "b")]
    assert states.count(TrialState.COMPLETE) == 1 and states.count(TrialState.FAIL) == 1
    late = next(t for t in trials(tmp_path, "b") if t.state == TrialState.FAIL)
    assert "over budget" in late.user_attrs["fail_reason"] and "val_accuracy" in late.user_attrs
