"""The lambda-search experiment's stages are klayer search studies: coarse, then its child."""

from __future__ import annotations

import math
from pathlib import Path

from optuna.trial import TrialState

from klayer.experiments.jobcache import Outcome
from klayer.experiments.lambda_search import (
    COARSE,
    FINAL_SEEDS,
    FINALISTS,
    TOP_K,
    Trial,
    contenders,
    finalists,
    finer_range,
    race,
    run_stage,
)
from klayer.experiments.runner import Context
from klayer.search import storage as search_storage


def two_stages(out: Path, pruner: str = "none", jobs: int = 1
               ) -> tuple[list[Trial], list[Trial], tuple[float, float]]:
    """Both stages; with jobs > 1 not quick (quick stages run one worker), but as short."""
    base = {"dataset": "synthetic", "seed": 7}
    if jobs > 1:
        base |= {"n_s": 40, "val_size": 1000, "evals_per_cycle": 4}
    ctx = Context(base, quick=jobs == 1, out=out, log=lambda s: None, pruner=pruner, jobs=jobs)
    coarse, parent = run_stage(ctx, "coarse", *COARSE, 4, 0)
    lo, hi = finer_range(coarse, *COARSE)
    fine, _ = run_stage(ctx, "fine", lo, hi, 3, 4, parent)
    return coarse, fine, (lo, hi)


def test_stages_are_a_study_and_its_child(tmp_path: Path) -> None:
    coarse, fine, (lo, hi) = two_stages(tmp_path)
    journal = str(tmp_path / "lambda-search" / "journal.log")
    for name, trials, first in (("lambda-coarse", coarse, 0), ("lambda-fine", fine, 4)):
        study, info = search_storage.load_study(name, journal)
        ts = study.get_trials(deepcopy=False)
        assert [t.state for t in ts] == [TrialState.COMPLETE] * len(trials)
        assert info.n_trials == len(trials) and info.config.seed == 7
        for t, mine in zip(ts, trials, strict=True):  # queued in order: trial k is point k
            assert mine.number == first + t.number
            seed = search_storage.trial_seed(7, t.number)
            assert t.user_attrs["seed"] == seed == mine.outcome.seed
            assert math.log10(t.params["lambda"]) == mine.log_lam
            assert t.value == mine.val_accuracy and t.intermediate_values
    _, info = search_storage.load_study("lambda-fine", journal)
    top = contenders(coarse)
    assert len(top) >= TOP_K
    assert info.parent is not None and info.parent["study"] == "lambda-coarse"
    assert info.parent["trials"] == [t.number for t in top]
    assert info.space["lambda"]["low"] == 10**lo and info.space["lambda"]["high"] == 10**hi
    assert all(lo <= t.log_lam <= hi for t in fine)
    assert len({t.log_lam for t in coarse + fine}) == len(coarse) + len(fine)


def test_a_rerun_starts_a_fresh_journal_and_draws_the_same_lambdas(tmp_path: Path) -> None:
    first = two_stages(tmp_path)
    again = two_stages(tmp_path)
    assert [t.log_lam for t in first[0] + first[1]] == [t.log_lam for t in again[0] + again[1]]
    journal_file = str(tmp_path / "lambda-search" / "journal.log")
    study, _ = search_storage.load_study("lambda-coarse", journal_file)
    assert len(study.get_trials()) == 4


def test_pruned_stages_and_workers_train_the_same_lambdas(tmp_path: Path) -> None:
    """With pruning, and with 2 workers, the stages draw and train the same lambdas (queued
    up front); a pruned trial keeps its curve and state but has no final accuracy, so it
    is never a contender or finalist. Its curve matches the unpruned run's up to there."""
    plain = two_stages(tmp_path / "plain")
    pruned = two_stages(tmp_path / "sha", pruner="sha")
    coarse, coarse_sha = plain[0], pruned[0]
    assert [t.log_lam for t in coarse] == [t.log_lam for t in coarse_sha]
    states = [t.outcome.summary["state"] for t in coarse_sha]
    assert "PRUNED" in states and "COMPLETE" in states, states
    for full, mine in zip(coarse, coarse_sha, strict=True):
        assert mine.outcome.rows == full.outcome.rows[:len(mine.outcome.rows)]
        if mine.outcome.summary["state"] == "PRUNED":
            assert math.isnan(mine.val_accuracy) and mine not in contenders(coarse_sha)
            assert mine.outcome.summary["pruned_step"] == mine.outcome.rows[-1]["step"]
        else:
            assert mine.val_accuracy == full.val_accuracy
    two, one = (two_stages(tmp_path / f"jobs{j}", jobs=j)[0] for j in (2, 1))
    assert [t.log_lam for t in two] == [t.log_lam for t in one]  # the same queued draws
    one_by_lam = {t.log_lam: t.outcome.summary["state"] for t in one}
    assert all(one_by_lam[t.log_lam] == t.outcome.summary["state"] == "COMPLETE" for t in two)


def fake(number: int, log_lam: float, val: float, n_val: int = 5000) -> Trial:
    return Trial(number, log_lam, Outcome("t", 0, {}, {"val_accuracy": val, "n_val": n_val}, []))


def test_contenders_keep_every_trial_within_two_standard_errors() -> None:
    # best 0.52 on 5000 images: SE = sqrt(0.52 * 0.48 / 5000) = 0.00707, 2 SE = 0.0141
    trials = [fake(0, -2.7, 0.520), fake(1, -2.0, 0.510), fake(2, -1.7, 0.507),
              fake(3, -3.1, 0.5065), fake(4, -4.0, 0.500), fake(5, -1.2, 0.480)]
    assert [t.number for t in contenders(trials)] == [0, 1, 2, 3]  # 4 > TOP_K
    lo, hi = finer_range(trials, *COARSE)
    assert math.isclose(lo, -3.1 - 0.35) and math.isclose(hi, -1.7 + 0.35)
    # with 50,000 validation images the SE is a third: none is close, the TOP_K best stay
    many = [fake(t.number, t.log_lam, t.val_accuracy, 50000) for t in trials]
    assert [t.number for t in contenders(many)] == [0, 1, 2]
    assert len(contenders(many[:2])) == 2


def test_finalists_are_the_best_distinct_lambdas() -> None:
    trials = [fake(0, -2.7, 0.520), fake(1, -2.0, 0.510), fake(2, -2.7, 0.515),
              fake(3, -3.1, 0.5065), fake(4, -4.0, 0.500)]
    assert [t.number for t in finalists(trials)] == [0, 1, 3][:FINALISTS]
    diverged = [fake(5, -1.1, float("nan")), *trials]  # NaN: a diverged trial, ranked last
    assert [t.number for t in finalists(diverged)] == [0, 1, 3][:FINALISTS]
    assert 5 not in [t.number for t in contenders(diverged)]


def test_the_race_retrains_each_finalist_with_several_seeds(tmp_path: Path) -> None:
    ctx = Context({"dataset": "synthetic", "seed": 7}, quick=True, out=tmp_path,
                  log=lambda s: None, pruner="none")  # 4 trials: every one a candidate
    coarse, _ = run_stage(ctx, "coarse", *COARSE, 4, 0)
    finals = finalists(coarse)
    raced = race(ctx, finals)
    assert len(raced) == len(finals) == FINALISTS
    for t, outs in zip(finals, raced, strict=True):
        assert [o.seed for o in outs] == search_storage.retrain_seeds(t.outcome.seed, FINAL_SEEDS)
        assert all(o.config["lambda"] == 10**t.log_lam and o.config["cycles"] == 3
                   for o in outs)
