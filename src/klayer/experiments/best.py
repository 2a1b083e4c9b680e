"""``klayer experiment best``: the best fully-connected recipe, and what each ingredient adds.

The recipe lives in ``recipes/best.toml`` (every key a ``klayer train`` flag). The
ablation starts from the assignment's 3-layer recipe and adds the recipe's ingredients
one group at a time, each row training from scratch with everything above it; the last
row is the recipe itself, trained with at least three seeds. A row that adds test-time
views only (``VIEWS``) trains nothing: it is the row above's networks, evaluated with
those views after their training (``view_accuracies``), which is what training them again
would give.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from functools import partial
from importlib import resources
from typing import Any

from klayer.experiments.jobcache import Outcome
from klayer.experiments.runner import (
    Context,
    RunSpec,
    by_label,
    curves,
    finish,
    fmt_pct,
    mean_of,
    mean_std,
    values,
)
from klayer.report.html import Section, Table

# Ingredient groups, in the order they are added: (row label, recipe keys it brings in).
INGREDIENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("+ wide layers", ("hidden",)),
    ("+ flips and translations", ("flip", "translate")),
    ("+ longer one-cycle schedule, Nesterov momentum",
     ("optimizer", "momentum", "schedule", "eta_max", "epochs", "lambda")),
    ("+ dropout", ("dropout",)),
    ("+ label smoothing", ("label_smoothing",)),
    ("+ PreciseBN", ("bn_stats",)),
    ("+ test-time flip averaging", ("tta_flip",)),
    ("+ ZCA whitening", ("whiten", "whiten_eps")),
    ("+ weight averaging (EMA)", ("ema",)),
    ("+ mixup", ("mixup",)),
    ("+ cutmix", ("cutmix", "mix_prob")),
    ("+ test-time crops", ("tta_shift",)),
    ("+ longer training", ("epochs",)),
)
# A key in two groups takes this value in the first (the recipe's in the last), so that
# the rows in between keep their cost; a last row that changes nothing is left out.
STAGED = {"epochs": 40}
RECIPE_MARK = " (the recipe)"  # added to the last row's label
BASELINE = "assignment: 3-layer [50, 50], BN, 2 cycles"
ALWAYS = ("batch_norm", "name")  # recipe keys that are no ingredient (BN is in the baseline)
FINAL_SEEDS = 3  # the recipe's row uses at least this many seeds
VIEWS = ("tta_flip", "tta_shift")  # keys that change only the final test evaluation
# --quick: the same rows on small nets and two epochs, so the experiment runs in a minute.
QUICK_RECIPE = {"hidden": [64, 32], "epochs": 2}


def load_recipe() -> dict[str, Any]:
    """The recipe's keys and values, from the packaged ``recipes/best.toml``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    text = resources.files("klayer").joinpath("recipes/best.toml").read_text()
    return tomllib.loads(text)


def ablation_specs(recipe: dict[str, Any], staged: dict[str, Any] = STAGED) -> list[RunSpec]:
    """The baseline, then one row per ingredient group the recipe uses, each with all before it."""
    covered = {k for _, keys in INGREDIENTS for k in keys} | set(ALWAYS)
    missing = sorted(set(recipe) - covered)
    if missing:
        raise ValueError(f"recipe keys {missing} belong to no ingredient row in best.py")
    last = {k: i for i, (_, keys) in enumerate(INGREDIENTS) for k in keys}  # key -> its last row
    specs = [RunSpec(BASELINE, {})]
    overrides: dict[str, Any] = {}
    for i, (label, keys) in enumerate(INGREDIENTS):
        added = {k: recipe[k] if last[k] == i else staged[k] for k in keys if k in recipe}
        if {**overrides, **added} != overrides:  # an ingredient the recipe leaves out: no row
            overrides = {**overrides, **added}
            specs.append(RunSpec(label, dict(overrides)))
    specs[-1] = replace(specs[-1], label=specs[-1].label + RECIPE_MARK)
    return specs


def view_sources(specs: list[RunSpec]) -> dict[str, str]:
    """Each row that adds test-time views only -> the label of the training it evaluates
    (the nearest row above that trains)."""
    sources: dict[str, str] = {}
    for above, spec in itertools.pairwise(specs):
        changed = {k for k in {*above.overrides, *spec.overrides}
                   if above.overrides.get(k) != spec.overrides.get(k)}
        if changed <= set(VIEWS):
            sources[spec.label] = sources.get(above.label, above.label)
    return sources


def views_of(spec: RunSpec) -> tuple[bool, int]:
    """A row's test-time views: (tta_flip, tta_shift)."""
    return bool(spec.overrides.get("tta_flip", False)), int(spec.overrides.get("tta_shift", 0))


def _view_key(views: tuple[bool, int]) -> str:
    return f"views/flip={views[0]}/shift={views[1]}"


def view_accuracies(result: Any, views: tuple[tuple[bool, int], ...]) -> dict[str, float]:
    """A training's test accuracy under each of ``views`` ((tta_flip, tta_shift) pairs),
    as the trainer's summary evaluates them, by ``views/flip=F/shift=S``."""
    from klayer.training.evaluation import evaluate

    data, net, test = result.data, result.net, result.data.test
    return {_view_key(v): evaluate(net, data, test.X, test.y, result.config.lam, *v).accuracy
            for v in views}


def _as_view_row(o: Outcome, spec: RunSpec) -> Outcome:
    """The outcome of view row ``spec``: its source training's, tested with its views
    (NaN where the source diverged: it has no network to test)."""
    single = o.summary.get("test_accuracy_single_view", o.summary["test_accuracy"])
    summary = {**o.summary, "test_accuracy": o.extra.get(_view_key(views_of(spec)), math.nan),
               "test_accuracy_single_view": single}
    return replace(o, label=spec.label, config={**o.config, **spec.overrides},
                   summary=summary)


def best(ctx: Context) -> Section:
    full = load_recipe()
    recipe = {**full, **(QUICK_RECIPE if ctx.quick else {})}
    # quick: the staged values shrink as the recipe's do (epochs 40 of 100 -> 0.8 of 2)
    staged = {k: v * recipe[k] / full[k] if ctx.quick and k in full else v
              for k, v in STAGED.items()}
    specs = ablation_specs(recipe, staged)
    sources = view_sources(specs)
    recipe_run = sources.get(specs[-1].label, specs[-1].label)  # the recipe's training
    trained = [replace(s, seeds=ctx.seed_range(max(ctx.seeds, FINAL_SEEDS)))
               if s.label == recipe_run else s for s in specs if s.label not in sources]
    views = tuple(sorted({views_of(s) for s in specs if s.label in sources}))
    trained = [replace(s, post=partial(view_accuracies, views=views))
               if s.label in sources.values() else s for s in trained]
    # the last rows carry the most ingredients and train longest: started first, so that
    # parallel workers finish together (longest job first), then shown in ablation order
    done = by_label(ctx.run(trained[::-1]))
    groups = {s.label: done[s.label] if s.label not in sources else
              [_as_view_row(o, s) for o in done[sources[s.label]]] for s in specs}
    rows, previous = [], None
    for label, outs in groups.items():
        m = mean_of(groups, label)
        gain = "" if previous is None else f"{100 * (m - previous):+.2f}"
        single = "test_accuracy_single_view"  # reported where test-time views are averaged
        rows.append([label, fmt_pct(values(outs, "test_accuracy")), gain,
                     fmt_pct(values(outs, single if single in outs[0].summary
                                    else "test_accuracy")), str(len(outs)),
                     "the row above's" if label in sources else
                     f"{mean_of(groups, label, 'wall_seconds') / 60:.1f} min"])
        previous = m
    table = Table("Ablation: test accuracy as each ingredient is added",
                  ["configuration", "test", "gain (points)", "test, single view", "seeds",
                   "wall time / run"], rows)
    final = values(groups[specs[-1].label], "test_accuracy")
    m, sd = mean_std(final)
    keys = ", ".join(f"{k} = {v}" for k, v in recipe.items() if k != "name")
    text = [f"The recipe ({keys}) reaches **{100 * m:.2f} ± {100 * sd:.2f} %** test accuracy "
            f"over {len(final)} seeds (best {100 * max(final):.2f} %), from "
            f"{fmt_pct(values(groups[BASELINE], 'test_accuracy'))} for the assignment's "
            "recipe. Each row trains from scratch with its ingredient and all those above it, "
            "but a row of test-time views, which evaluates the networks of the row above "
            "with its views; the wall time is per training on this machine."]
    fig = curves(ctx, "best", groups, [("ablation: accuracy", [BASELINE, specs[-1].label],
                                        "accuracy")])
    return finish("best", trained, groups, text=text, tables=[table], figures=[fig],
                  facts={"best_mean": m, "best_std": sd})
