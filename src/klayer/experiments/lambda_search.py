"""Coarse-to-fine random search for the L2 strength lambda (the assignment's exercise 3).

l is drawn uniformly in [l_min, l_max] and lambda = 10^l. The coarse stage covers
[-5, -1] with 2-cycle trainings; each finer stage searches around the trials with the
best validation accuracy; finally the best lambdas are retrained for 3 cycles, and the
chosen one's test accuracy is reported.

One 2-cycle training's validation accuracy on 5,000 images is noisy: its binomial
standard error is about 0.7 points, wider than the spread between the good values of
lambda. So the search does not trust a single best trial. A finer stage spans every
trial within two standard errors of the best (``contenders``), not just the top few.
At the end the FINALISTS best trials race again (``race``): each lambda is trained
for 3 cycles, the length of the final model, with FINAL_SEEDS seeds; the chosen lambda
is the finalist with the best mean validation accuracy, and its test accuracy is the
mean over those seeds (the test set plays no part in the choice).

The stages ask an *engine* for trials, so the search method can be swapped without
touching the rest. The engine here keeps each stage as a klayer search study on Optuna
(``search``), in a journal file in the experiment's folder: the coarse study, then a
fine study that is its child (the parent and its contenders are recorded in its
attributes). Optuna's random sampler draws lambda log-uniformly (l uniform); the trials
train in the experiment's process pool (``--jobs``) and are told their validation
accuracy, so ``klayer search status --storage OUT/lambda-search/journal.log --study
lambda-fine`` (or optuna-dashboard) shows them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from klayer.core.config import TrainConfig
from klayer.experiments.jobcache import Outcome
from klayer.experiments.runner import Context, RunSpec, fmt_pct, load_data_for, mean_std, values
from klayer.report.html import Figure, Section, Table
from klayer.report.plots import plot_scatter, save_panels
from klayer.search.space import Space, normalize_space, suggest
from klayer.search.storage import create_study, load_study, retrain_seeds, trial_seed
from klayer.search.worker import worker_id

COARSE = (-5.0, -1.0)
TOP_K = 3  # a finer stage spans at least the best TOP_K trials of the previous one,
SE_WIDTH = 2.0  # and every trial within SE_WIDTH standard errors of the best, plus a margin
MARGIN, MIN_MARGIN = 0.25, 0.2  # of that span on each side; at least MIN_MARGIN in l
FINALISTS, FINAL_SEEDS = 3, 3  # the best trials race again: 3 cycles, FINAL_SEEDS seeds each


@dataclass
class Trial:
    number: int  # unique over all stages
    stage: str
    log_lam: float
    outcome: Outcome

    @property
    def val_accuracy(self) -> float:
        return float(self.outcome.summary["val_accuracy"])


class Engine(Protocol):
    def stage(self, ctx: Context, name: str, lo: float, hi: float, n: int,
              first: int) -> list[Trial]: ...


class OptunaEngine:
    """Each stage a klayer search study in OUT/lambda-search/journal.log (a fresh file per
    run), named lambda-<stage>; a later stage is the child of the one before.

    lambda is log-uniform in [10^lo, 10^hi], drawn by Optuna's random sampler seeded with
    SeedSequence([base seed, stage start]); trial i of the experiment (numbered over all
    stages) trains with seed SeedSequence([base seed, i]), recorded with its accuracies.
    """

    def __init__(self) -> None:
        self.parent: dict[str, Any] | None = None  # the previous stage, for its child

    def stage(self, ctx: Context, name: str, lo: float, hi: float, n: int,
              first: int) -> list[Trial]:
        base_seed = int(ctx.base.get("seed", 0))
        if first == 0:  # a new search
            self.parent = None
        study, space = self._study(ctx, f"lambda-{name}", lo, hi, n,
                                   trial_seed(base_seed, first))
        asked = [study.ask() for _ in range(n)]
        lams = [float(suggest(t, space)["lambda"]) for t in asked]
        specs = [(RunSpec(f"trial {first + i}", {"lambda": lam}),
                  trial_seed(base_seed, first + i)) for i, lam in enumerate(lams)]
        outcomes = _run_each(ctx, specs)
        for i, (trial, o) in enumerate(zip(asked, outcomes, strict=True)):
            _tell(study, trial, o, first + i)
        trials = [Trial(first + i, name, math.log10(lam), o)
                  for i, (lam, o) in enumerate(zip(lams, outcomes, strict=True))]
        top = contenders(trials)
        self.parent = {"study": study.study_name, "top_k": TOP_K, "se_width": SE_WIDTH,
                       "margin": MARGIN, "min_margin": MIN_MARGIN,
                       "trials": [t.number - first for t in top],
                       "best_value": top[0].val_accuracy, "space": space}
        return trials

    def _study(self, ctx: Context, name: str, lo: float, hi: float, n: int,
               sampler_seed: int) -> tuple[optuna.Study, Space]:
        """Create the stage's study (the previous stage its parent) and open it."""
        storage = ctx.out / "lambda-search" / "journal.log"
        if self.parent is None and storage.exists():  # left by an earlier run
            storage.unlink()
        config = TrainConfig.from_dict(ctx.config({}, int(ctx.base.get("seed", 0))))
        space = normalize_space({"lambda": {"low": 10**lo, "high": 10**hi, "log": True}},
                                config)
        create_study(name, str(storage), config, load_data_for(config, ctx.quick), space, n,
                     "random", self.parent)
        sampler = optuna.samplers.RandomSampler(seed=sampler_seed)
        return load_study(name, str(storage), sampler=sampler)[0], space


def _tell(study: optuna.Study, trial: optuna.Trial, o: Outcome, number: int) -> None:
    """Record a trained trial: its curve, seed and accuracies; FAIL if it diverged."""
    for row in o.rows:
        if math.isfinite(row["val_accuracy"]):
            trial.report(float(row["val_accuracy"]), int(row["step"]))
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("seed", o.seed)
    trial.set_user_attr("experiment_trial", number)
    if "diverged" in o.summary:
        trial.set_user_attr("fail_reason", f"diverged: {o.summary['diverged']}")
        study.tell(trial, state=TrialState.FAIL)
        return
    for key in ("val_accuracy", "test_accuracy", "train_accuracy"):
        trial.set_user_attr(key, float(o.summary[key]))
    study.tell(trial, float(o.summary["val_accuracy"]))


def _run_each(ctx: Context, specs_seeds: Sequence[tuple[RunSpec, int]]) -> list[Outcome]:
    """Train specs that each have their own seed, all in one parallel batch."""
    jobs = [(s.label, ctx.config(s.overrides, seed), s.post, ctx.quick) for s, seed in specs_seeds]
    return ctx.map_jobs(jobs)


def ranked(trials: Sequence[Trial]) -> list[Trial]:
    """Best validation accuracy first; diverged trials (NaN) last."""
    return sorted(trials, key=lambda t: -_finite(t.val_accuracy))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def contenders(trials: Sequence[Trial]) -> list[Trial]:
    """The trials, best first, whose validation accuracy is within SE_WIDTH standard
    errors of the best one's (at least the TOP_K best).

    SE = sqrt(p (1 - p) / n_val) is the binomial standard error of the best accuracy p
    measured on n_val validation images: trials closer than that to the best are not
    distinguishably worse, so a finer stage must keep them in its range.
    """
    order = ranked(trials)
    p = order[0].val_accuracy
    n_val = max(int(order[0].outcome.summary.get("n_val", 1)), 1)
    floor = p - SE_WIDTH * math.sqrt(max(p * (1 - p), 0.0) / n_val)
    close = [t for t in order if t.val_accuracy >= floor]
    return close if len(close) >= TOP_K else order[:TOP_K]


def finer_range(trials: Sequence[Trial], lo: float, hi: float) -> tuple[float, float]:
    """The span of the contenders' l, widened by a quarter of it (at least 0.2)."""
    top = contenders(trials)
    a, b = min(t.log_lam for t in top), max(t.log_lam for t in top)
    margin = max(MARGIN * (b - a), MIN_MARGIN)
    return max(lo, a - margin), min(hi, b + margin)


def finalists(trials: Sequence[Trial]) -> list[Trial]:
    """The FINALISTS best trials by validation accuracy (of distinct lambda)."""
    out: list[Trial] = []
    for t in ranked(trials):
        if all(t.log_lam != f.log_lam for f in out):
            out.append(t)
    return out[:FINALISTS]


def race(ctx: Context, finals: Sequence[Trial]) -> list[list[Outcome]]:
    """Train each finalist's lambda for 3 cycles with max(FINAL_SEEDS, --seeds) seeds
    (its trial's seed, then SeedSequence([that seed, i])); the outcomes per finalist."""
    n = max(FINAL_SEEDS, ctx.seeds)
    specs = [(RunSpec(f"finalist λ = {10**t.log_lam:.3g}", {"lambda": 10**t.log_lam,
                                                           "cycles": 3}), seed)
             for t in finals for seed in retrain_seeds(t.outcome.seed, n)]
    outcomes = _run_each(ctx, specs)
    return [outcomes[i * n : (i + 1) * n] for i in range(len(finals))]


def lambda_search(ctx: Context, engine: Engine | None = None) -> Section:
    engine = engine or OptunaEngine()
    n = 4 if ctx.quick else 10
    stages: list[tuple[str, float, float, list[Trial]]] = []
    lo, hi = COARSE
    for name in ("coarse", "fine"):
        if stages:
            lo, hi = finer_range(stages[-1][3], *COARSE)
        first = sum(len(s[3]) for s in stages)
        stages.append((name, lo, hi, engine.stage(ctx, name, lo, hi, n, first)))
    trials = [t for s in stages for t in s[3]]
    finals = finalists(trials)
    raced = race(ctx, finals)
    k = max(range(len(finals)),
            key=lambda i: _finite(mean_std(values(raced[i], "val_accuracy"))[0]))
    chosen, test = finals[k].log_lam, values(raced[k], "test_accuracy")
    tables = [_stage_table(name, lo, hi, ts) for name, lo, hi, ts in stages]
    tables.append(_race_table(finals, raced, k))
    text = [f"Coarse stage: l uniform in [{COARSE[0]:g}, {COARSE[1]:g}], λ = 10^l, {n} trials of "
            f"2 cycles; fine stage: l in [{stages[1][1]:.2f}, {stages[1][2]:.2f}], spanning "
            f"the coarse trials within {SE_WIDTH:g} standard errors of the best validation "
            f"accuracy (at least the {TOP_K} best). Each trial's seed is "
            f"SeedSequence([seed, trial]).",
            f"The {len(finals)} best trials raced again: each λ trained for 3 cycles with "
            f"{len(raced[k])} seeds. Chosen λ = **{10**chosen:.3g}**, the best mean validation "
            f"accuracy; its 3-cycle test accuracy is **{fmt_pct(test)}** (mean ± std over "
            f"the seeds)."]
    fig = Figure("Validation accuracy of every trial against log10(lambda), by stage; the "
                 "dashed line is the chosen lambda", _scatter(ctx, stages, chosen))
    return Section("lambda-search", text=text, tables=tables, figures=[fig],
                   facts={"best_lambda": 10**chosen, "test": mean_std(test)[0],
                          "lo": COARSE[0], "hi": COARSE[1]})


def _race_table(finals: Sequence[Trial], raced: Sequence[Sequence[Outcome]], k: int) -> Table:
    rows = [[f"{10**t.log_lam:.3g}" + (" (chosen)" if i == k else ""), f"{t.log_lam:.3f}",
             f"{100 * t.val_accuracy:.2f} %", fmt_pct(values(raced[i], "val_accuracy")),
             fmt_pct(values(raced[i], "test_accuracy")),
             ",".join(str(o.seed) for o in raced[i])] for i, t in enumerate(finals)]
    return Table("The finalists retrained for 3 cycles (mean ± std over seeds)",
                 ["lambda", "log10 lambda", "trial's validation (2 cycles)",
                  "validation (3 cycles)", "test (3 cycles)", "seeds"], rows)


def _scatter(ctx: Context, stages: Sequence[tuple[str, float, float, list[Trial]]],
             chosen: float) -> Path:
    """The figure: each stage's (l, validation accuracy) and the chosen l."""
    path = ctx.out / "figures" / "lambda-search.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_panels(path, [("validation accuracy against lambda", lambda ax: plot_scatter(
        ax, [(f"{s[0]} [{s[1]:.2f}, {s[2]:.2f}]", [t.log_lam for t in s[3]],
              [t.val_accuracy for t in s[3]]) for s in stages], chosen))],
        ncols=1, size=(7, 4.2))


def _stage_table(name: str, lo: float, hi: float, trials: Sequence[Trial]) -> Table:
    rows = [[str(t.number), f"{10**t.log_lam:.3g}", f"{t.log_lam:.3f}",
             f"{100 * t.val_accuracy:.2f} %", str(t.outcome.seed)]
            for t in ranked(trials)]
    return Table(f"{name} stage, l in [{lo:.2f}, {hi:.2f}], sorted by validation accuracy",
                 ["trial", "lambda", "log10 lambda", "validation", "seed"], rows)
