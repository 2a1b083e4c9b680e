"""Training steps per second of two klayer source trees, alternating in fresh processes.

    git worktree add /tmp/old d95d0f9          # a revision to compare against
    python benchmarks/bench_revisions.py /tmp/old . --data-dir DIR --threads 1 --rounds 4
    python benchmarks/bench_revisions.py /tmp/old . --data-dir DIR --batched 8

Each round runs one process per tree (its ``src`` first on sys.path; copy the built
``_kernels*.so`` into a worktree that has none), warms up, then times the lone
3-layer recipe's ``Trainer.step`` (or ``BatchedTrainer.step`` of T trials) and prints
every round's figure and the medians. Used for issue 21's "as fast as before" check.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time


def worker(tree: str, data_dir: str | None, batched: int, hidden: str) -> float:
    sys.path.insert(0, os.path.join(tree, "src"))
    flat = not os.path.isdir(os.path.join(tree, "src", "klayer", "training"))
    mod = {name: importlib.import_module("klayer." + (old if flat else new))
           for name, old, new in (("trainer", "train", "training.trainer"),
                                  ("plan", "train", "training.plan"),
                                  ("batched", "batched", "training.batched"),
                                  ("config", "config", "core.config"))}
    widths = tuple(int(w) for w in hidden.split(","))
    dataset = {"data_dir": data_dir} if data_dir else {"dataset": "synthetic"}
    cfgs = [mod["config"].TrainConfig(hidden=widths, n_s=2250, seed=i, lam=0.005 / (i + 1),
                                      **dataset) for i in range(max(batched, 1))]
    data = mod["plan"].load_data(cfgs[0])
    if batched:
        plans = [mod["plan"].make_plan(c, len(data.train.y)) for c in cfgs]
        trainer = mod["batched"].BatchedTrainer(cfgs, data, [p.lr for p in plans],
                                                plans[0].steps_per_epoch, 10**9)
        warm, steps = 50, 400
    else:
        trainer, warm, steps = mod["trainer"].Trainer(cfgs[0], data), 200, 2000
    for _ in range(warm):
        trainer.step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs=2, help="two source trees (folders holding src/klayer)")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: synthetic data)")
    p.add_argument("--hidden", default="50,50")
    p.add_argument("--batched", type=int, default=0, metavar="T", help="T batched trials")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(worker(args.worker, args.data_dir, args.batched, args.hidden))
        return
    env = {**os.environ, **{k: str(args.threads) for k in
                            ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    rates: dict[str, list[float]] = {t: [] for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            cmd = [sys.executable, __file__, *args.trees, "--worker", tree, "--hidden",
                   args.hidden, "--batched", str(args.batched)]
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rates[tree].append(float(out.stdout.strip().splitlines()[-1]))
    for tree, r in rates.items():
        print(f"{tree}: median {statistics.median(r):.1f} steps/s (rounds "
              f"{', '.join(f'{x:.1f}' for x in r)})")


if __name__ == "__main__":
    main()
