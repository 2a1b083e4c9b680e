"""Mini-batch training: the loop, evaluation, batch-norm statistics and the run folder.

The loop is the assignment's: reshuffle each epoch, take mini-batches of n_batch rows,
compute the cost's gradients in training mode, step the optimizer with the schedule's
learning rate for update t, and evaluate loss, cost and accuracy on the training and
validation sets about ``evals_per_cycle`` times per cycle. Images stay uint8 in memory;
each mini-batch is standardized (and augmented) on the fly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import __version__, modelfile
from .augment import hflip, random_flip, random_translate
from .config import TrainConfig, to_toml
from .data import Data, make_synthetic
from .layers import Array
from .losses import log_softmax
from .network import Metrics, Network
from .optim import make_optimizer
from .schedules import make_schedule, resolve_total_steps

METRIC_FIELDS = ("step", "epoch", "lr", "train_loss", "train_cost", "train_accuracy",
                 "val_loss", "val_cost", "val_accuracy", "seconds")
EVAL_CHUNK = 5000


class Diverged(RuntimeError):
    """The cost became NaN or infinite."""


@dataclass
class Plan:
    """The resolved length and schedule of a run."""

    steps_per_epoch: int
    total_steps: int
    n_s: int | None
    eval_every: int
    lr: Callable[[int], float]


@dataclass
class Result:
    net: Network
    rows: list[dict[str, float]]
    summary: dict[str, Any]
    config: TrainConfig
    data: Data = field(repr=False)


# --- set-up ------------------------------------------------------------------------------


def load_data(cfg: TrainConfig) -> Data:
    """The dataset the config names (CIFAR-10 found via data_dir / $KLAYER_DATA_DIR / cache)."""
    if cfg.dataset == "synthetic":
        return make_synthetic(seed=cfg.seed)
    from . import fetch  # platformdirs, filelock, scikit-learn: only when needed

    if cfg.dataset == "digits":
        return fetch.load_digits_data(seed=cfg.seed)
    from .data import load_cifar10

    folder = fetch.locate_cifar10(cfg.data_dir, strict_checksums=cfg.strict_checksums)
    return load_cifar10(folder, split=cfg.split, val_size=cfg.val_size)


def make_plan(cfg: TrainConfig, n_train: int) -> Plan:
    """Steps per epoch, total steps, n_s and evaluation interval for a training set size."""
    if cfg.n_batch > n_train:
        raise ValueError(f"n_batch ({cfg.n_batch}) is larger than the training set ({n_train})")
    per_epoch = n_train // cfg.n_batch
    n_s = cfg.n_s if cfg.n_s is not None else max(1, 5 * n_train // cfg.n_batch)
    length = {k: getattr(cfg, k) for k in ("cycles", "epochs", "steps")}
    if all(v is None for v in length.values()):
        length = {"cycles": 2} if cfg.schedule == "cyclic" else {"epochs": 10}
    total = resolve_total_steps(cfg.schedule, steps_per_epoch=per_epoch, n_s=n_s, **length)
    kwargs: dict[str, Any] = {
        "cyclic": {"eta_min": cfg.eta_min, "eta_max": cfg.eta_max, "n_s": n_s},
        "constant": {"eta": cfg.eta},
        "step": {"eta": cfg.eta, "drop": cfg.decay, "every": cfg.decay_every},
        "exponential": {"eta": cfg.eta, "gamma": cfg.decay, "every": cfg.decay_every},
        "one_cycle": {"eta_max": cfg.eta_max, "total_steps": total},
    }.get(cfg.schedule, {})
    lr = make_schedule(cfg.schedule, **kwargs)
    period = 2 * n_s if cfg.schedule == "cyclic" else total
    eval_every = max(1, round(period / cfg.evals_per_cycle))
    return Plan(per_epoch, total, n_s if cfg.schedule == "cyclic" else None, eval_every, lr)


def make_optimizer_for(cfg: TrainConfig) -> Any:
    kwargs: dict[str, Any] = {
        "momentum": {"mu": cfg.momentum},
        "nesterov": {"mu": cfg.momentum},
        "adam": {"beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.adam_eps,
                 "weight_decay": cfg.weight_decay},
        "adamw": {"beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.adam_eps,
                  "weight_decay": cfg.weight_decay or 1e-2},
    }.get(cfg.optimizer, {})
    return make_optimizer(cfg.optimizer, **kwargs)


def validate(cfg: TrainConfig) -> None:
    """Checks that need the registries; raise ValueError naming the key."""
    make_optimizer_for(cfg)
    make_plan(cfg, n_train=max(cfg.n_batch, 1))


# --- evaluation ----------------------------------------------------------------------------


def batches(data: Data, X: Array, flip: bool = False) -> Iterator[Array]:
    """Standardized (and optionally mirrored) chunks of X, EVAL_CHUNK rows at a time."""
    for i in range(0, len(X), EVAL_CHUNK):
        chunk = data.standardize(X[i : i + EVAL_CHUNK], dtype=np.float32)
        if flip and data.image_shape is not None:
            chunk = hflip(chunk, data.image_shape)
        yield chunk


def evaluate(net: Network, data: Data, X: Array, y: Array, lam: float = 0.0,
             tta_flip: bool = False) -> Metrics:
    """Loss, cost and accuracy in evaluation mode, in chunks; optionally flip-averaged."""
    X_dtype = net.dtype
    total_nll, correct, i = 0.0, 0, 0
    for chunk in batches(data, X):
        logp = log_softmax(net.scores(chunk.astype(X_dtype, copy=False), check=False))
        yc = y[i : i + len(chunk)]
        total_nll -= float(logp[np.arange(len(yc)), yc].sum())
        if tta_flip and data.image_shape is not None:
            flipped = hflip(chunk, data.image_shape).astype(X_dtype, copy=False)
            logp = np.logaddexp(logp, log_softmax(net.scores(flipped, check=False)))
        correct += int((logp.argmax(axis=1) == yc).sum())
        i += len(chunk)
    loss = total_nll / len(y)
    penalty = lam * float(sum(np.vdot(W, W) for W in net.weights()))
    return Metrics(loss, loss + penalty, correct / len(y))


def population_stats(net: Network, data: Data, X: Array, n: int, flip: bool = False) -> None:
    """Set the running statistics to the population mean and biased variance (PreciseBN).

    Runs training-mode forward passes (weights fixed, running averages untouched) over
    the first n rows of X (all when n = 0) in mini-batches of 100, then combines the
    per-batch statistics into those of all samples together.
    """
    X = X[: n or len(X)]
    sink: list[tuple[int, Array, Array]] = []
    sizes = []
    for chunk in batches(data, X, flip=flip):
        for j in range(0, len(chunk) - 1, 100):
            part = chunk[j : j + 100].astype(net.dtype, copy=False)
            net.forward(part, train=True, update_stats=False, stats_sink=sink,
                        rng=np.random.default_rng(0))
            sizes.append(len(part))
    net.set_population_stats(sink, sizes)


# --- the loop ------------------------------------------------------------------------------


class Trainer:
    """One training run's state: network, optimizer, step counter, random streams, metrics.

    ``step()`` does one update; ``run()`` steps to the end, evaluating on the way.
    Four independent generators come from SeedSequence(seed): initialization,
    shuffling, dropout and augmentation, so changing one feature (say, dropout) does
    not change the mini-batch order.
    """

    def __init__(self, cfg: TrainConfig, data: Data,
                 callback: Callable[[str, dict[str, float]], None] | None = None) -> None:
        self.cfg, self.data, self.callback = cfg, data, callback
        self.plan = make_plan(cfg, len(data.train.y))
        init_rng, self.shuffle_rng, self.dropout_rng, self.aug_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4))
        self.net = Network(cfg.net_config(d=data.d, num_classes=data.num_classes), rng=init_rng)
        self.opt = make_optimizer_for(cfg)
        self.t = 0  # updates done
        self.rows: list[dict[str, float]] = []
        self.order = np.arange(len(data.train.y))  # this epoch's example order
        self.elapsed = 0.0  # training seconds spent before this process (on resume)
        per_epoch = self.plan.steps_per_epoch
        self.precise_every = per_epoch // cfg.precise_per_epoch if cfg.precise_per_epoch else 0

    def step(self) -> float:
        """One mini-batch update; returns the mini-batch loss."""
        cfg, data, net, t = self.cfg, self.data, self.net, self.t
        pos = (t % self.plan.steps_per_epoch) * cfg.n_batch
        if pos == 0 and cfg.shuffle:
            self.order = self.shuffle_rng.permutation(len(data.train.y))
        idx = self.order[pos : pos + cfg.n_batch]
        Xb = data.standardize(data.train.X[idx], dtype=net.dtype)  # (n_batch, d)
        Xb = _augment(Xb, data, cfg, self.aug_rng)
        loss, cost, grads = net.loss_and_grads(Xb, data.train.y[idx], cfg.lam,
                                               rng=self.dropout_rng,
                                               label_smoothing=cfg.label_smoothing, check=False)
        if not math.isfinite(cost):
            raise Diverged(f"the cost became {cost} at step {t}; try a smaller eta_max / eta")
        lr = self.plan.lr(t)
        self.opt.step(net.params, grads, lr)
        self.t += 1
        if self.precise_every and cfg.bn_stats == "precise" and self.t % self.precise_every == 0:
            population_stats(net, data, data.train.X, cfg.precise_examples)
        _notify(self.callback, "step", {"step": self.t, "lr": lr, "loss": loss})
        return loss

    def run(self) -> Result:
        """Step to the end of the plan, evaluating every ``eval_every`` steps and at the end."""
        start = time.perf_counter() - self.elapsed
        while self.t < self.plan.total_steps:
            if self.t % self.plan.eval_every == 0 and not self._evaluated(self.t):
                self._evaluate(start)
            self.step()
        if self.cfg.bn_stats == "precise":
            population_stats(self.net, self.data, self.data.train.X, self.cfg.precise_examples)
        if not self._evaluated(self.t):
            self._evaluate(start)
        wall = time.perf_counter() - start
        summary = _summary(self.net, self.data, self.cfg, self.plan, self.rows, wall)
        return Result(self.net, self.rows, summary, self.cfg, self.data)

    def _evaluated(self, t: int) -> bool:
        return bool(self.rows) and self.rows[-1]["step"] == t

    def _evaluate(self, start: float) -> None:
        self.rows.append(_eval_row(self.net, self.data, self.cfg, self.plan, self.t, start))
        _notify(self.callback, "eval", self.rows[-1])


def train(cfg: TrainConfig, data: Data,
          callback: Callable[[str, dict[str, float]], None] | None = None) -> Result:
    """Train a fresh network on ``data`` with ``cfg``; return it with metrics and summary.

    ``callback(kind, info)`` is told of every step ("step": step, lr, loss) and every
    evaluation ("eval": one metrics row).
    """
    return Trainer(cfg, data, callback).run()


def _augment(Xb: Array, data: Data, cfg: TrainConfig, rng: np.random.Generator) -> Array:
    if data.image_shape is None:
        return Xb
    if cfg.flip:
        Xb = random_flip(Xb, data.image_shape, rng)
    if cfg.translate:
        Xb = random_translate(Xb, data.image_shape, cfg.translate, rng)
    return Xb


def _notify(callback: Callable[[str, dict[str, float]], None] | None, kind: str,
            info: dict[str, float]) -> None:
    if callback is not None:
        callback(kind, info)


def _eval_row(net: Network, data: Data, cfg: TrainConfig, plan: Plan, t: int,
              start: float) -> dict[str, float]:
    tr = evaluate(net, data, data.train.X, data.train.y, cfg.lam)
    va = evaluate(net, data, data.val.X, data.val.y, cfg.lam)
    lr = plan.lr(min(t, plan.total_steps - 1))
    return {"step": t, "epoch": t / plan.steps_per_epoch, "lr": lr,
            "train_loss": tr.loss, "train_cost": tr.cost, "train_accuracy": tr.accuracy,
            "val_loss": va.loss, "val_cost": va.cost, "val_accuracy": va.accuracy,
            "seconds": time.perf_counter() - start}


def _summary(net: Network, data: Data, cfg: TrainConfig, plan: Plan,
             rows: list[dict[str, float]], wall: float) -> dict[str, Any]:
    test = evaluate(net, data, data.test.X, data.test.y, cfg.lam, tta_flip=cfg.tta_flip)
    last = rows[-1]
    summary: dict[str, Any] = {
        "train_accuracy": last["train_accuracy"], "val_accuracy": last["val_accuracy"],
        "test_accuracy": test.accuracy, "test_loss": test.loss,
        "train_loss": last["train_loss"], "val_loss": last["val_loss"],
        "steps": plan.total_steps, "epochs": plan.total_steps / plan.steps_per_epoch,
        "n_s": plan.n_s, "wall_seconds": wall, "steps_per_second": plan.total_steps / wall,
        "seed": cfg.seed, "dataset": data.name,
        "n_train": len(data.train.y), "n_val": len(data.val.y), "n_test": len(data.test.y),
        "klayer_version": __version__, "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }
    if cfg.adaptive_bn and cfg.batch_norm:
        for flip in (False, True) if data.image_shape is not None else (False,):
            adapted = net.copy()
            population_stats(adapted, data, data.test.X, 0, flip=flip)
            key = "test_accuracy_adaptive_bn" + ("_flip" if flip else "")
            summary[key] = evaluate(adapted, data, data.test.X, data.test.y).accuracy
    return summary


# --- the run folder ------------------------------------------------------------------------


def save_run(result: Result, out: Path) -> None:
    """config.toml, metrics.csv, summary.json and model.npz in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.data
    write_text(out / "config.toml", to_toml(result.config.to_dict()))
    write_text(out / "metrics.csv", _csv_text(result.rows))
    write_text(out / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    meta = {"dataset": data.name, "seed": result.config.seed,
            "image_shape": list(data.image_shape) if data.image_shape else None}
    modelfile.save(result.net, out / "model.npz", metadata=meta,
                   extras={"mean": data.mean, "std": data.std})


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (old file or complete new one, never a part)."""
    data = text.encode()

    def write(f: IO[bytes]) -> None:
        f.write(data)

    modelfile.atomic_write(path, write)


def _csv_text(rows: list[dict[str, float]]) -> str:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return text.getvalue()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv back as a list of rows of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
