"""`klayer search` with the grid sampler: every point once across workers (issue 20 A),
and test accuracies shown only on request (issue 20 B)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from optuna.trial import TrialState
from test_search import FAST, LONG, TRAIN, kill_workers, klayer, spawn, trials, wait_for

from klayer.search import storage as search_storage

GRID = np.linspace(0.01, 0.08, 8).tolist()  # lambda=0.01..0.08:points=8


def grid_study(cwd: Path, name: str, *extra: str) -> None:
    r = klayer("search", "init", "--study", name, "--sampler", "grid",
               "--param", "lambda=0.01..0.08:points=8", *extra, *TRAIN, cwd=cwd)
    assert r.returncode == 0, r.stderr


def test_concurrent_workers_try_every_grid_point_exactly_once(tmp_path: Path) -> None:
    grid_study(tmp_path, "g", "--trials", "8")
    # three worker processes at once: two children of --jobs 2, one asking for two trials
    procs = [spawn("search", "worker", "--study", "g", "--jobs", "2", *FAST, cwd=tmp_path),
             spawn("search", "worker", "--study", "g", "--batch-trials", "2", *FAST,
                   cwd=tmp_path)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        kill_workers(tmp_path, "g")
    assert [p.returncode for p in procs] == [0, 0], outs
    ts = trials(tmp_path, "g")
    assert sorted(t.params["lambda"] for t in ts) == GRID, outs  # each point once, no other
    assert all(t.state == TrialState.COMPLETE for t in ts), [t.state for t in ts]
    again = klayer("search", "worker", "--study", "g", *FAST, cwd=tmp_path)
    assert again.returncode == 0 and len(trials(tmp_path, "g")) == 8, again.stdout
    status = klayer("search", "status", "--study", "g", cwd=tmp_path).stdout
    assert "grid: 8 points: 8 done, 0 pruned, 0 running, 0 waiting, 0 failed" in status, status
    for value in GRID:
        line = next(ln for ln in status.splitlines() if ln.strip().startswith(
            f"lambda={value:.4g} "))
        assert " done " in line, status


def test_a_grid_runs_its_points_whatever_trials_says(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "g", "--sampler", "grid", "--param",
               "lambda=0.01..0.06:points=6", "--trials", "10", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "grid has 6 points: the study runs 6 trials, not the 10 asked" in r.stdout
    study, info = search_storage.load_study("g", str(tmp_path / "runs/search/g/journal.log"))
    assert info.n_trials == 6
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["fixed_params"]["lambda"] for t in waiting) == \
        np.linspace(0.01, 0.06, 6).tolist()
    status = klayer("search", "status", "--study", "g", cwd=tmp_path).stdout
    assert "grid: 6 points: 0 done, 0 pruned, 0 running, 6 waiting, 0 failed" in status, status
    r = klayer("search", "init", "--study", "h", "--sampler", "grid", "--param",
               "lambda=0.01..0.06:points=6", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0 and "grid has" not in r.stdout  # --trials not given: no note


def test_an_interrupted_grid_point_is_queued_again_and_run_once(tmp_path: Path) -> None:
    args = [a if a != "200000" else "10000" for a in LONG]  # ~1-2 s trials
    r = klayer("search", "init", "--study", "i", "--sampler", "grid", "--param",
               "lambda=0.01|0.02", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = spawn("search", "worker", "--study", "i", *FAST, cwd=tmp_path)
    try:
        victim = wait_for(lambda: [t for t in trials(tmp_path, "i")
                                   if t.state == TrialState.RUNNING and t.intermediate_values],
                          "a trial in its training loop")[0]
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, out
    ts = trials(tmp_path, "i")
    queued = [t for t in ts if t.state == TrialState.WAITING
              and t.system_attrs.get("failed_trial") == victim.number]
    assert len(queued) == 1 and queued[0].params == victim.params, out
    w = klayer("search", "worker", "--study", "i", *FAST, cwd=tmp_path, timeout=180)
    assert w.returncode == 0, w.stdout + w.stderr
    done = [t for t in trials(tmp_path, "i") if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lambda"] for t in done) == [0.01, 0.02], w.stdout
    again = [t for t in done if t.params == victim.params][0]
    assert again.user_attrs["seed"] == search_storage.trial_seed(0, victim.number)


def test_a_diverged_grid_point_is_its_result_and_the_grid_still_ends(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "d", "--sampler", "grid", "--param",
               "eta_max=0.05|1e12", *TRAIN, "--no-batch-norm", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w = klayer("search", "worker", "--study", "d", "--jobs", "2", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "d")
    assert len(ts) == 2, [(t.number, t.state, t.params) for t in ts]  # never re-run
    state = {t.params["eta_max"]: t.state for t in ts}
    assert state == {0.05: TrialState.COMPLETE, 1e12: TrialState.FAIL}
    status = klayer("search", "status", "--study", "d", cwd=tmp_path).stdout
    assert "grid: 2 points: 1 done, 0 pruned, 0 running, 0 waiting, 1 failed" in status, status


def test_a_batched_grid_worker_trains_points_of_one_architecture_together(
        tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "b", "--sampler", "grid", "--param",
               "lambda=0.01..0.04:points=4", "--param", "hidden=16|8", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    study, _ = search_storage.load_study("b", str(tmp_path / "runs/search/b/journal.log"))
    study.enqueue_trial({"lambda": 0.5, "hidden": "16"})  # by hand, off the grid
    w = klayer("search", "worker", "--study", "b", "--batch-trials", "4", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = trials(tmp_path, "b")
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    assert sorted((t.params["hidden"], t.params["lambda"]) for t in done) == sorted(
        (h, v) for h in ("16", "8") for v in np.linspace(0.01, 0.04, 4).tolist())
    for t in done:  # four points of one architecture per vectorized pass
        assert [ts[n].params["hidden"] for n in t.user_attrs["batch"]] == [t.params["hidden"]] * 4
    off = ts[-1]
    assert off.state == TrialState.FAIL and "not a point" in off.user_attrs["fail_reason"]
    assert "8/8 grid points done" in w.stdout and "lambda=0.5" in w.stdout


# --- B: test accuracy only with --show-test ---------------------------------------------------


def test_test_accuracy_is_shown_only_with_show_test(tmp_path: Path) -> None:
    for name in ("a", "b"):
        r = klayer("search", "init", "--study", name, "--param", "lambda=1e-4..1e-1:log",
                   "--trials", "2", *TRAIN, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    quiet = klayer("search", "worker", "--study", "a", *FAST, cwd=tmp_path)
    shown = klayer("search", "worker", "--study", "b", "--show-test", *FAST, cwd=tmp_path)
    assert quiet.returncode == 0 and shown.returncode == 0, quiet.stderr + shown.stderr
    lines = [ln for ln in quiet.stdout.splitlines() if "COMPLETE  val" in ln]
    assert len(lines) == 2 and not any("test" in ln for ln in lines), quiet.stdout
    lines = [ln for ln in shown.stdout.splitlines() if "COMPLETE  val" in ln]
    assert len(lines) == 2 and all(" test " in ln for ln in lines), shown.stdout
    status = klayer("search", "status", "--study", "a", cwd=tmp_path).stdout
    assert "val acc" in status and "test" not in status, status
    status = klayer("search", "status", "--study", "a", "--show-test", cwd=tmp_path).stdout
    assert "test acc" in status and "  test " in status.split("best:")[1], status
    js = klayer("search", "status", "--study", "a", "--json", cwd=tmp_path).stdout
    assert "test_accuracy" not in js and "val_accuracy" in js
    js = klayer("search", "status", "--study", "a", "--json", "--show-test", cwd=tmp_path).stdout
    assert "test_accuracy" in js
    best = klayer("search", "best", "--study", "a", cwd=tmp_path).stdout
    assert "best trial #" in best and "test" not in best, best
    best = klayer("search", "best", "--study", "a", "--show-test", cwd=tmp_path).stdout
    assert ", test " in best, best
