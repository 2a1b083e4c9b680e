"""Distance to the limit: klayer's achieved FLOP rate against this machine's sgemm rate.

    python benchmarks/bench_flops.py --data-dir DIR            # CIFAR-10 (45k/5k split)
    python benchmarks/bench_flops.py                           # random uint8 stand-in data
    python benchmarks/bench_flops.py --hidden 50,30,20,20,10,10,10,10 --json out.json

Two kinds of fresh subprocess, alternating over ``--repeats`` rounds, all with the same
thread count (OMP/OpenBLAS/MKL variables set before NumPy is imported):

* ``sgemm``: float32 NumPy matrix products (``np.matmul`` into a preallocated output, so
  only BLAS is timed) of the first layer's shapes in a training step, the forward
  x (100 x 3072) @ W (3072 x 50) and the backward x^T (3072 x 100) @ dS (100 x 50), with
  x^T a transposed view as in ``layers.linear_backward``; their combined rate (FLOPs of
  one forward and one backward over their summed times) is the first-layer limit. A
  large square product (``--peak-size``, default 2048^3) gives the machine's peak.
* ``klayer``: ``train.Trainer`` steps of the default recipe (float32, batch 100, batch
  norm, cyclical SGD), timed after a warm-up as in bench_train.py.

A step's FLOPs are counted analytically over all matrix products: per layer with
weights W (d_in x d_out) on a batch of n, 2 n d_in d_out for the forward s = x W, the
same for dW = x^T dS and, except in the first layer (whose input needs no gradient),
for dx = dS W^T. Element-wise work (batch norm, ReLU, softmax, the update) is not
counted, so the achieved rate is a lower bound of the work done. The medians over the
rounds give achieved GFLOP/s and its fraction of the first-layer sgemm rate (target
>= 40 %) and of the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# benchmarks/ is on sys.path when run as a script
from _common import machine, run_worker, sgemm_peak, thread_env, time_matmul, training_data

N_BATCH, D_IN, M1 = 100, 3072, 50
TARGET = 0.40


def step_flops(widths: list[tuple[int, int]], n: int) -> int:
    """FLOPs of the matrix products of one training step (forward, dW, dx but the first)."""
    return sum(2 * n * d_in * d_out * (3 if l > 1 else 2)
               for l, (d_in, d_out) in enumerate(widths, start=1))


def run_sgemm(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_BATCH, D_IN), dtype=np.float32)
    W = rng.standard_normal((D_IN, M1), dtype=np.float32)
    dS = rng.standard_normal((N_BATCH, M1), dtype=np.float32)
    flops = 2 * N_BATCH * D_IN * M1  # each of the two products
    t_fwd = time_matmul(x, W, args.gemm_iters)
    t_bwd = time_matmul(x.T, dS, args.gemm_iters)
    return {"forward": flops / t_fwd / 1e9, "backward": flops / t_bwd / 1e9,
            "first_layer": 2 * flops / (t_fwd + t_bwd) / 1e9,
            "peak": sgemm_peak(args.peak_size, args.peak_iters) / 1e9}


def run_klayer(args: argparse.Namespace, hidden: tuple[int, ...]) -> dict[str, float]:
    from klayer.core.config import TrainConfig
    from klayer.training.trainer import Trainer

    data = training_data(args.data_dir)
    cfg = TrainConfig(hidden=hidden, n_batch=N_BATCH, dtype="float32", seed=0)
    trainer = Trainer(cfg, data)
    k = len(hidden) + 1
    widths = [trainer.net.params[f"W{l}"].shape for l in range(1, k + 1)]
    flops = step_flops([(int(a), int(b)) for a, b in widths], N_BATCH)
    for _ in range(args.warmup):
        trainer.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    rate = args.steps / (time.perf_counter() - start)
    return {"steps_per_second": rate, "flops_per_step": flops, "gflops": rate * flops / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: random uint8 stand-in data)")
    p.add_argument("--hidden", default="50,50", help="hidden widths (default 50,50)")
    p.add_argument("--steps", type=int, default=2000, help="timed klayer steps per round")
    p.add_argument("--warmup", type=int, default=200, help="untimed klayer steps first")
    p.add_argument("--gemm-iters", type=int, default=2000,
                   help="timed first-layer products of each shape per round")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square product")
    p.add_argument("--peak-iters", type=int, default=20, help="timed square products per round")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS threads")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=("sgemm", "klayer"), help=argparse.SUPPRESS)
    args = p.parse_args()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    if args.worker:
        res = run_sgemm(args) if args.worker == "sgemm" else run_klayer(args, hidden)
        print(json.dumps(res))
        return
    runs: dict[str, list[dict[str, float]]] = {"sgemm": [], "klayer": []}
    for _ in range(args.repeats):
        for kind in runs:
            cmd = [sys.executable, __file__, "--worker", kind, *sys.argv[1:]]
            out = run_worker(cmd, thread_env(args.threads))
            runs[kind].append(json.loads(out.strip().splitlines()[-1]))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    sgemm = {key: med("sgemm", key) for key in ("forward", "backward", "first_layer", "peak")}
    achieved = med("klayer", "gflops")
    import numpy

    result = {
        "benchmark": "distance to the limit", "hidden": list(hidden), "threads": args.threads,
        "steps": args.steps, "repeats": args.repeats, "data": args.data_dir or "random",
        "flops_per_step": runs["klayer"][0]["flops_per_step"],
        "klayer_steps_per_second": med("klayer", "steps_per_second"),
        "klayer_gflops": achieved,
        "sgemm_forward_gflops": sgemm["forward"], "sgemm_backward_gflops": sgemm["backward"],
        "sgemm_first_layer_gflops": sgemm["first_layer"], "sgemm_peak_gflops": sgemm["peak"],
        "peak_size": args.peak_size,
        "fraction_of_first_layer": achieved / sgemm["first_layer"],
        "fraction_of_peak": achieved / sgemm["peak"], "target_fraction": TARGET,
        "all": runs, "machine": machine(), "numpy": numpy.__version__,
    }
    result["met"] = result["fraction_of_first_layer"] >= TARGET
    n, d, m, s = N_BATCH, D_IN, M1, args.peak_size
    print(f"hidden {args.hidden}, {args.threads} threads, median of {args.repeats} rounds "
          f"({result['machine']})")
    print(f"{'rate':<40} {'GFLOP/s':>8}")
    print(f"{f'sgemm forward  ({n}x{d}) @ ({d}x{m})':<40} {sgemm['forward']:>8.1f}")
    print(f"{f'sgemm backward ({d}x{n}) @ ({n}x{m})':<40} {sgemm['backward']:>8.1f}")
    print(f"{'sgemm first layer (fwd + bwd)':<40} {sgemm['first_layer']:>8.1f}")
    print(f"{f'sgemm peak ({s}x{s}) @ ({s}x{s})':<40} {sgemm['peak']:>8.1f}")
    print(f"{'klayer achieved':<40} {achieved:>8.1f}   "
          f"({result['klayer_steps_per_second']:.0f} steps/s x "
          f"{result['flops_per_step'] / 1e6:.2f} MFLOP)")
    print(f"klayer / first-layer sgemm: {result['fraction_of_first_layer']:.0%} "
          f"(target >= {TARGET:.0%}: {'met' if result['met'] else 'not met'}); "
          f"klayer / peak: {result['fraction_of_peak']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
