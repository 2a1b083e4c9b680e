"""Mini-batch training: the loop, evaluation, batch-norm statistics and the run folder.

The loop is the assignment's: reshuffle each epoch, take mini-batches of n_batch rows,
compute the cost's gradients in training mode, step the optimizer with the schedule's
learning rate for update t, and evaluate loss, cost and accuracy on the training and
validation sets about ``evals_per_cycle`` times per cycle. Images stay uint8 in memory;
each mini-batch is standardized (and augmented) on the fly.

Given a run folder, a Trainer checkpoints its complete state (``state_dict``: parameters,
batch-norm statistics, optimizer state, step, epoch order, random-generator states,
metrics so far) every ``checkpoint_every`` steps, on a stop request and at the end, and
``resume`` continues from the newest usable checkpoint bit-identically: the same
arithmetic in the same order, given the same machine, NumPy/BLAS build and thread count.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from klayer import __version__
from klayer.core import kernels
from klayer.core.config import TrainConfig
from klayer.core.network import Metrics, Network
from klayer.core.optim import WeightAverage
from klayer.data.augment import hflip
from klayer.data.batchfile import DataError
from klayer.data.datasets import Data, data_fingerprint
from klayer.training import checkpoint, modelfile, trainstate
from klayer.training.checkpoint import CheckpointError
from klayer.training.evaluation import evaluate, population_stats
from klayer.training.minibatches import MiniBatches, streams
from klayer.training.plan import (
    Plan,
    make_optimizer_for,
    make_plan,
    resolve_length,
)
from klayer.training.runfolder import (
    METRIC_FIELDS,
    OutputError,
    Result,
    cannot_write,
    csv_text,
    write_text,
)
from klayer.training.stop import Stopped


class Diverged(RuntimeError):
    """The cost became NaN or infinite."""


class ResumeMismatch(ValueError):
    """A checkpoint was made with other settings than the run being resumed."""


# --- the loop ------------------------------------------------------------------------------


class Trainer:
    """One training run's state: network, optimizer, step counter, random streams, metrics.

    ``step()`` does one update; ``run()`` steps to the end, evaluating on the way.
    Four independent generators come from SeedSequence(seed): initialization,
    shuffling, dropout and augmentation, so changing one feature (say, dropout) does
    not change the mini-batch order. With ``order_seed`` set, shuffling and
    augmentation come from SeedSequence(order_seed) instead (another run's order).

    With ``run_dir``, ``run()`` keeps ``run_dir/metrics.csv`` current after every
    evaluation and checkpoints into ``run_dir/checkpoints`` every
    ``cfg.checkpoint_every`` steps, when ``should_stop`` asks for a stop and at the
    end; ``resume()`` restores the newest usable checkpoint first. ``train_curve``: as
    in ``train``.
    """

    def __init__(self, cfg: TrainConfig, data: Data,
                 callback: Callable[[str, dict[str, float]], None] | None = None,
                 run_dir: str | Path | None = None, train_curve: bool = True) -> None:
        cfg = resolve_length(cfg, len(data.train.y))  # n_s and the length, written out
        data = data.whitened(cfg.whiten, cfg.whiten_eps)  # fitted once per Data, then kept
        self.cfg, self.data, self.callback = cfg, data, callback
        self.train_curve = train_curve  # False: evaluations before the last skip the train set
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.plan = make_plan(cfg, len(data.train.y))
        init_rng, _, self.dropout_rng, _ = streams(cfg.seed)
        self.net = Network(cfg.net_config(d=data.d, num_classes=data.num_classes), rng=init_rng)
        data.whitened_train(self.net.dtype)  # made now: every evaluation then reads it alike
        self.batches = MiniBatches(cfg, data, self.plan.steps_per_epoch, self.net.dtype,
                                   cfg.shuffle_seed)  # order_seed, or seed
        self.opt = make_optimizer_for(cfg)
        self.ema = WeightAverage(self.net.params, cfg.ema) if cfg.ema else None
        self.t = 0  # updates done
        # sum_l ||W_l||^2 of the weights as the last update left them (None: unknown)
        self._squares: float | None = None
        self.rows: list[dict[str, float]] = []
        self.elapsed = 0.0  # training seconds spent before this process (on resume)
        self.finished = False  # final batch-norm statistics and evaluation done
        self.last_checkpoint: Path | None = None
        self._data_fingerprint: str | None = None
        per_epoch = self.plan.steps_per_epoch
        self.precise_every = per_epoch // cfg.precise_per_epoch if cfg.precise_per_epoch else 0

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / checkpoint.FOLDER if self.run_dir is not None else None

    def step(self) -> float:
        """One mini-batch update; returns the mini-batch loss."""
        cfg, data, net, t = self.cfg, self.data, self.net, self.t
        Xb, yb, mix = self.batches(t)  # (n_batch, d), (n_batch,), None or mixed labels
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite cost is checked next
            loss, cost, grads = net.loss_and_grads(Xb, yb, cfg.lam,
                                                   rng=self.dropout_rng,
                                                   label_smoothing=cfg.label_smoothing,
                                                   check=False, grad_l2=False, mix=mix,
                                                   squares=self._squares)
        if not math.isfinite(cost):
            raise Diverged(f"the cost became {cost} at step {t}")
        lr = self.plan.lr(t)
        # the L2 term is added here; plain SGD hands back the next step's sum_l ||W_l||^2
        self._squares = self.opt.step(net.params, grads, lr, l2=2 * cfg.lam)
        self.t += 1
        if self.ema is not None:
            self.ema.update(net.params, self.t)
        if (self.precise_every and cfg.bn_stats == "precise" and cfg.batch_norm
                and self.t % self.precise_every == 0):
            population_stats(net, data, data.train.X, cfg.precise_examples)
        _notify(self.callback, "step", {"step": self.t, "lr": lr, "loss": loss})
        return loss

    def run(self, should_stop: Callable[[], int | None] | None = None) -> Result:
        """Step to the end of the plan, evaluating every ``eval_every`` steps and at the end.

        ``should_stop()`` is asked before every step; a non-zero answer (a signal
        number) checkpoints and raises ``stop.Stopped``. A NaN or infinite cost raises
        Diverged, keeping the checkpoints written so far. Raises OutputError when a
        file of the run folder cannot be written (the files already there stay intact).
        """
        start = time.perf_counter() - self.elapsed
        total, every = self.plan.total_steps, self.cfg.checkpoint_every
        try:
            while self.t < total:
                signum = should_stop() if should_stop is not None else None
                if signum:
                    path = self.checkpoint(start) if self.run_dir is not None else None
                    raise Stopped(signum, self.t, total, path)
                if self.t % self.plan.eval_every == 0 and not self._evaluated(self.t):
                    self._evaluate(start)
                self.step()
                if every and self.run_dir is not None and self.t % every == 0 and self.t < total:
                    self.checkpoint(start)
        except Diverged as e:
            self.write_metrics()
            key = "eta_max" if self.cfg.schedule in ("cyclic", "one_cycle") else "eta"
            kept = (f"the last good checkpoint, {self.last_checkpoint}, is kept"
                    if self.last_checkpoint else "no checkpoint had been written")
            raise Diverged(f"{e}: the learning rate is too large for this net; start again "
                           f"with a smaller {key} (now {getattr(self.cfg, key):g}). "
                           f"{kept}") from None
        if not self.finished:
            if self.ema is not None:  # the average is the network; its own BN statistics
                self.ema.update(self.net.params, self.t, last=True)
                self.net.params.update(self.ema.state_dict())
                self._squares = None  # other weights than the last update's
            if self.cfg.batch_norm and (self.cfg.bn_stats == "precise" or self.ema is not None):
                population_stats(self.net, self.data, self.data.train.X,
                                 self.cfg.precise_examples)
            if not self._evaluated(self.t):
                self._evaluate(start)
            self.finished = True
            if self.run_dir is not None:
                self.checkpoint(start)
        wall = time.perf_counter() - start
        summary = _summary(self.net, self.data, self.cfg, self.plan, self.rows, wall)
        return Result(self.net, self.rows, summary, self.cfg, self.data)

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoint(self, start: float | None = None) -> Path:
        """Write metrics.csv and a checkpoint of the current state; return its path."""
        if self.checkpoint_dir is None:
            raise ValueError("this Trainer has no run folder")
        if start is not None:
            self.elapsed = time.perf_counter() - start
        self.write_metrics()
        path = checkpoint.path_for(self.checkpoint_dir, self.t)
        try:
            self.last_checkpoint = checkpoint.save(self.checkpoint_dir, self.t,
                                                   self.state_dict())
        except OSError as e:
            raise OutputError(cannot_write(path, e)) from None
        return self.last_checkpoint

    def resume(self, warn: Callable[[str], None]) -> tuple[int, Path] | None:
        """Restore the newest usable checkpoint of the run folder (see checkpoint.load_latest).

        Returns its (step, path), or None if there is none. Raises CheckpointError if
        checkpoints exist but none is usable, ResumeMismatch if they were made with
        other settings, DataError if with other data.
        """
        if self.checkpoint_dir is None:
            raise ValueError("this Trainer has no run folder")
        checkpoint.remove_temporaries(self.checkpoint_dir)
        for name in ("config.toml", "metrics.csv", "summary.json", "model.npz"):
            checkpoint.remove_temporaries(self.checkpoint_dir.parent, f".{name}.*.tmp")
        found = checkpoint.load_latest(self.checkpoint_dir, self.load_state_dict, warn)
        if found is not None:
            self.last_checkpoint = found[1]
        return found

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to continue this run bit-identically, as plain arrays."""
        rngs = (self.batches.shuffle_rng, self.dropout_rng, self.batches.aug_rng)
        rows = [[float(row[k]) for k in METRIC_FIELDS] for row in self.rows]
        d: dict[str, np.ndarray] = {
            "step": np.array(self.t, dtype=np.int64),
            "finished": np.array(self.finished),
            "elapsed": np.array(self.elapsed, dtype=np.float64),
            "config": np.array(json.dumps(self.cfg.to_dict(), sort_keys=True)),
            "data": np.array(self._fingerprint()),
            "bn_updates": np.array(self.net.bn_updates, dtype=np.int64),
            "order": np.asarray(self.batches.order, dtype=np.int64),
            "rng": np.array([json.dumps(g.bit_generator.state) for g in rngs]),
            "metric_fields": np.array(METRIC_FIELDS),
            "metrics": np.array(rows, dtype=np.float64).reshape(len(rows), len(METRIC_FIELDS)),
        }
        d.update({f"param/{k}": v.copy() for k, v in self.net.params.items()})
        d.update({f"stats/{k}": v.copy() for k, v in self.net.stats.items()})
        d.update({f"opt/{k}": v for k, v in self.opt.state_dict().items()})
        if self.ema is not None:
            d.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        return d

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        """Restore a ``state_dict``, checking all of it before changing anything.

        Raises ResumeMismatch if it was made with other settings, DataError if with
        other data, CheckpointError if anything else does not fit this run.
        """
        recorded = json.loads(modelfile.text(d, "config", CheckpointError))
        mine = self.cfg.to_dict()
        differ = trainstate.config_differences(recorded, mine)
        if differ:
            detail = ", ".join(f"{k} = {recorded.get(k)!r} there, {mine.get(k)!r} here"
                               for k in differ)
            raise ResumeMismatch(f"the checkpoint was made with other settings: {detail}")
        if modelfile.text(d, "data", CheckpointError) != self._fingerprint():
            raise DataError(f"the {self.data.name} data differs from the data this run was "
                            "trained on (other files, split or val_size)")
        t = modelfile.count(d, "step", CheckpointError)
        if not 0 <= t <= self.plan.total_steps:
            raise CheckpointError(f"step {t} outside 0..{self.plan.total_steps}")
        finished, elapsed = trainstate.scalars(d)
        params = modelfile.arrays_like(d, "param", self.net.params, CheckpointError,
                                        exact=True)
        stats = modelfile.arrays_like(d, "stats", self.net.stats, CheckpointError, exact=True)
        ema = (modelfile.arrays_like(d, "ema", self.net.params, CheckpointError, exact=True)
               if self.ema is not None else {})
        opt_state = trainstate.optimizer_state(d, params)
        order = trainstate.epoch_order(d, len(self.data.train.y))
        rngs = trainstate.generators(d, 3)
        rows = trainstate.metric_rows(d, t, self.plan.total_steps)
        opt = make_optimizer_for(self.cfg)
        try:
            opt.load_state_dict(opt_state)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"optimizer state: {e}") from None
        # all checked: apply
        self.net.params.update(params)
        self.net.stats.update(stats)
        if self.ema is not None:
            self.ema.avg = ema
        self.net.bn_updates = modelfile.count(d, "bn_updates", CheckpointError)
        self.opt, self.t, self.batches.order, self.rows = opt, t, order, rows
        self._squares = None  # new weights: the next cost sums their squares itself
        self.batches.shuffle_rng, self.dropout_rng, self.batches.aug_rng = rngs
        self.finished, self.elapsed = finished, elapsed

    def _fingerprint(self) -> str:
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.data)
        return self._data_fingerprint

    # --- metrics -----------------------------------------------------------------------

    def _evaluated(self, t: int) -> bool:
        return bool(self.rows) and self.rows[-1]["step"] == t

    def _evaluate(self, start: float) -> None:
        full = self.train_curve or self.t >= self.plan.total_steps  # the summary needs train
        self.rows.append(_eval_row(self.net, self.data, self.cfg, self.plan, self.t, start,
                                   train_set=full))
        self.write_metrics()
        _notify(self.callback, "eval", self.rows[-1])

    def write_metrics(self) -> None:
        """Rewrite run_dir/metrics.csv (atomically) with the rows so far."""
        if self.run_dir is None:
            return
        write_text(self.run_dir / "metrics.csv", csv_text(self.rows))


def train(cfg: TrainConfig, data: Data,
          callback: Callable[[str, dict[str, float]], None] | None = None,
          train_curve: bool = True) -> Result:
    """Train a fresh network on ``data`` with ``cfg``; return it with metrics and summary.

    ``callback(kind, info)`` is told of every step ("step": step, lr, loss) and every
    evaluation ("eval": one metrics row). With ``train_curve`` false the evaluations
    before the last one measure only the validation set (a search trial reports only
    that; the training set is 9x larger), and their train columns are NaN.
    """
    return Trainer(cfg, data, callback, train_curve=train_curve).run()


def _notify(callback: Callable[[str, dict[str, float]], None] | None, kind: str,
            info: dict[str, float]) -> None:
    if callback is not None:
        callback(kind, info)


def _eval_row(net: Network, data: Data, cfg: TrainConfig, plan: Plan, t: int,
              start: float, train_set: bool = True) -> dict[str, float]:
    """A metrics row at step t; the train-set columns are NaN unless ``train_set``."""
    nan = float("nan")
    tr = (evaluate(net, data, data.train.X, data.train.y, cfg.lam) if train_set
          else Metrics(nan, nan, nan))
    va = evaluate(net, data, data.val.X, data.val.y, cfg.lam)
    lr = plan.lr(min(t, plan.total_steps - 1))
    return {"step": t, "epoch": t / plan.steps_per_epoch, "lr": lr,
            "train_loss": tr.loss, "train_cost": tr.cost, "train_accuracy": tr.accuracy,
            "val_loss": va.loss, "val_cost": va.cost, "val_accuracy": va.accuracy,
            "seconds": time.perf_counter() - start}


def _summary(net: Network, data: Data, cfg: TrainConfig, plan: Plan,
             rows: list[dict[str, float]], wall: float) -> dict[str, Any]:
    test = evaluate(net, data, data.test.X, data.test.y, cfg.lam, cfg.tta_flip, cfg.tta_shift)
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
        "python_version": platform.python_version(), "kernels": kernels.BACKEND,
        "matmul": kernels.matmul_isa(),
    }
    if (cfg.tta_flip or cfg.tta_shift) and data.image_shape is not None:
        summary["test_accuracy_single_view"] = evaluate(net, data, data.test.X,
                                                        data.test.y).accuracy
    if cfg.adaptive_bn and cfg.batch_norm:
        for flip in (False, True) if data.image_shape is not None else (False,):
            adapted = net.copy()
            population_stats(adapted, data, data.test.X, 0, flip=flip)
            key = "test_accuracy_adaptive_bn" + ("_flip" if flip else "")
            summary[key] = evaluate(adapted, data, data.test.X, data.test.y).accuracy
        if cfg.flip_fraction > 0 and data.image_shape is not None:
            summary.update(_partly_flipped(net, data, cfg))
    return summary


def _partly_flipped(net: Network, data: Data, cfg: TrainConfig) -> dict[str, float]:
    """The bonus' shifted test set: a fraction of the test images mirrored (which ones,
    from the seed), tested with the running statistics and with adaptive ones."""
    assert data.image_shape is not None
    X = np.array(data.test.X)  # (n, d), a copy
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 20]))
    rows = np.sort(rng.permutation(len(X))[: round(cfg.flip_fraction * len(X))])
    X[rows] = hflip(X[rows], data.image_shape)
    adapted = net.copy()
    population_stats(adapted, data, X, 0)
    return {"flip_fraction": cfg.flip_fraction,
            "test_accuracy_partly_flipped": evaluate(net, data, X, data.test.y).accuracy,
            "test_accuracy_adaptive_bn_partly_flipped":
                evaluate(adapted, data, X, data.test.y).accuracy}

