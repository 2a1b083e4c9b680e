"""The assignment report's experiments, each a named set of overrides of the defaults.

Every experiment builds ``RunSpec``s (a label and the keys it changes), lets the
``Context`` train them over the seeds, and turns the outcomes into a report ``Section``
with tables, figures and a sentence or two of generated commentary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from klayer.core.config import NetConfig
from klayer.core.gradcheck import check_gradients, make_check_problem
from klayer.experiments.best import best
from klayer.experiments.jobcache import Outcome
from klayer.experiments.lambda_search import lambda_search
from klayer.experiments.runner import (
    Context,
    RunSpec,
    by_label,
    curves,
    finish,
    fmt_pct,
    mean_of,
    values,
)
from klayer.report.html import Figure, Section, Table
from klayer.report.plots import plot_bars, plot_spread, save_panels

NINE = (50, 30, 20, 20, 10, 10, 10, 10)
SEVEN_NARROW = (50, 50, 50, 20, 20, 10)
SEVEN_WIDE = (100, 100, 50, 50, 30, 20)


def gradcheck(ctx: Context) -> Section:
    rows = []
    worst = 0.0
    for hidden in ((50,), (50, 50), (50, 50, 50), NINE):
        for bn in (False, True):
            cfg = NetConfig(d=20, hidden=hidden, batch_norm=bn, dtype="float64")
            net, X, y = make_check_problem(cfg, n=10, seed=0)
            res = check_gradients(net, X, y, lam=0.01, sample=10 if ctx.quick else None)
            by_kind: dict[str, float] = {}
            for r in res:
                kind = r.name.rstrip("0123456789")
                by_kind[kind] = max(by_kind.get(kind, 0.0), r.max_rel_error)
            top = max(r.max_rel_error for r in res)
            worst = max(worst, top)
            rows.append([f"{len(hidden) + 1}-layer", "yes" if bn else "no",
                         *(f"{by_kind[k]:.1e}" if k in by_kind else "-"
                           for k in ("W", "b", "gamma", "beta")),
                         f"{top:.1e}", f"{max(r.max_abs_error for r in res):.1e}",
                         str(sum(r.checked for r in res))])
    table = Table("Largest relative error per parameter kind",
                  ["net", "batch norm", "W", "b", "gamma", "beta", "max rel", "max abs",
                   "elements checked"], rows)
    how = ("Analytic gradients (float64) were compared with centered differences "
           "(J(θ+h) − J(θ−h))/2h on " + ("10 random elements of each parameter tensor"
                                         if ctx.quick else "every element of every parameter")
           + ", with J evaluated in extended precision, h = 2e-6, on 10 random 20-dimensional "
           "inputs with λ = 0.01 and random biases, γ and β. Relative error: "
           "|g_a − g_n| / max(1e-6, |g_a| + |g_n|).")
    verdict = (f"The largest relative error over all nets is **{worst:.1e}**: the analytic "
               "gradients, batch-norm backward included, are exact to numerical precision.")
    return Section("gradcheck", text=[how, verdict], tables=[table],
                   facts={"max_rel_error": worst, "sampled": float(ctx.quick)})


def bn_depth(ctx: Context) -> Section:
    specs = [RunSpec(f"{d}-layer, {'BN' if bn else 'no BN'}",
                     {"hidden": list(h), "batch_norm": bn})
             for d, h in ((3, (50, 50)), (9, NINE)) for bn in (True, False)]
    groups = by_label(ctx.run(specs))
    panels = [(f"{d}-layer: {m}", [f"{d}-layer, BN", f"{d}-layer, no BN"], m)
              for m in ("loss", "cost", "accuracy") for d in (3, 9)]
    fig = curves(ctx, "bn-depth", groups, panels)
    f = {f"{key}{d}": mean_of(groups, f"{d}-layer, {bn}")
         for d in (3, 9) for key, bn in (("bn", "BN"), ("nobn", "no BN"))}
    text = [f"Batch norm adds **{100 * (f['bn9'] - f['nobn9']):+.2f} points** of test accuracy "
            f"at 9 layers and {100 * (f['bn3'] - f['nobn3']):+.2f} points at 3 layers (3-layer "
            f"with BN: {fmt_pct(values(groups['3-layer, BN'], 'test_accuracy'))})."]
    return finish("bn-depth", specs, groups, text=text, facts=f, figures=[fig])


INITS = [("He", {"init": "he"})] + [
    (f"sigma={s:g}", {"init": "normal", "init_sigma": s}) for s in (1e-1, 1e-3, 1e-4)]
INIT_NETS = ((3, (50, 50)), (9, NINE))  # depth, hidden widths


def _init_label(depth: int, init: str, bn: bool) -> str:
    return f"{depth}-layer, {init}, {'BN' if bn else 'no BN'}"


def _init_figure(ctx: Context, groups: dict[str, list[Outcome]], depth: int) -> Figure:
    """Loss and accuracy of every initialization at one depth, with and without BN:
    validation (solid) and training (dashed) curves, as the caption says."""
    panels = [(f"{depth}-layer, {'with' if bn else 'without'} batch norm: {m}",
               [_init_label(depth, n, bn) for n, _ in INITS], m)
              for m in ("loss", "accuracy") for bn in (True, False)]
    return curves(ctx, f"init-sensitivity-{depth}-layer", groups, panels)


def init_sensitivity(ctx: Context) -> Section:
    """He vs fixed sigma in {1e-1, 1e-3, 1e-4}, with and without batch norm, at 3 and 9
    layers: does batch norm make training robust to the initial weight scale?"""
    specs = [RunSpec(_init_label(d, name, bn), {"hidden": list(h), **o, "batch_norm": bn})
             for d, h in INIT_NETS for bn in (True, False) for name, o in INITS]
    groups = by_label(ctx.run(specs))
    table = Table("Test accuracy by initialization",
                  ["net", "initialization", "with BN", "without BN"],
                  [[f"{d}-layer", n, *(fmt_pct(values(groups[_init_label(d, n, bn)],
                                                      "test_accuracy")) for bn in (True, False))]
                   for d, _ in INIT_NETS for n, _ in INITS])
    facts = {f"{'bn' if bn else 'nobn'}{'' if d == 3 else d}_1e-4":
             mean_of(groups, _init_label(d, "sigma=0.0001", bn))
             for d, _ in INIT_NETS for bn in (True, False)}
    text = [f"With σ = 1e-4 the 3-layer batch-norm net reaches **{100 * facts['bn_1e-4']:.2f} %** "
            f"test accuracy while the net without batch norm ends at "
            f"**{100 * facts['nobn_1e-4']:.2f} %** (chance is 10 %); at 9 layers: "
            f"{100 * facts['bn9_1e-4']:.2f} % with batch norm, {100 * facts['nobn9_1e-4']:.2f} % "
            "without. Without normalization the tiny initial weights shrink the signal layer "
            "after layer, so gradients vanish; batch norm rescales every layer's "
            "pre-activations."]
    return finish("init-sensitivity", specs, groups, text=text, tables=[table], facts=facts,
                  figures=[_init_figure(ctx, groups, d) for d, _ in INIT_NETS])


def eta_study(ctx: Context) -> Section:
    length = ctx.length({"epochs": 10}, {"epochs": 3})
    specs = [RunSpec(f"eta={eta:g}, {'BN' if bn else 'no BN'}",
                     {"hidden": [50], "batch_norm": bn, "schedule": "constant", "eta": eta,
                      **length}) for bn in (True, False) for eta in (0.001, 0.09, 0.2)]
    groups = by_label(ctx.run(specs))
    etas = ("0.001", "0.09", "0.2")
    panels = [(f"{'with' if bn else 'without'} batch norm: loss",
               [f"eta={e}, {'BN' if bn else 'no BN'}" for e in etas], "loss")
              for bn in (True, False)]
    fig = curves(ctx, "eta-study", groups, panels)
    table = Table("Test accuracy by constant learning rate", ["eta", "with BN", "without BN"],
                  [[e, fmt_pct(values(groups[f"eta={e}, BN"], "test_accuracy")),
                    fmt_pct(values(groups[f"eta={e}, no BN"], "test_accuracy"))] for e in etas])
    gap = {e: mean_of(groups, f"eta={e}, BN") - mean_of(groups, f"eta={e}, no BN") for e in etas}
    text = ["Batch norm's advantage by learning rate: " + ", ".join(
        f"η = {e}: " + (f"{100 * g:+.2f} points" if math.isfinite(g) else "a run diverged")
        for e, g in gap.items()) + ". A diverged run (the cost became NaN or infinite) is "
        "reported as such and its curve ends where it diverged."]
    return finish("eta-study", specs, groups, text=text, tables=[table], figures=[fig])


def optimizers(ctx: Context) -> Section:
    total = 4 * (40 if ctx.quick else 2250)  # two cycles' steps, for Adam's decay
    adam = {"optimizer": "adam", "schedule": "exponential", "eta": 3e-3, "decay": 0.05,
            "decay_every": total, "steps": total}
    specs = [RunSpec(f"{w}, {name}", {"hidden": list(h), **o})
             for w, h in (("narrow", SEVEN_NARROW), ("wide", SEVEN_WIDE))
             for name, o in (("cyclic SGD", {"cycles": 2}), ("Adam + decay", adam))]
    groups = by_label(ctx.run(specs))
    panels = [(f"{w} {SEVEN_NARROW if w == 'narrow' else SEVEN_WIDE}: accuracy",
               [f"{w}, cyclic SGD", f"{w}, Adam + decay"], "accuracy") for w in ("narrow", "wide")]
    fig = curves(ctx, "optimizers", groups, panels)
    best = max(groups, key=lambda lb: mean_of(groups, lb))
    text = [f"7-layer nets with batch norm. Adam uses η = 3e-3 decayed exponentially to 5 % "
            f"over the same number of steps as two SGD cycles. Best: **{best}** "
            f"({fmt_pct(values(groups[best], 'test_accuracy'))})."]
    return finish("optimizers", specs, groups, text=text, figures=[fig])


def _bn_stats_post(result: Any) -> dict[str, float]:
    """Test accuracy with the trained statistics and with test-set (adaptive) statistics,
    on the test images and on their mirror images."""
    from klayer.data.augment import hflip
    from klayer.data.datasets import Split
    from klayer.training.evaluation import evaluate, population_stats

    data, net = result.data, result.net
    test = data.test
    flipped = Split(hflip(np.asarray(test.X), data.image_shape), test.y) if data.image_shape \
        else test
    out = {}
    for tag, split in (("plain", test), ("flipped", flipped)):
        out[f"trained/{tag}"] = evaluate(net, data, split.X, split.y).accuracy
        adapted = net.copy()
        population_stats(adapted, data, split.X, 0)
        out[f"adaptive/{tag}"] = evaluate(adapted, data, split.X, split.y).accuracy
    return out


def bn_stats(ctx: Context) -> Section:
    specs = [RunSpec("moving averages", {"bn_stats": "ema"}, post=_bn_stats_post),
             RunSpec("PreciseBN", {"bn_stats": "precise"}, post=_bn_stats_post)]
    groups = by_label(ctx.run(specs))
    rows = [[label, "adaptive (test statistics)" if a == "adaptive" else "from training",
             fmt_pct(values(groups[label], f"{a}/plain")),
             fmt_pct(values(groups[label], f"{a}/flipped"))]
            for label in groups for a in ("trained", "adaptive")]
    table = Table("Test accuracy by batch-norm statistics",
                  ["training statistics", "statistics used", "test images", "flipped test images"],
                  rows)
    ema, precise = (mean_of(groups, lb, "trained/plain") for lb in groups)
    text = [f"PreciseBN changes test accuracy by {100 * (precise - ema):+.2f} points against "
            "moving averages. Adaptive BN recomputes every layer's statistics on the test "
            "images themselves (weights fixed); flipped: on mirrored test images."]
    return finish("bn-stats", specs, groups, text=text, tables=[table],
                  figures=[_bn_stats_figure(ctx, groups)])


def _bn_stats_figure(ctx: Context, groups: dict[str, list[Outcome]]) -> Figure:
    """Test accuracy per setting (bars: running vs precise statistics), and the
    validation curves of the two trainings."""
    settings = [("trained", "plain"), ("trained", "flipped"), ("adaptive", "plain"),
                ("adaptive", "flipped")]
    names = ["trained stats", "trained, flipped", "adaptive", "adaptive, flipped"]
    bars = [(label, [values(groups[label], f"{a}/{t}") for a, t in settings])
            for label in groups]
    path = ctx.out / "figures" / "bn-stats.png"
    save_panels(path, [
        ("test accuracy by the statistics used", lambda ax: plot_bars(
            ax, names, bars, "test accuracy (%)")),
        ("validation accuracy while training", lambda ax: plot_spread(
            ax, [(lb, [o.rows for o in groups[lb]]) for lb in groups], "accuracy", ("val",)))])
    spread = " Error bars and shading: min-max over seeds." if ctx.seeds > 1 else ""
    return Figure("Left: test accuracy with the statistics from training (moving averages "
                  "or PreciseBN) and with adaptive statistics of the test images, plain and "
                  f"mirrored. Right: validation accuracy during training.{spread}", path)


def bn_placement(ctx: Context) -> Section:
    specs = [RunSpec(f"{d}-layer, BN {pos} ReLU", {"hidden": list(h), "bn_position": pos})
             for d, h in ((3, (50, 50)), (9, NINE)) for pos in ("before", "after")]
    groups = by_label(ctx.run(specs))
    panels = [(f"{d}-layer: accuracy", [f"{d}-layer, BN before ReLU", f"{d}-layer, BN after ReLU"],
               "accuracy") for d in (3, 9)]
    fig = curves(ctx, "bn-placement", groups, panels)
    diff = {d: mean_of(groups, f"{d}-layer, BN after ReLU")
            - mean_of(groups, f"{d}-layer, BN before ReLU") for d in (3, 9)}
    text = ["Batch norm after the ReLU instead of before changes test accuracy by "
            f"{100 * diff[3]:+.2f} points at 3 layers and {100 * diff[9]:+.2f} at 9 layers."]
    return finish("bn-placement", specs, groups, text=text, figures=[fig])


def skip(ctx: Context) -> Section:
    hidden = [50] * 8  # 9 layers of equal width, so layers 3, 5, 7 get residual inputs
    specs = [RunSpec(f"{'skip' if sk else 'plain'}, {'BN' if bn else 'no BN'}",
                     {"hidden": hidden, "skip": sk, "batch_norm": bn})
             for bn in (True, False) for sk in (True, False)]
    groups = by_label(ctx.run(specs))
    panels = [(f"{'with' if bn else 'without'} batch norm: accuracy",
               [f"skip, {'BN' if bn else 'no BN'}", f"plain, {'BN' if bn else 'no BN'}"],
               "accuracy") for bn in (True, False)]
    fig = curves(ctx, "skip", groups, panels)
    gains = {bn: mean_of(groups, f"skip, {bn}") - mean_of(groups, f"plain, {bn}")
             for bn in ("BN", "no BN")}
    text = ["9-layer net of width 50; with skips, hidden layers 3, 5 and 7 add the output of "
            "layer l − 2 to their pre-activation. Skip connections change test accuracy by "
            f"{100 * gains['BN']:+.2f} points with batch norm and {100 * gains['no BN']:+.2f} "
            "without."]
    return finish("skip", specs, groups, text=text, figures=[fig])


# --- the registry -------------------------------------------------------------------------------

EXPERIMENTS: dict[str, tuple[str, str, Callable[[Context], Section]]] = {
    "gradcheck": ("Gradient check", "How were the analytic gradients checked?", gradcheck),
    "bn-depth": ("Batch norm at 3 and 9 layers",
                 "Loss, cost and accuracy with and without batch norm, 3- and 9-layer nets.",
                 bn_depth),
    "lambda-search": ("Coarse-to-fine search for lambda",
                      "Which range of lambda was searched, which was best, and its test "
                      "accuracy after 3 cycles?", lambda_search),
    "init-sensitivity": ("Sensitivity to initialization",
                         "Does batch norm make training robust to the initial weight scale, "
                         "at 3 and at 9 layers?",
                         init_sensitivity),
    "eta-study": ("Learning rate with and without batch norm",
                  "2-layer net, constant learning rates 0.001, 0.09 and 0.2, 10 epochs.",
                  eta_study),
    "optimizers": ("Cyclical SGD vs Adam, narrow vs wide",
                   "7-layer nets: does Adam with decay or a wider net do better?", optimizers),
    "bn-stats": ("Moving averages, PreciseBN and adaptive BN",
                 "Which batch-norm statistics should evaluation use?", bn_stats),
    "bn-placement": ("Batch norm before or after the ReLU",
                     "Does the position of batch norm matter?", bn_placement),
    "skip": ("Skip connections", "Do residual connections help a 9-layer net?", skip),
    "best": ("Beyond the assignment: the best fully-connected network",
             "How far can a fully-connected net go on CIFAR-10 on a laptop, and what does "
             "each ingredient add?", best),
}
# What `klayer experiment all` runs: the assignment report (best is separate: it is long).
ASSIGNMENT = tuple(k for k in EXPERIMENTS if k != "best")


def run_experiment(name: str, ctx: Context) -> Section:
    """Run one named experiment; the section gets its title, question and wall time."""
    title, question, fn = EXPERIMENTS[name]
    ctx.log(f"experiment {name}: {title}")
    ctx.experiment = name  # the kept models' subfolder
    start = time.perf_counter()
    s = fn(ctx)
    s.title, s.question, s.wall_seconds = title, question, time.perf_counter() - start
    return s


# The assignment's report items: (experiment, item, its answer from the section's facts).
SUMMARY: tuple[tuple[str, str, Callable[[dict[str, float]], str]], ...] = (
    ("gradcheck", "i. How were the gradients checked?", lambda d: (
        "centered differences on " + ("10 random elements of each parameter tensor"
                                      if d["sampled"] else "every parameter element")
        + " of 2-, 3-, 4- and 9-layer nets with and without batch norm; largest relative "
        f"error {d['max_rel_error']:.1e}")),
    ("bn-depth", "ii. 3- and 9-layer nets with and without batch norm", lambda d: (
        f"3-layer: {100 * d['bn3']:.2f} % with BN, {100 * d['nobn3']:.2f} % without; "
        f"9-layer: {100 * d['bn9']:.2f} % with BN, {100 * d['nobn9']:.2f} % without: batch "
        f"norm adds {100 * (d['bn9'] - d['nobn9']):+.2f} points at 9 layers")),
    ("lambda-search", "iii. Lambda search", lambda d: (
        f"l in [{d['lo']:g}, {d['hi']:g}] coarse, then fine; chosen λ = "
        f"{d['best_lambda']:.3g}; 3-cycle test accuracy {100 * d['test']:.2f} %")),
    ("init-sensitivity", "iv. Sensitivity to initialization", lambda d: (
        f"σ = 1e-4: {100 * d['bn_1e-4']:.2f} % with batch norm, {100 * d['nobn_1e-4']:.2f} % "
        f"without (3 layers); {100 * d['bn9_1e-4']:.2f} % and {100 * d['nobn9_1e-4']:.2f} % "
        "(9 layers)")),
)


def summary_section(sections: list[Section]) -> Section:
    """The report items, answered in order from the sections' key numbers."""
    facts = {s.key: s.facts for s in sections}
    items = [[item, answer(facts[key])] for key, item, answer in SUMMARY if key in facts]
    return Section("summary", "Summary: the report items", "What the experiments show, item "
                   "by item (test accuracy, mean over seeds).",
                   tables=[Table("Answers", ["item", "finding"], items)])
