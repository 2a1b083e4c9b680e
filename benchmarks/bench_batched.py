"""Batched trials: T trials trained in one vectorized pass against the same T one by one.

    python benchmarks/bench_batched.py --data-dir DIR              # CIFAR-10, default recipe
    python benchmarks/bench_batched.py --data-dir DIR --n-s 900 --cycles 1 --repeats 1
    python benchmarks/bench_batched.py                             # random uint8 stand-in

T trials of the default recipe (3-layer [50, 50] with batch norm, float32, cyclical
learning rate, batches of 100) that differ in lambda (log-spaced 1e-5 .. 1e-1) and
eta_max are trained three ways, each in a fresh process with the same BLAS thread count
(1, as ``klayer search worker``):

* ``sequential``: one after another as a search worker trains a lone trial:
  ``train.train`` with its ``evals_per_cycle`` evaluations of the validation set (the
  learning curve the trial reports) and its final summary (train / val / test);
* ``sequential-steps``: one after another, update steps only plus one final evaluation
  of train / val / test (no curves): the lone trial with nothing but training;
* ``batched``: ``batched.BatchedTrainer`` (one wide first-layer product per step, shared
  mini-batches), its validation curves at the same steps and the shared final
  evaluation of train / val / test, as ``klayer search worker --batch-trials T`` does.

So ``sequential`` and ``batched`` do the same work per trial (curve and final
evaluation); a batched trial trains on the shared mini-batch order, so its accuracies
are those of a lone run with that order (the tests check this), not of the sequential
runs here. ``sequential-steps`` shows the cost of the curves.

Each round also times a large float32 square product in a fresh process at the same
thread count (the machine's sgemm peak, as in bench_flops.py). Every trial, alone or
batched, must do its own first-layer products: 2 x 100 rows per step (the forward
s = x W and dW = x^T dS; the first layer needs no dx), plus one row per image of each
validation curve point and of the final train / val / test evaluation, each row
2 x 3072 x m1 FLOPs. Those FLOPs at the peak rate are a floor under any batched run's
time as long as the products go through BLAS, so ``sequential`` seconds over that
floor is a ceiling on the batched speed-up with this machine's BLAS.

The modes alternate over ``--repeats`` rounds; the median wall time of each gives its
trials per hour and the ratio to ``sequential``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# benchmarks/ is on sys.path when run as a script
from _common import run_worker, sgemm_peak, thread_env, trial_configs

MODES = ("sequential", "sequential-steps", "batched")


def first_layer_flops(cfg, data) -> int:  # type: ignore[no-untyped-def]
    """FLOPs of the first layer's products that one trial needs in any mode: its update
    steps, the validation curve points before the last step and the final evaluation."""
    from klayer.training.plan import make_plan

    n_train, n_val, n_test = len(data.train.y), len(data.val.y), len(data.test.y)
    plan = make_plan(cfg, n_train)
    curve = len(range(0, plan.total_steps, plan.eval_every))
    rows = 2 * plan.total_steps * cfg.n_batch + curve * n_val + n_train + n_val + n_test
    return 2 * data.train.X.shape[1] * cfg.hidden[0] * rows


def load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import numpy as np

    from klayer.data.datasets import Data, Split

    if args.data_dir:
        from klayer.data.datasets import load_cifar10
        from klayer.data.fetch import locate_cifar10

        return load_cifar10(locate_cifar10(args.data_dir))
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n))

    return Data(split(45000), split(5000), split(10000), 10, "random", (3, 32, 32))


def run(args: argparse.Namespace) -> dict[str, object]:
    """One mode in this process: seconds for all T trials and their validation accuracies."""
    import warnings

    warnings.simplefilter("ignore")
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    if args.mode == "peak":
        return {"flops_per_second": sgemm_peak()}
    from klayer.training import trainer as train
    from klayer.training.batched import BatchedTrainer, evaluate_trained
    from klayer.training.plan import make_plan

    data = load(args)
    cfgs = trial_configs(args.trials, args.n_s, args.cycles)
    start = time.perf_counter()
    if args.mode == "sequential":
        val = [train.train(c, data, train_curve=False).summary["val_accuracy"] for c in cfgs]
    elif args.mode == "sequential-steps":
        val = []
        for c in cfgs:
            tr = train.Trainer(c, data)
            while tr.t < tr.plan.total_steps:
                tr.step()
            val.append(evaluate_trained([tr.net], [c], data)[0]["val_accuracy"])
    else:
        plans = [make_plan(c, len(data.train.y)) for c in cfgs]
        bt = BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                            plans[0].total_steps, eval_every=plans[0].eval_every)
        nets = [n for n in bt.run() if n is not None]
        val = [r["val_accuracy"] for r in evaluate_trained(nets, cfgs, data)]
    return {"seconds": time.perf_counter() - start, "val_accuracy": val,
            "steps": make_plan(cfgs[0], len(data.train.y)).total_steps,
            "first_layer_flops": sum(first_layer_flops(c, data) for c in cfgs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: random uint8 stand-in data)")
    p.add_argument("--trials", type=int, default=8, help="T (default 8)")
    p.add_argument("--n-s", type=int, default=2250, help="half-cycle steps (default 2250)")
    p.add_argument("--cycles", type=float, default=2, help="cycles (default 2)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three modes")
    p.add_argument("--modes", default=",".join(MODES), help="which modes (comma-separated)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run(args)))
        return
    modes = args.modes.split(",")
    env = thread_env(args.threads)
    times: dict[str, list[float]] = {m: [] for m in modes}
    vals: dict[str, list[float]] = {}
    peaks: list[float] = []
    steps = flops = 0
    for r in range(args.repeats):
        for mode in [*modes, "peak"]:
            cmd = [sys.executable, __file__, "--mode", mode, "--trials", str(args.trials),
                   "--n-s", str(args.n_s), "--cycles", str(args.cycles),
                   "--threads", str(args.threads)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            out = json.loads(run_worker(cmd, env).strip().splitlines()[-1])
            if mode == "peak":
                peaks.append(out["flops_per_second"])
                print(f"round {r + 1}: sgemm peak {peaks[-1] / 1e9:12.1f} GFLOP/s", flush=True)
                continue
            times[mode].append(out["seconds"])
            vals[mode], steps, flops = out["val_accuracy"], out["steps"], out["first_layer_flops"]
            print(f"round {r + 1}: {mode:<17} {out['seconds']:7.1f} s", flush=True)
    print(f"\n{args.trials} trials of {steps} steps each, {args.threads} BLAS thread(s), "
          f"{'CIFAR-10' if args.data_dir else 'random data'}; median of {args.repeats}")
    print(f"{'mode':<18}{'seconds':>9}{'trials/hour':>13}{'vs sequential':>15}"
          f"{'mean val acc':>14}")
    ref = statistics.median(times["sequential"]) if "sequential" in times else None
    result = {}
    for mode in modes:
        sec = statistics.median(times[mode])
        per_hour = args.trials * 3600 / sec
        ratio = f"{ref / sec:.2f}x" if ref else "-"
        mean_val = sum(vals[mode]) / len(vals[mode])
        print(f"{mode:<18}{sec:>9.1f}{per_hour:>13.0f}{ratio:>15}{mean_val:>14.2%}")
        result[mode] = {"seconds": times[mode], "median_seconds": sec,
                        "trials_per_hour": per_hour, "val_accuracy": vals[mode]}
    peak = statistics.median(peaks)
    floor = flops / peak
    print(f"\nsgemm peak {peak / 1e9:.1f} GFLOP/s; the trials' first-layer products "
          f"({flops / 1e9:.0f} GFLOP) take at least {floor:.1f} s at that rate")
    ceiling = ref / floor if ref else None
    if ceiling:
        print(f"ceiling on the batched speed-up over sequential with this BLAS: {ceiling:.2f}x")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trials": args.trials, "steps": steps, "threads": args.threads,
                       "modes": result, "sgemm_peak_flops": peaks,
                       "first_layer_flops": flops, "floor_seconds": floor,
                       "ceiling_vs_sequential": ceiling}, f, indent=2)


if __name__ == "__main__":
    main()
