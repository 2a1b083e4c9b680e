"""``klayer experiment best``: the best fully-connected recipe, and what each ingredient adds.

The recipe lives in ``recipes/best.toml`` (every key a ``klayer train`` flag). The
ablation starts from the assignment's 3-layer recipe and adds the recipe's ingredients
one group at a time, each row training from scratch with everything above it; the last
row is the recipe itself, trained with at least three seeds.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from importlib import resources
from typing import Any

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
    ("+ test-time flip averaging (the recipe)", ("tta_flip",)),
)
BASELINE = "assignment: 3-layer [50, 50], BN, 2 cycles"
ALWAYS = ("batch_norm", "name")  # recipe keys that are no ingredient (BN is in the baseline)
FINAL_SEEDS = 3  # the recipe's row uses at least this many seeds
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


def ablation_specs(recipe: dict[str, Any]) -> list[RunSpec]:
    """The baseline, then one row per ingredient group the recipe uses, each with all before it."""
    covered = {k for _, keys in INGREDIENTS for k in keys} | set(ALWAYS)
    missing = sorted(set(recipe) - covered)
    if missing:
        raise ValueError(f"recipe keys {missing} belong to no ingredient row in best.py")
    specs = [RunSpec(BASELINE, {})]
    overrides: dict[str, Any] = {}
    for label, keys in INGREDIENTS:
        added = {k: recipe[k] for k in keys if k in recipe}
        if added:  # an ingredient the recipe leaves out gets no row
            overrides = {**overrides, **added}
            specs.append(RunSpec(label, dict(overrides)))
    return specs


def best(ctx: Context) -> Section:
    recipe = {**load_recipe(), **(QUICK_RECIPE if ctx.quick else {})}
    specs = ablation_specs(recipe)
    specs[-1] = replace(specs[-1], seeds=ctx.seed_range(max(ctx.seeds, FINAL_SEEDS)))
    groups = by_label(ctx.run(specs))
    rows, previous = [], None
    for label, outs in groups.items():
        m = mean_of(groups, label)
        gain = "" if previous is None else f"{100 * (m - previous):+.2f}"
        rows.append([label, fmt_pct(values(outs, "test_accuracy")), gain, str(len(outs)),
                     f"{mean_of(groups, label, 'wall_seconds') / 60:.1f} min"])
        previous = m
    table = Table("Ablation: test accuracy as each ingredient is added",
                  ["configuration", "test", "gain (points)", "seeds", "wall time / run"], rows)
    final = values(groups[specs[-1].label], "test_accuracy")
    m, sd = mean_std(final)
    keys = ", ".join(f"{k} = {v}" for k, v in recipe.items() if k != "name")
    text = [f"The recipe ({keys}) reaches **{100 * m:.2f} ± {100 * sd:.2f} %** test accuracy "
            f"over {len(final)} seeds (best {100 * max(final):.2f} %), from "
            f"{fmt_pct(values(groups[BASELINE], 'test_accuracy'))} for the assignment's "
            "recipe. Each row trains from scratch with its ingredient and all those above it; "
            "the wall time is per training on this machine."]
    fig = curves(ctx, "best", groups, [("ablation: accuracy", [BASELINE, specs[-1].label],
                                        "accuracy")])
    return finish("best", specs, groups, text=text, tables=[table], figures=[fig],
                  facts={"best_mean": m, "best_std": sd})
