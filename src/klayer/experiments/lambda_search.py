"""Coarse-to-fine random search for the L2 strength lambda (the assignment's exercise 3).

l is drawn uniformly in [l_min, l_max] and lambda = 10^l: a coarse stage over [-5, -1]
with 2-cycle trainings, then a fine stage around the best coarse trials; the best
lambdas are then retrained for 3 cycles and the chosen one's test accuracy reported.

One 2-cycle training's validation accuracy on 5,000 images is noisy (a binomial standard
error of about 0.7 points, wider than the spread between good lambdas), so no single
best trial is trusted: the fine stage spans every trial within two standard errors of
the best (``contenders``), and the FINALISTS best trials race again (``race``) for 3
cycles with FINAL_SEEDS seeds each. The chosen lambda has the best mean validation
accuracy; its test accuracy is the mean over those seeds (the test set plays no part in
the choice).

Each stage is a klayer search study (``run_stage``) in OUT/lambda-search/journal.log,
the fine one the child of the coarse one, so ``klayer search status --storage
OUT/lambda-search/journal.log --study lambda-fine`` (or optuna-dashboard) shows them.
Its lambdas are drawn up front and queued, and ``--jobs`` search workers train them,
so the trials do not depend on the number of workers; the study's pruner (``--pruner``,
default PRUNER) stops hopeless ones early. With one worker the run is deterministic;
with several, which trials are pruned can depend on the order they reach a rung.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from klayer.core.config import TrainConfig
from klayer.experiments.jobcache import Outcome
from klayer.experiments.runner import Context, RunSpec, fmt_pct, load_data_for, mean_std, values
from klayer.report.html import Figure, Section, Table
from klayer.report.plots import plot_scatter, save_panels
from klayer.search.pool import run_workers
from klayer.search.pruning import pruner_settings
from klayer.search.space import normalize_space, suggest
from klayer.search.status import save_progress_plot
from klayer.search.storage import (
    create_study,
    grid_progress,
    load_study,
    retrain_seeds,
    trial_seed,
)
from klayer.search.worker import WorkerOptions
from klayer.training.plan import make_plan
from klayer.training.stop import Stopped

COARSE = (-5.0, -1.0)
TOP_K = 3  # a finer stage spans at least the best TOP_K trials of the previous one,
SE_WIDTH = 2.0  # and every trial within SE_WIDTH standard errors of the best, plus a margin
MARGIN, MIN_MARGIN = 0.25, 0.2  # of that span on each side; at least MIN_MARGIN in l
FINALISTS, FINAL_SEEDS = 3, 3  # the best trials race again: 3 cycles, FINAL_SEEDS seeds each
PRUNER = "sha"  # measured: the same answer in less time (README, "Pruning")


@dataclass
class Trial:
    number: int  # unique over all stages
    log_lam: float
    outcome: Outcome

    @property
    def val_accuracy(self) -> float:
        return float(self.outcome.summary["val_accuracy"])


def run_stage(ctx: Context, name: str, lo: float, hi: float, n: int, first: int,
              parent: dict[str, Any] | None = None) -> tuple[list[Trial], dict[str, Any]]:
    """Stage ``name``: study lambda-<name> (a fresh journal file without ``parent``, the
    previous stage's record), ``n`` lambdas log-uniform in [10^lo, 10^hi] drawn by
    Optuna's random sampler seeded with SeedSequence([base seed, first]), queued, and
    trained by ``ctx.jobs`` search workers (one for quick runs, whose data is a slice only
    this process holds) with the study's pruner; the stage's trial k
    (numbered ``first + k`` over all stages) trains with seed SeedSequence([base seed, k]).
    The trials, and the stage's record for its child (its contenders)."""
    base_seed, study_name = int(ctx.base.get("seed", 0)), f"lambda-{name}"
    storage = ctx.out / "lambda-search" / "journal.log"
    if parent is None:
        storage.unlink(missing_ok=True)  # left by an earlier run
    config = TrainConfig.from_dict(ctx.config({}, base_seed))
    space = normalize_space({"lambda": {"low": 10**lo, "high": 10**hi, "log": True}}, config)
    data = load_data_for(config, ctx.quick)
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(
        seed=trial_seed(base_seed, first)))  # in memory: only the sampler's draws
    points = [suggest(draws.ask(), space) for _ in range(n)]
    total = make_plan(config, len(data.train.y)).total_steps
    info = create_study(study_name, str(storage), config, data, space, n, "random", parent,
                        pruner=pruner_settings(ctx.pruner, None, None, total), points=points)
    ctx.log(f"lambda-search {name} stage: {n} trials, pruner {info.pruner.describe()}")
    opts = WorkerOptions(study=study_name, storage=str(storage), data_dir=config.data_dir,
                         quiet=True, poll=0.5)
    jobs = 1 if ctx.quick else ctx.jobs  # a worker process would load all of the data
    code = run_workers(opts, jobs=jobs, threads=max(1, (os.cpu_count() or 1) // jobs),
                       data=data if jobs <= 1 else None)
    if code > 128:
        raise Stopped(code - 128)
    if code:
        raise RuntimeError(f"the workers of study {study_name} stopped with exit code {code}")
    study = load_study(study_name, str(storage))[0]
    ended = [_ended(ts) for _, _, ts in grid_progress(points, study.get_trials())]
    trials = [Trial(first + k, math.log10(float(p["lambda"])), _outcome(t, len(data.val.y)))
              for k, (p, t) in enumerate(zip(points, ended, strict=True))]
    top = contenders(trials)
    return trials, {"study": study_name, "top_k": TOP_K, "se_width": SE_WIDTH,
                    "margin": MARGIN, "min_margin": MIN_MARGIN, "pruner": info.pruner.to_attr(),
                    "trials": [t.number - first for t in top],
                    "best_value": top[0].val_accuracy, "space": space}


def _ended(trials: Sequence[FrozenTrial]) -> FrozenTrial:
    """A point's trial that ended it: COMPLETE, else PRUNED, else the last FAIL."""
    order = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sorted(trials, key=lambda t: (order.index(t.state) if t.state in order else 3,
                                         -t.number))[0]


def _outcome(t: FrozenTrial, n_val: int) -> Outcome:
    """A stage trial as the report reads it: NaN validation accuracy unless COMPLETE (a
    pruned or diverged trial has no final accuracy), its curve, seed and state."""
    nan = float("nan")
    summary: dict[str, Any] = {
        "val_accuracy": t.value if t.state == TrialState.COMPLETE else nan,
        "test_accuracy": t.user_attrs.get("test_accuracy", nan), "n_val": n_val,
        "state": t.state.name}
    if t.state == TrialState.PRUNED:
        summary["pruned_step"] = t.user_attrs.get("pruned_step")
    elif t.state == TrialState.FAIL:
        summary["diverged"] = t.user_attrs.get("fail_reason", "failed")
    rows = [{"step": float(k), "val_accuracy": v} for k, v in sorted(t.intermediate_values.items())]
    return Outcome(f"trial {t.number}", int(t.user_attrs.get("seed", 0)), dict(t.params),
                   summary, rows)


def ranked(trials: Sequence[Trial]) -> list[Trial]:
    """Best validation accuracy first; diverged trials (NaN) last."""
    return sorted(trials, key=lambda t: -_finite(t.val_accuracy))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def contenders(trials: Sequence[Trial]) -> list[Trial]:
    """The complete trials, best first, whose validation accuracy is within SE_WIDTH
    standard errors of the best one's (at least the TOP_K best, where there are as many).

    SE = sqrt(p (1 - p) / n_val) is the binomial standard error of the best accuracy p
    measured on n_val validation images: trials closer than that to the best are not
    distinguishably worse, so a finer stage must keep them in its range.
    """
    order = [t for t in ranked(trials) if math.isfinite(t.val_accuracy)]  # not pruned
    if not order:
        raise RuntimeError("no trial of the stage completed (all diverged or were pruned)")
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
        if math.isfinite(t.val_accuracy) and all(t.log_lam != f.log_lam for f in out):
            out.append(t)
    return out[:FINALISTS]


def race(ctx: Context, finals: Sequence[Trial]) -> list[list[Outcome]]:
    """Train each finalist's lambda for 3 cycles with max(FINAL_SEEDS, --seeds) seeds
    (its trial's seed, then SeedSequence([that seed, i])); the outcomes per finalist."""
    n = max(FINAL_SEEDS, ctx.seeds)
    outcomes = ctx.run([RunSpec(f"finalist λ = {10**t.log_lam:.3g}",
                                {"lambda": 10**t.log_lam, "cycles": 3},
                                seeds=retrain_seeds(t.outcome.seed, n)) for t in finals])
    return [outcomes[i * n : (i + 1) * n] for i in range(len(finals))]


def lambda_search(ctx: Context) -> Section:
    n = 4 if ctx.quick else 10
    start = time.perf_counter()
    coarse, parent = run_stage(ctx, "coarse", *COARSE, n, 0)
    lo, hi = finer_range(coarse, *COARSE)
    fine = run_stage(ctx, "fine", lo, hi, n, n, parent)[0]
    searched = time.perf_counter() - start
    pruned = sum(t.outcome.summary.get("state") == "PRUNED" for t in coarse + fine)
    stages = [("coarse", *COARSE, coarse), ("fine", lo, hi, fine)]
    finals = finalists(coarse + fine)
    raced = race(ctx, finals)
    k = max(range(len(finals)),
            key=lambda i: _finite(mean_std(values(raced[i], "val_accuracy"))[0]))
    chosen, test = finals[k].log_lam, values(raced[k], "test_accuracy")
    tables = [*(_stage_table(*stage) for stage in stages), _race_table(finals, raced, k)]
    text = [f"Coarse stage: l uniform in [{COARSE[0]:g}, {COARSE[1]:g}], λ = 10^l, {n} trials of "
            f"2 cycles; fine stage: l in [{lo:.2f}, {hi:.2f}], spanning "
            f"the coarse trials within {SE_WIDTH:g} standard errors of the best validation "
            f"accuracy (at least the {TOP_K} best). A stage's trial k trains with the seed "
            f"SeedSequence([seed, k]). Pruner: {parent['pruner']['pruner']} ({pruned} of "
            f"{2 * n} trials pruned; both stages took {searched:.0f} s with {ctx.jobs} "
            f"worker(s)); a pruned trial has no final accuracy and cannot be a contender.",
            f"The {len(finals)} best trials raced again: each λ trained for 3 cycles with "
            f"{len(raced[k])} seeds. Chosen λ = **{10**chosen:.3g}**, the best mean validation "
            f"accuracy; its 3-cycle test accuracy is **{fmt_pct(test)}** (mean ± std over "
            f"the seeds)."]
    fig = Figure("Validation accuracy of every complete trial against log10(lambda), by "
                 "stage; the dashed line is the chosen lambda", _scatter(ctx, stages, chosen))
    progress = [Figure(f"The {stage} stage: best validation accuracy so far against wall "
                       "time and against trials ended; crosses are pruned trials at their "
                       "last report", _progress(ctx, stage)) for stage in ("coarse", "fine")]
    return Section("lambda-search", text=text, tables=tables, figures=[fig, *progress],
                   facts={"best_lambda": 10**chosen, "test": mean_std(test)[0],
                          "lo": COARSE[0], "hi": COARSE[1], "pruner": parent["pruner"]["pruner"],
                          "pruned": pruned, "search_seconds": searched})


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


def _progress(ctx: Context, stage: str) -> Path:
    """A stage's ``search status --plot`` figure."""
    study, info = load_study(f"lambda-{stage}", str(ctx.out / "lambda-search" / "journal.log"))
    return save_progress_plot(study, info, ctx.out / "figures" / f"lambda-{stage}-progress.png")


def _stage_table(name: str, lo: float, hi: float, trials: Sequence[Trial]) -> Table:
    rows = [[str(t.number), f"{10**t.log_lam:.3g}", f"{t.log_lam:.3f}", _result(t),
             str(t.outcome.seed)] for t in ranked(trials)]
    return Table(f"{name} stage, l in [{lo:.2f}, {hi:.2f}], sorted by validation accuracy",
                 ["trial", "lambda", "log10 lambda", "validation", "seed"], rows)


def _result(t: Trial) -> str:
    """A stage trial's validation accuracy, or how it ended without one."""
    s = t.outcome.summary
    if s.get("state") == "PRUNED":
        return f"pruned at step {s.get('pruned_step')}"
    return f"{100 * t.val_accuracy:.2f} %" if math.isfinite(t.val_accuracy) else "diverged"
