"""Train T networks of one architecture at once: stacked weights, one shared mini-batch stream.

T trials that differ only in lambda and the learning-rate settings see the same
mini-batches, so the expensive parts of a step are done once for all of them: reading
and standardizing (and augmenting) the mini-batch, and the first layer's products,
which become one wide matrix product (``core.stack.Stack``).

Each trial's arithmetic is the lone ``train.Trainer``'s, operation for operation, so a
trial's final weights equal (float64: to rounding, ~1e-13) those of a lone run with the
same configuration, **initialized from its own seed** and fed **the same mini-batch
order** (shuffling and augmentation drawn from ``order_seed``, by default the first
trial's seed). Dropout masks come from each trial's own seed, as when alone.

This module is core: NumPy and the core modules only. The caller (``search``) turns
configurations into plans (learning-rate functions and lengths) with ``train.make_plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from klayer.core.config import TrainConfig
from klayer.core.layers import Array
from klayer.core.losses import training_loss
from klayer.core.network import Network
from klayer.core.optim import SGD
from klayer.core.stack import Stack
from klayer.data.datasets import Data
from klayer.training.evaluation import evaluate, evaluate_many, population_stats
from klayer.training.minibatches import MiniBatches, streams
from klayer.training.plan import make_optimizer_for

# TrainConfig fields that may differ between the trials of one batch.
BATCHABLE = ("lam", "eta_min", "eta_max", "eta", "decay", "seed", "name")


def batch_key(cfg: TrainConfig) -> tuple[Any, ...]:
    """The values of every field that trials trained together must share."""
    return tuple(getattr(cfg, f.name) for f in fields(cfg) if f.name not in BATCHABLE)


def check_batchable(cfgs: Sequence[TrainConfig]) -> None:
    """ValueError naming the first field that keeps these configurations apart."""
    if not cfgs:
        raise ValueError("no configurations to train")
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for f in fields(cfg):
            a, b = getattr(first, f.name), getattr(cfg, f.name)
            if f.name not in BATCHABLE and a != b:
                raise ValueError(f"trials trained together must share {f.name}: "
                                 f"{a!r} != {b!r} (only {', '.join(BATCHABLE)} may differ)")
    if first.precise_per_epoch:
        raise ValueError("batched trials do not support precise_per_epoch > 0")
    if first.ema:
        raise ValueError("batched trials do not support ema > 0")


class BatchedTrainer:
    """Train ``len(cfgs)`` networks together on one mini-batch sequence.

    ``lrs[i](t)`` is trial i's learning rate for update t (``train.make_plan(cfg).lr``);
    all trials take ``total_steps`` updates of ``steps_per_epoch`` per epoch. Trial i's
    network starts as a lone ``Trainer``'s would (initialization and dropout from
    SeedSequence(cfgs[i].seed)); shuffling and augmentation come from
    SeedSequence(order_seed), default the first trial's ``order_seed`` or else its seed
    (a lone Trainer given that ``order_seed`` sees the same mini-batches). A trial whose cost
    becomes NaN or infinite is dropped from the stack and its reason kept in
    ``diverged`` (index -> message); the others go on. With ``eval_every``, ``run``
    records each trial's validation curve in ``curves``, and ``on_eval(i, step, accuracy)``
    hears of each point; where it answers True, trial i leaves the stack there (pruned:
    ``pruned`` maps it to that step). Leaving changes nothing in the others' results.
    """

    def __init__(self, cfgs: Sequence[TrainConfig], data: Data,
                 lrs: Sequence[Callable[[int], float]], steps_per_epoch: int,
                 total_steps: int, order_seed: int | None = None, eval_every: int = 0,
                 on_eval: Callable[[int, int, float], bool] | None = None) -> None:
        check_batchable(cfgs)
        if len(lrs) != len(cfgs):
            raise ValueError(f"{len(cfgs)} configurations but {len(lrs)} schedules")
        self.cfg = cfgs[0]
        self.data = data = data.whitened(self.cfg.whiten, self.cfg.whiten_eps)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.lrs = list(lrs)
        self.lam = np.array([c.lam for c in cfgs], np.float64)
        self.active = np.arange(len(cfgs))  # original index of each stacked trial
        self.diverged: dict[int, str] = {}
        self.pruned: dict[int, int] = {}  # trial index -> the step where it left
        self.on_eval = on_eval
        nets, self.dropout_rngs = [], []
        for c in cfgs:
            init_rng, _, dropout_rng, _ = streams(c.seed)
            nets.append(Network(c.net_config(d=data.d, num_classes=data.num_classes),
                                rng=init_rng))
            self.dropout_rngs.append(dropout_rng)
        self.stack = Stack(nets)
        self.batches = MiniBatches(self.cfg, data, steps_per_epoch, self.stack.dtype,
                                   cfgs[0].shuffle_seed if order_seed is None else order_seed)
        self.opt = make_optimizer_for(self.cfg)  # the lone trainer's, given per_trial
        self.t = 0
        self._penalty: Array | None = None  # sum_l ||W_l||^2 per trial, when known
        self.eval_every = eval_every
        # trial index -> [(step, validation accuracy)] every eval_every steps, from step 0
        self.curves: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(cfgs))}

    def step(self) -> None:
        """One update of every remaining trial on the next shared mini-batch."""
        cfg, stack, t = self.cfg, self.stack, self.t
        X, y, mix = self.batches(t)  # the lone Trainer's mini-batch t, shared by all trials
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scores, caches = stack.forward(X, train=True, rng=self.dropout_rngs)
            loss, dscores = training_loss(scores, y, cfg.label_smoothing, mix)
            lam = self.lam[self.active]
            penalty = stack.penalty() if self._penalty is None else self._penalty
            cost = loss + np.where(lam == 0, 0.0, lam * penalty)
            grads = stack.backward(dscores, caches)
        bad = ~np.isfinite(cost)
        if bad.any():
            grads = self._drop(bad, cost, grads)
            if stack.T == 0:
                self.t += 1
                return
        lr = np.array([self.lrs[i](t) for i in self.active], np.float64)
        l2 = 2 * self.lam[self.active]  # the L2 term 2 lambda W joins the update
        if isinstance(self.opt, SGD):  # fused; hands back the next step's penalty
            self._penalty = stack.sgd_step(grads, lr, l2)
            self.opt.t += 1
        else:
            self.opt.step(stack.params, grads, lr, l2, per_trial=stack.per_trial)
            self._penalty = None
        self.t += 1

    def _drop(self, bad: np.ndarray, cost: Array, grads: dict[str, Array]) -> dict[str, Array]:
        """Drop the trials whose cost is not finite (kept in ``diverged``); the others' grads."""
        for j in np.flatnonzero(bad):
            self.diverged[int(self.active[j])] = (
                f"the cost became {cost[j]} at step {self.t}; try a smaller eta_max / eta")
        rows = np.flatnonzero(~bad)
        grads = {k: self.stack.trials_of(k, v, rows) for k, v in grads.items()}
        self._keep(rows)
        return grads

    def _keep(self, rows: np.ndarray) -> None:
        """Keep only the stacked trials at ``rows``: networks, optimizer state, streams."""
        self.stack.keep(rows)
        for bufs in self.opt.state.values():  # the optimizer's state, trial by trial
            for name, b in bufs.items():
                bufs[name] = self.stack.trials_of(name, b, rows)
        self.active = self.active[rows]
        self.dropout_rngs = [self.dropout_rngs[j] for j in rows]
        self._penalty = None if self._penalty is None else self._penalty[rows]

    def run(self) -> list[Network | None]:
        """Step to the end (recording ``curves``); each trial's network, or None where it
        diverged or was pruned."""
        while self.t < self.total_steps and len(self.active):
            if self.eval_every and self.t % self.eval_every == 0:
                self.curve_point()
                if not len(self.active):  # every trial left at this point
                    break
            self.step()
        return self.networks()

    def curve_point(self) -> None:
        """Every remaining trial's validation accuracy now, added to its curve (at the
        steps where a lone Trainer with the same eval_every evaluates, and equal to it)."""
        val = self.data.val
        nets = self.stack.networks()
        leave = np.zeros(len(self.active), bool)
        for j, m in enumerate(evaluate_many(nets, self.data, val.X, val.y)):
            i = int(self.active[j])
            self.curves[i].append((self.t, m.accuracy))
            if self.on_eval is not None and self.on_eval(i, self.t, m.accuracy):
                self.pruned[i], leave[j] = self.t, True
        if leave.any():
            self._keep(np.flatnonzero(~leave))

    def networks(self) -> list[Network | None]:
        out: list[Network | None] = [None] * len(self.curves)
        if len(self.active):
            for i, net in zip(self.active, self.stack.networks(), strict=True):
                out[int(i)] = net
        return out


def evaluate_trained(nets: Sequence[Network], cfgs: Sequence[TrainConfig],
                     data: Data) -> list[dict[str, float]]:
    """Final metrics of networks trained together: PreciseBN if asked, then train, val
    and test in shared passes (``evaluation.evaluate_many``); test view-averaged if asked."""
    if not nets:
        return []
    data = data.whitened(cfgs[0].whiten, cfgs[0].whiten_eps)  # as trained (kept, not refit)
    for net, cfg in zip(nets, cfgs, strict=True):
        if cfg.bn_stats == "precise" and cfg.batch_norm:
            population_stats(net, data, data.train.X, cfg.precise_examples)
    lams = [c.lam for c in cfgs]
    tr = evaluate_many(nets, data, data.train.X, data.train.y, lams)
    va = evaluate_many(nets, data, data.val.X, data.val.y, lams)
    if cfgs[0].tta_flip or cfgs[0].tta_shift:
        te = [evaluate(n, data, data.test.X, data.test.y, c.lam, c.tta_flip, c.tta_shift)
              for n, c in zip(nets, cfgs, strict=True)]
    else:
        te = evaluate_many(nets, data, data.test.X, data.test.y, lams)
    return [{"val_accuracy": v.accuracy, "test_accuracy": t.accuracy,
             "train_accuracy": a.accuracy, "val_loss": v.loss, "test_loss": t.loss}
            for a, v, t in zip(tr, va, te, strict=True)]
