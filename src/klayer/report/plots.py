"""Figures from metrics rows and models. Each ``plot_*`` draws on a given matplotlib ``ax``;
``save_*`` helpers make the figure, save a PNG and close it. Plots read results, never train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from klayer.data.files import atomic_write  # noqa: E402
from klayer.training.runfolder import OutputError, cannot_write  # noqa: E402

Rows = list[dict[str, float]]
LABELS = {"loss": "loss (cross-entropy)", "cost": "cost (loss + L2)", "accuracy": "accuracy"}
SPLIT_NAMES = {"train": "training", "val": "validation"}  # the legend of an unlabelled run


def _axes(ax: Axes, xlabel: str, ylabel: str, legend: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def plot_spread(ax: Axes, groups: Sequence[tuple[str, Sequence[Rows]]], key: str,
                splits: Sequence[str] = ("train", "val")) -> None:
    """Per group, the mean over seeds of ``<split>_<key>`` against update step, shaded from
    min to max: training dashed, validation solid, one colour per group."""
    for i, (label, all_runs) in enumerate(groups):
        longest = max(len(rows) for rows in all_runs)
        runs = [rows for rows in all_runs if len(rows) == longest]  # diverged runs end early
        if not longest:
            continue
        steps = np.array([r["step"] for r in runs[0]])
        for split in splits:
            ys = np.array([[r[f"{split}_{key}"] for r in rows] for rows in runs])  # (seeds, T)
            style = "--" if split == "train" else "-"
            name = f"{label} ({split})" if len(splits) > 1 else label
            ax.plot(steps, ys.mean(axis=0), style, color=f"C{i % 10}",
                    label=name if label else SPLIT_NAMES[split])
            if len(ys) > 1:
                ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=f"C{i % 10}",
                                alpha=0.2, linewidth=0)
    _axes(ax, "update step", LABELS[key], "x-small")


def plot_bars(ax: Axes, categories: Sequence[str],
              series: Sequence[tuple[str, Sequence[Sequence[float]]]], ylabel: str) -> None:
    """Grouped bars: per category, one bar per series at the mean of its values (in %),
    with an error bar from min to max (over seeds) and the mean written on top."""
    width = 0.8 / max(len(series), 1)
    for i, (label, per_category) in enumerate(series):
        means = np.array([np.mean(v) for v in per_category]) * 100
        lo = means - np.array([np.min(v) for v in per_category]) * 100
        hi = np.array([np.max(v) for v in per_category]) * 100 - means
        x = np.arange(len(categories)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(x, means, width, yerr=[lo, hi], capsize=3, color=f"C{i % 10}",
                      label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=2)
    ax.set_xticks(np.arange(len(categories)), categories, fontsize="small")
    _axes(ax, "", ylabel, "small")


def plot_scatter(ax: Axes, stages: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                 chosen: float | None = None) -> None:
    """Validation accuracy against log10(lambda) per search stage; a dashed line at ``chosen``."""
    if chosen is not None:
        ax.axvline(chosen, color="0.3", lw=1.2, ls="--", label="chosen")
    for i, (stage, log_lams, accs) in enumerate(stages):
        ax.scatter(log_lams, np.asarray(accs) * 100, color=f"C{i % 10}", label=stage, s=22)
    _axes(ax, "log10(lambda)", "validation accuracy (%)", "small")


def plot_best_so_far(ax: Axes, x: Sequence[float], values: Sequence[float | None],
                     pruned: Sequence[bool], xlabel: str) -> None:
    """A search's progress: each finished trial's validation accuracy at ``x`` (its end),
    pruned ones as crosses at their last reported accuracy, and the best so far of the
    complete ones as a step line (``values`` in [0, 1]; None: nothing reported)."""
    xs, ys, flags = np.asarray(x, float), np.array([np.nan if v is None else v for v in values],
                                                   float) * 100, np.asarray(pruned, bool)
    done = ~flags & np.isfinite(ys)
    best = np.fmax.accumulate(np.where(done, ys, -np.inf)) if len(ys) else ys
    shown = np.isfinite(best)
    ax.step(xs[shown], best[shown], where="post", color="C0", label="best so far")
    ax.scatter(xs[done], ys[done], s=18, color="C0", alpha=0.6, label="complete")
    if flags.any():
        ax.scatter(xs[flags], ys[flags], s=22, marker="x", color="C3",
                   label="pruned (last report)")
    _axes(ax, xlabel, "validation accuracy (%)", "small")


def save_overlay(out: Path, runs: Sequence[tuple[str, Rows]], title: str = "",
                 size: tuple[float, float] = (7, 4.5)) -> list[Path]:
    """loss.png, cost.png and accuracy.png in ``out``: the runs' curves, overlaid."""
    paths = []
    for metric in LABELS:
        fig, ax = plt.subplots(figsize=size)
        plot_spread(ax, [(label, [rows]) for label, rows in runs], metric)
        ax.set_title(title)
        paths.append(_save(fig, out / f"{metric}.png"))
    return paths


def save_run_plots(out: Path, rows: Rows, lrs: Sequence[float], title: str = "") -> list[Path]:
    """loss.png, cost.png, accuracy.png and lr.png (the learning rate per step) in ``out``."""
    paths = save_overlay(out, [("", rows)], title, size=(6, 4))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(np.arange(len(lrs)), lrs)
    _axes(ax, "update step", "learning rate")
    return [*paths, _save(fig, out / "lr.png")]


def save_confusion(path: Path, cm: np.ndarray, classes: Sequence[str]) -> Path:
    """The confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(classes)), classes, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() or 1
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > top / 2 else "black")
    return _save(fig, path)


def save_montage(path: Path, W: np.ndarray, image_shape: tuple[int, int, int],
                 columns: int = 10) -> Path:
    """First-layer weights (d, m) as a grid of m images, each scaled to [0, 1]."""
    c, h, w = image_shape
    m = W.shape[1]
    rows = -(-m // columns)
    grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c))
    for j in range(m):
        img = W[:, j].reshape(c, h, w).transpose(1, 2, 0)  # (h, w, c)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, q = divmod(j, columns)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = img
    fig, ax = plt.subplots(figsize=(8, 8 * grid.shape[0] / grid.shape[1] + 0.3))
    ax.imshow(grid if c == 3 else grid[..., 0], interpolation="nearest",
              cmap=None if c == 3 else "gray")
    ax.set_axis_off()
    ax.set_title("first-layer weights")
    return _save(fig, path)


def save_panels(path: Path, panels: Sequence[tuple[str, Callable[[Axes], None]]],
                ncols: int = 2, size: tuple[float, float] = (5.2, 3.8)) -> Path:
    """One figure with a panel per (title, draw(ax)), saved as a PNG."""
    nrows = -(-len(panels) // ncols)
    cols = min(ncols, len(panels))
    fig, axes = plt.subplots(nrows, cols, figsize=(size[0] * cols, size[1] * nrows),
                             squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels, strict=False):
        draw(ax)
        ax.set_title(title, fontsize="medium")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    """Save ``fig`` as ``path`` atomically: a failed write (disk full) leaves no partial PNG
    and is an OutputError naming the file."""
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format=path.suffix.lstrip(".")))
    except OSError as e:
        raise OutputError(cannot_write(path, e)) from None
    finally:
        plt.close(fig)
    return path
