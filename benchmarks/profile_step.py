"""Where one training step's time goes: the phases of ``Trainer.step``, timed one by one.

    python benchmarks/profile_step.py --data-dir DIR                  # 3-layer [50,50]
    python benchmarks/profile_step.py --data-dir DIR --threads 1      # BLAS at one thread
    python benchmarks/profile_step.py --hidden 50,30,20,20,10,10,10,10
    KLAYER_KERNELS=numpy python benchmarks/profile_step.py ...        # NumPy code only

The recipe is ``bench_train.py``'s (float32, batch 100, batch norm, L2 0.005, SGD).
After a warm-up, each of ``--steps`` steps runs the phases of ``Trainer.step`` in order,
through the same calls (the C kernels where they are built), with a clock read between
them: reading and standardizing the mini-batch, the forward pass, the loss and its
gradient, the L2 penalty (a pass of its own only when the update did not hand back the
weights' sum of squares), the backward pass and the update (which adds the L2 term).
It also times the first layer's two matrix products alone, so the rest of a step can
be read off, as the step runs them (``kernels.matmul``) and by BLAS (NumPy's ``@``).
Mean microseconds per step are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# benchmarks/ is on sys.path when run as a script
from _common import machine, thread_env, training_data

PHASES = ("mini-batch", "forward", "loss", "l2 penalty", "backward", "update")


def profile(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np

    from klayer.core import kernels
    from klayer.core.config import TrainConfig
    from klayer.core.losses import l2_penalty, training_loss
    from klayer.training.trainer import Trainer

    data = training_data(args.data_dir)
    hidden = tuple(int(w) for w in args.hidden.split(","))
    cfg = TrainConfig(hidden=hidden, lam=0.005, n_s=2250, n_batch=100, seed=0)
    tr = Trainer(cfg, data)
    for _ in range(args.warmup):
        tr.step()
    net, opt, clock = tr.net, tr.opt, time.perf_counter
    total = dict.fromkeys(PHASES, 0.0)
    order = np.random.default_rng(0).permutation(len(data.train.y))
    per_epoch = len(data.train.y) // cfg.n_batch
    buf, squares = None, None
    for t in range(args.steps):
        c0 = clock()
        idx = order[(t % per_epoch) * 100 : (t % per_epoch + 1) * 100]
        Xb = data.train_rows(idx, dtype=net.dtype, out=buf)
        buf, yb = Xb, data.train.y[idx]  # the trainer reuses its mini-batch buffer too
        c1 = clock()
        scores, caches = net.forward(Xb, train=True)
        c2 = clock()
        loss, dscores = training_loss(scores, yb)
        c3 = clock()
        _cost = loss + (cfg.lam * squares if squares is not None  # as Trainer.step
                        else l2_penalty(net.weights(), cfg.lam))
        c4 = clock()
        grads = net.backward(dscores, caches)  # the update adds the L2 term, as in training
        c5 = clock()
        squares = opt.step(net.params, grads, 0.01, l2=2 * cfg.lam)  # and sums W^2 (SGD, C)
        c6 = clock()
        for name, (a, b) in zip(PHASES, ((c0, c1), (c1, c2), (c2, c3), (c3, c4), (c4, c5),
                                         (c5, c6)), strict=True):
            total[name] += b - a
    us = {k: 1e6 * v / args.steps for k, v in total.items()}
    print(f"kernels: {kernels.BACKEND}")
    W1, dS = net.params["W1"], np.ones((100, hidden[0]), np.float32)
    start = clock()
    for _ in range(args.steps):  # as the step runs them (klayer's kernels where they run)
        kernels.matmul(Xb, W1)
        kernels.matmul(Xb, dS, trans_a=True)
    us["first-layer products (alone)"] = 1e6 * (clock() - start) / args.steps
    start = clock()
    for _ in range(args.steps):  # the same by BLAS
        Xb @ W1
        Xb.T @ dS
    us["first-layer products (BLAS)"] = 1e6 * (clock() - start) / args.steps
    return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: random uint8 stand-in data)")
    p.add_argument("--hidden", default="50,50", help="hidden widths (default 50,50)")
    p.add_argument("--steps", type=int, default=2000, help="profiled steps")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps first")
    p.add_argument("--threads", type=int, help="BLAS threads (default: BLAS's own choice)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.threads:
        os.environ.update(thread_env(args.threads))  # before NumPy is imported
    us = profile(args)
    step = sum(us[k] for k in PHASES)
    print(f"hidden {args.hidden}, BLAS threads {args.threads or 'default'}, {args.steps} steps "
          f"({machine()})")
    for k, v in us.items():
        share = f"{100 * v / step:5.1f} %" if k in PHASES else ""
        print(f"{k:<30} {v:8.1f} us  {share}")
    print(f"{'step':<30} {step:8.1f} us  ({1e6 / step:.0f} steps/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "step profile", "hidden": args.hidden,
                                               "threads": args.threads, "us": us,
                                               "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
