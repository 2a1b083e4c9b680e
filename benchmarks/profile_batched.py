"""Where a batched step's time goes: the phases of ``BatchedTrainer.step``, timed one by one.

    python benchmarks/profile_batched.py --data-dir DIR              # T = 8, 1 BLAS thread
    python benchmarks/profile_batched.py --data-dir DIR --trials 4 --threads 2

T trials of the default recipe (3-layer [50, 50], batch norm, float32, batches of 100)
that differ in lambda and eta_max, as in ``bench_batched.py``, are built into a
``batched.BatchedTrainer``. After a warm-up, each of ``--steps`` steps runs the phases of
``BatchedTrainer.step`` in order, through the same calls (the C kernels where they are
built), with a clock read between them: the mini-batch, the forward pass, the loss, the
backward pass, the update (with the L2 term, and for SGD the next step's penalty). The
first layer's two wide products are then timed alone, so the rest can be read off, and
``BatchedTrainer.step`` itself is timed as a whole. Mean microseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# benchmarks/ is on sys.path when run as a script
from _common import machine, thread_env, training_data, trial_configs

PHASES = ("mini-batch", "forward", "loss", "backward", "update")


def trainer(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from klayer.training.batched import BatchedTrainer
    from klayer.training.plan import make_plan

    data = training_data(args.data_dir)
    cfgs = trial_configs(args.trials, n_s=2250, cycles=2)  # bench_batched.py's trials
    plans = [make_plan(c, len(data.train.y)) for c in cfgs]
    return BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                          plans[0].total_steps), data


def profile(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np

    from klayer.core.losses import training_loss as softmax_cross_entropy

    bt, data = trainer(args)
    for _ in range(args.warmup):
        bt.step()
    stack, clock = bt.stack, time.perf_counter
    total = dict.fromkeys(PHASES, 0.0)
    buf = None
    for _ in range(args.steps):  # BatchedTrainer.step's calls, phase by phase
        c0 = clock()
        pos = (bt.t % bt.steps_per_epoch) * 100
        idx = bt.order[pos : pos + 100]
        X = data.train_rows(idx, dtype=stack.dtype, out=buf)
        buf = X
        c1 = clock()
        scores, caches = stack.forward(X, train=True)
        c2 = clock()
        _loss, dscores = softmax_cross_entropy(scores, data.train.y[idx])
        c3 = clock()
        grads = stack.backward(dscores, caches, X)
        c4 = clock()
        lr = np.array([f(bt.t) for f in bt.lrs])
        bt._penalty = bt.opt.step(stack, grads, lr, 2 * bt.lam)
        bt.t += 1
        c5 = clock()
        for name, (a, b) in zip(PHASES, ((c0, c1), (c1, c2), (c2, c3), (c3, c4), (c4, c5)),
                                strict=True):
            total[name] += b - a
    us = {k: 1e6 * v / args.steps for k, v in total.items()}
    W1 = stack.params["W1"]
    dS = np.ones((100, W1.shape[1]), np.float32)
    start = clock()
    for _ in range(args.steps):
        X @ W1
        X.T @ dS
    us["first-layer products (alone)"] = 1e6 * (clock() - start) / args.steps
    start = clock()
    for _ in range(args.steps):
        bt.step()
    us["BatchedTrainer.step (whole)"] = 1e6 * (clock() - start) / args.steps
    return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: random uint8 stand-in data)")
    p.add_argument("--trials", type=int, default=8, help="T (default 8)")
    p.add_argument("--steps", type=int, default=300, help="profiled steps")
    p.add_argument("--warmup", type=int, default=50, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1, as a worker)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    os.environ.update(thread_env(args.threads))  # before NumPy is imported
    us = profile(args)
    step = sum(us[k] for k in PHASES)
    print(f"{args.trials} trials, BLAS threads {args.threads}, {args.steps} steps ({machine()})")
    for k, v in us.items():
        share = f"{100 * v / step:5.1f} %" if k in PHASES else ""
        print(f"{k:<30} {v:8.1f} us  {share}")
    print(f"{'sum of the phases':<30} {step:8.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "batched step profile",
                                               "trials": args.trials, "threads": args.threads,
                                               "us": us, "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
