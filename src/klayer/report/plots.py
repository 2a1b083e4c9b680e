"""Figures from metrics rows and models. Each plot draws on a given matplotlib ``ax``;
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

Rows = list[dict[str, float]]
LABELS = {"loss": "loss (cross-entropy)", "cost": "cost (loss + L2)", "accuracy": "accuracy"}


def plot_metric(ax: Axes, runs: Sequence[tuple[str, Rows]], metric: str) -> None:
    """Train (dashed) and validation (solid) curves of ``metric`` against update step."""
    for i, (label, rows) in enumerate(runs):
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        prefix = f"{label}: " if label else ""
        ax.plot(steps, [r[f"train_{metric}"] for r in rows], "--", color=color,
                label=f"{prefix}training")
        ax.plot(steps, [r[f"val_{metric}"] for r in rows], "-", color=color,
                label=f"{prefix}validation")
    ax.set_xlabel("update step")
    ax.set_ylabel(LABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_lr(ax: Axes, lrs: Sequence[float]) -> None:
    """The learning rate used at every update step."""
    ax.plot(np.arange(len(lrs)), lrs)
    ax.set_xlabel("update step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)


def plot_confusion(ax: Axes, cm: np.ndarray, classes: Sequence[str]) -> None:
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(classes)), classes, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() or 1
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black")


def weight_montage(W: np.ndarray, image_shape: tuple[int, int, int], columns: int = 10) -> (
    np.ndarray
):
    """First-layer weights (d, m) as a grid of m images, each scaled to [0, 1]. -> (H, W, 3)."""
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
    return grid if c == 3 else grid[..., 0]


def save_run_plots(out: Path, rows: Rows, lrs: Sequence[float], title: str = "") -> list[Path]:
    """loss.png, cost.png, accuracy.png and lr.png in ``out``."""
    paths = []
    for metric in ("loss", "cost", "accuracy"):
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_metric(ax, [("", rows)], metric)
        ax.set_title(title)
        paths.append(_save(fig, out / f"{metric}.png"))
    fig, ax = plt.subplots(figsize=(6, 3))
    plot_lr(ax, lrs)
    paths.append(_save(fig, out / "lr.png"))
    return paths


def save_overlay(out: Path, runs: Sequence[tuple[str, Rows]]) -> list[Path]:
    """The curves of several runs overlaid, one PNG per metric."""
    paths = []
    for metric in ("loss", "cost", "accuracy"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plot_metric(ax, runs, metric)
        paths.append(_save(fig, out / f"{metric}.png"))
    return paths


def save_confusion(path: Path, cm: np.ndarray, classes: Sequence[str]) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    plot_confusion(ax, cm, classes)
    return _save(fig, path)


def save_montage(path: Path, W: np.ndarray, image_shape: tuple[int, int, int]) -> Path:
    grid = weight_montage(W, image_shape)
    fig, ax = plt.subplots(figsize=(8, 8 * grid.shape[0] / grid.shape[1] + 0.3))
    ax.imshow(grid, interpolation="nearest", cmap=None if grid.ndim == 3 else "gray")
    ax.set_axis_off()
    ax.set_title("first-layer weights")
    return _save(fig, path)


def plot_spread(ax: Axes, groups: Sequence[tuple[str, Sequence[Rows]]], key: str,
                splits: Sequence[str] = ("train", "val")) -> None:
    """Mean curve over seeds of ``<split>_<key>`` per group, shaded between min and max.

    Training curves are dashed, validation curves solid; one colour per group.
    """
    for i, (label, all_runs) in enumerate(groups):
        longest = max(len(rows) for rows in all_runs)
        runs = [rows for rows in all_runs if len(rows) == longest]  # diverged runs end early
        if not longest:
            continue
        steps = np.array([r["step"] for r in runs[0]])
        for split in splits:
            ys = np.array([[r[f"{split}_{key}"] for r in rows] for rows in runs])  # (seeds, T)
            style = "--" if split == "train" else "-"
            name = label if len(splits) == 1 else f"{label} ({split})"
            ax.plot(steps, ys.mean(axis=0), style, color=f"C{i % 10}", label=name)
            if len(ys) > 1:
                ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=f"C{i % 10}",
                                alpha=0.2, linewidth=0)
    ax.set_xlabel("update step")
    ax.set_ylabel(LABELS[key])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


def plot_scatter(ax: Axes, stages: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                 chosen: float | None = None) -> None:
    """Validation accuracy against log10(lambda), one marker colour per search stage;
    optionally a dashed line at the chosen log10(lambda)."""
    if chosen is not None:
        ax.axvline(chosen, color="0.3", lw=1.2, ls="--", label="chosen")
    for i, (stage, log_lams, accs) in enumerate(stages):
        ax.scatter(log_lams, np.asarray(accs) * 100, color=f"C{i % 10}", label=stage, s=22)
    ax.set_xlabel("log10(lambda)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


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
    """Save ``fig`` as ``path`` atomically; a failed write (disk full) leaves no partial PNG
    and is an OutputError naming the file."""
    from klayer.data.files import atomic_write
    from klayer.training.runfolder import OutputError, cannot_write

    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format=path.suffix.lstrip(".")))
    except OSError as e:
        raise OutputError(cannot_write(path, e)) from None
    finally:
        plt.close(fig)
    return path
