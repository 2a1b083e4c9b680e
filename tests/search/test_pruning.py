"""Pruning in `klayer search`: the study's pruner, pruned trials, status and plot, faults."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from test_search import FAST, journal, kill_one_of_two_workers, klayer, trials

from klayer.search import storage as search_storage
from klayer.search.pruning import PrunerSettings, make_pruner, pruner_settings
from klayer.search.space import SearchError

# 40 steps a trial, a report every 5 (reports at 0, 5, ..., 35 and at the end, 40);
# lambda up to 3 gives some trials that are visibly worse early.
PRUNED = ["--dataset", "synthetic", "--hidden", "16", "--n-batch", "50", "--n-s", "20",
          "--cycles", "1", "--evals-per-cycle", "8", "--checkpoint-every", "0",
          "--param", "lambda=1e-4..3:log", "--pruner", "sha", "--min-resource", "5",
          "--reduction-factor", "2"]


def test_pruner_settings_are_checked_and_default_to_half_the_training() -> None:
    s = pruner_settings(None, None, None, 9000)
    assert s == PrunerSettings("sha", 4500, 4, 9000)
    assert PrunerSettings.from_attr(s.to_attr()) == s
    assert PrunerSettings.from_attr(None).pruner == "none"  # a study made before pruners
    assert pruner_settings("none", None, None, 9000).pruner == "none"
    assert isinstance(make_pruner(pruner_settings("hyperband", 100, 3, 9000)),
                      optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(pruner_settings("median", 100, 3, 9000)),
                      optuna.pruners.MedianPruner)
    for args, flag in [(("asha", None, None), "--pruner"), (("sha", None, 1), "--reduction"),
                       (("sha", 9000, None), "--min-resource"), (("sha", 0, None), "--min-res"),
                       (("sha", 2.5, None), "--min-resource")]:
        with pytest.raises(SearchError, match=flag):
            pruner_settings(*args, 9000)  # type: ignore[arg-type]


def test_the_pruner_comes_from_flags_or_the_space_file_and_is_stored(tmp_path: Path) -> None:
    (tmp_path / "space.toml").write_text(
        'pruner = "hyperband"\nreduction_factor = 4\n[lambda]\nlow = 1e-4\nhigh = 1e-1\n'
        'log = true\n')
    r = klayer("search", "init", "--study", "p", "--space", "space.toml", "--min-resource",
               "6", *PRUNED[:12], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pruner: hyperband (min 6 steps, reduction factor 4, of 40)" in r.stdout
    _, info = search_storage.load_study("p", journal(tmp_path, "p"))
    assert info.pruner == PrunerSettings("hyperband", 6, 4, 40)
    bad = klayer("search", "init", "--study", "q", *PRUNED, "--min-resource", "40",
                 cwd=tmp_path)
    assert bad.returncode == 2 and "--min-resource" in bad.stderr and "40" in bad.stderr
    assert not Path(journal(tmp_path, "q")).exists()  # refused before anything was made
    default = klayer("search", "init", "--study", "d", *PRUNED[:16], cwd=tmp_path)
    assert "pruner: sha (min 20 steps, reduction factor 4, of 40)" in default.stdout


def check_pruned_study(cwd: Path, name: str, budget: int) -> list[optuna.trial.FrozenTrial]:
    """Every trial ended once: COMPLETE or PRUNED up to the budget, none left RUNNING."""
    ts = trials(cwd, name)
    states = [t.state for t in ts]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    done = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == budget, states
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, states
    assert len({t.params["lambda"] for t in ts if "failed_trial" not in t.system_attrs}) == \
        len([t for t in ts if "failed_trial" not in t.system_attrs])  # no trial twice
    for t in done:
        last = max(t.intermediate_values)
        if t.state == TrialState.PRUNED:  # its partial curve is kept, up to where it stopped
            assert t.user_attrs["pruned_step"] == last < t.user_attrs["steps"] == 40
            assert "test_accuracy" not in t.user_attrs
        else:
            assert last == 40 and t.intermediate_values[40] == t.value
    return ts


def test_a_lone_worker_prunes_and_status_shows_it(tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "s", "--trials", "12", *PRUNED, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w = klayer("search", "worker", "--study", "s", "--sampler-seed", "1", *FAST, cwd=tmp_path)
    assert w.returncode == 0, w.stdout + w.stderr
    ts = check_pruned_study(tmp_path, "s", 12)
    assert "PRUNED at step" in w.stdout
    n_pruned = sum(t.state == TrialState.PRUNED for t in ts)
    st = klayer("search", "status", "--study", "s", "--plot", "progress.png", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    assert f"12/12 done: {12 - n_pruned} COMPLETE, {n_pruned} PRUNED" in st.stdout
    assert "pruned at step" in st.stdout and "of 40" in st.stdout
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"
    best = klayer("search", "best", "--study", "s", cwd=tmp_path)
    number = int(best.stdout.split("#")[1].split(":")[0])  # "best trial #N: val ..."
    assert ts[number].state == TrialState.COMPLETE
    assert ts[number].value == max(t.value for t in ts if t.state == TrialState.COMPLETE)
    bad = klayer("search", "status", "--study", "s", "--plot", "p.txt", cwd=tmp_path)
    assert bad.returncode == 2 and "--plot" in bad.stderr


def test_two_workers_and_batched_trials_prune_the_same_way(tmp_path: Path) -> None:
    for name, flags in (("j", ["--jobs", "2"]), ("b", ["--batch-trials", "4"])):
        r = klayer("search", "init", "--study", name, "--trials", "12", *PRUNED, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        w = klayer("search", "worker", "--study", name, "--sampler-seed", "2", *flags, *FAST,
                   cwd=tmp_path)
        assert w.returncode == 0, w.stdout + w.stderr
        ts = check_pruned_study(tmp_path, name, 12)
        if name == "b":  # trials left their stack as they were pruned
            assert all(len(t.user_attrs["batch"]) > 1 for t in ts)


def test_a_killed_worker_with_pruning_loses_no_trial_and_runs_none_twice(
        tmp_path: Path) -> None:
    args = [a if a != "20" else "1500" for a in PRUNED]  # ~1-2 s trials, a report every 375
    args[args.index("--min-resource") + 1] = "375"
    r = klayer("search", "init", "--study", "k", "--trials", "6", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    victim, _, out = kill_one_of_two_workers(tmp_path, "k")
    ts = trials(tmp_path, "k")
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [victim.number], out
    retries = [t for t in ts if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == victim.params
    ended = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ended) == 6 and TrialState.RUNNING not in [t.state for t in ts], out
    assert len({t.params["lambda"] for t in ended}) == 6  # each sampled trial ended once


def test_optuna_reads_every_attribute_the_dashboard_shows(tmp_path: Path) -> None:
    """optuna-dashboard opens the journal file with Optuna's own storage classes: everything
    it shows (study and trial attributes, params with distributions, curves, states, times)
    reads back through Optuna's public API alone, JSON-ready."""
    r = klayer("search", "init", "--study", "o", "--trials", "6", *PRUNED, cwd=tmp_path)
    w = klayer("search", "worker", "--study", "o", "--sampler-seed", "1", *FAST, cwd=tmp_path)
    assert r.returncode == 0 and w.returncode == 0, w.stdout + w.stderr
    storage = JournalStorage(JournalFileBackend(journal(tmp_path, "o")))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    json.dumps(study.user_attrs)
    assert study.user_attrs["pruner"]["pruner"] == "sha"
    for t in study.get_trials():
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete
        assert set(t.distributions) == set(t.params) == {"lambda"}
        assert t.intermediate_values and t.value is not None
        json.dumps([t.user_attrs, t.system_attrs, t.params, t.intermediate_values])
