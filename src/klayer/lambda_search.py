"""Coarse-to-fine random search for the L2 strength lambda (the assignment's exercise 3).

l is drawn uniformly in [l_min, l_max] and lambda = 10^l. The coarse stage covers
[-5, -1] with 2-cycle trainings; each finer stage searches around the trials with the
best validation accuracy; finally the best lambda is retrained for 3 cycles and its
test accuracy reported. The stages ask an *engine* for trials, so the search method
(here: independent uniform draws trained by the experiment's process pool) can be
swapped without touching the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .plots import plot_scatter, save_panels
from .report import Figure, Section, Table
from .runner import Context, Outcome, RunSpec, fmt_pct, mean_std, values

COARSE = (-5.0, -1.0)
TOP_K = 3  # a finer stage spans the best TOP_K trials of the previous one, plus a margin


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


def trial_seed(base_seed: int, number: int) -> int:
    """The training seed of trial ``number``: SeedSequence([base_seed, number])."""
    return int(np.random.SeedSequence([base_seed, number]).generate_state(1)[0])


class RandomEngine:
    """l ~ U[lo, hi] per trial, drawn from a generator seeded by (base seed, stage start)."""

    def stage(self, ctx: Context, name: str, lo: float, hi: float, n: int,
              first: int) -> list[Trial]:
        base_seed = int(ctx.base.get("seed", 0))
        rng = np.random.default_rng([base_seed, first])
        ls = rng.uniform(lo, hi, size=n)
        outcomes = []
        for i, l in enumerate(ls):  # one seed per trial, so run them as one batch of specs
            seed = trial_seed(base_seed, first + i)
            outcomes.append((RunSpec(f"trial {first + i}", {"lambda": float(10**l)}), seed))
        results = _run_each(ctx, outcomes)
        return [Trial(first + i, name, float(l), o) for i, (l, o) in enumerate(
            zip(ls, results, strict=True))]


def _run_each(ctx: Context, specs_seeds: Sequence[tuple[RunSpec, int]]) -> list[Outcome]:
    """Train specs that each have their own seed, all in one parallel batch."""
    jobs = [(s.label, ctx.config(s.overrides, seed), s.post, ctx.quick) for s, seed in specs_seeds]
    return ctx.map_jobs(jobs)


def finer_range(trials: Sequence[Trial], lo: float, hi: float) -> tuple[float, float]:
    """The span of the TOP_K best trials' l, widened by a quarter of it (at least 0.2)."""
    top = sorted(trials, key=lambda t: -t.val_accuracy)[:TOP_K]
    a, b = min(t.log_lam for t in top), max(t.log_lam for t in top)
    margin = max(0.25 * (b - a), 0.2)
    return max(lo, a - margin), min(hi, b + margin)


def lambda_search(ctx: Context, engine: Engine | None = None) -> Section:
    engine = engine or RandomEngine()
    n = 4 if ctx.quick else 10
    stages: list[tuple[str, float, float, list[Trial]]] = []
    lo, hi = COARSE
    for name in ("coarse", "fine"):
        if stages:
            lo, hi = finer_range(stages[-1][3], *COARSE)
        first = sum(len(s[3]) for s in stages)
        stages.append((name, lo, hi, engine.stage(ctx, name, lo, hi, n, first)))
    trials = [t for s in stages for t in s[3]]
    best = max(trials, key=lambda t: t.val_accuracy)
    final = ctx.run([RunSpec("best lambda, 3 cycles", {"lambda": 10**best.log_lam, "cycles": 3})])
    test = values(final, "test_accuracy")
    tables = [_stage_table(name, lo, hi, ts) for name, lo, hi, ts in stages]
    tables.append(Table("Best lambda retrained for 3 cycles",
                        ["lambda", "log10 lambda", "seeds", "test accuracy"],
                        [[f"{10**best.log_lam:.3g}", f"{best.log_lam:.3f}",
                          ",".join(str(o.seed) for o in final), fmt_pct(test)]]))
    path = ctx.out / "figures" / "lambda-search.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_panels(path, [("validation accuracy against lambda", lambda ax: plot_scatter(
        ax, [(f"{s[0]} [{s[1]:.2f}, {s[2]:.2f}]", [t.log_lam for t in s[3]],
              [t.val_accuracy for t in s[3]]) for s in stages]))], ncols=1, size=(7, 4.2))
    text = [f"Coarse stage: l uniform in [{COARSE[0]:g}, {COARSE[1]:g}], λ = 10^l, {n} trials of "
            f"2 cycles; fine stage: l in [{stages[1][1]:.2f}, {stages[1][2]:.2f}], around the "
            f"{TOP_K} best coarse trials. Each trial's seed is SeedSequence([seed, trial]).",
            f"Best λ = **{10**best.log_lam:.3g}** (validation {100 * best.val_accuracy:.2f} %); "
            f"retrained for 3 cycles it reaches **{fmt_pct(test)}** test accuracy."]
    fig = Figure("Validation accuracy of every trial against log10(lambda), by stage", path)
    return Section("lambda-search", text=text, tables=tables, figures=[fig],
                   facts={"best_lambda": 10**best.log_lam, "test": mean_std(test)[0],
                          "lo": COARSE[0], "hi": COARSE[1]})


def _stage_table(name: str, lo: float, hi: float, trials: Sequence[Trial]) -> Table:
    rows = [[str(t.number), f"{10**t.log_lam:.3g}", f"{t.log_lam:.3f}",
             f"{100 * t.val_accuracy:.2f} %", str(t.outcome.seed)]
            for t in sorted(trials, key=lambda t: -t.val_accuracy)]
    return Table(f"{name} stage, l in [{lo:.2f}, {hi:.2f}], sorted by validation accuracy",
                 ["trial", "lambda", "log10 lambda", "validation", "seed"], rows)
