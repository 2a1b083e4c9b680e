"""klayer's own matrix products (``kernels.matmul``, ``_gemm.c``) against NumPy's BLAS.

    python benchmarks/bench_products.py                 # 1 and 2 threads, 3 rounds
    python benchmarks/bench_products.py --threads 2 --rounds 5 --json out.json

The shapes are a training step's for a batch of 100: the first layer's X W and X^T dS
(3,072 inputs; 50 units as in the assignment's nets, 1,024 as in the best recipe's)
and the wide net's later layers' h W, h^T dS and dS W^T. Each round is a fresh process
with every thread pool (and ``kernels.set_threads``) at ``--threads``, that times every
product either by the kernels or by BLAS (``np.matmul`` into a preallocated output),
``--calls`` calls a time, best of 5; the two kinds of process alternate. (Not both in
one process: after a product at 2 threads, OpenBLAS's second thread spins on the other
core for a while and starves the kernels' own helper, which a training step never
meets, since its products all run on the kernels.) Medians over the rounds are printed
in microseconds per product and GFLOP/s, with the ratio. The kernels run on the widest
instruction set the CPU has (AVX-512, else AVX2; the output names it); on a CPU with
neither both columns are BLAS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from _common import machine, run_worker, thread_env

# (name, rows of the result, inner, columns, form): form "nn" x W, "tn" x^T dS, "nt" dS W^T
SHAPES = [("X W1, 50 units", 100, 3072, 50, "nn"), ("X^T dS1, 50 units", 3072, 100, 50, "tn"),
          ("X W1, 1,024 units", 100, 3072, 1024, "nn"),
          ("X^T dS1, 1,024 units", 3072, 100, 1024, "tn"),
          ("h1 W2 (1,024 -> 512)", 100, 1024, 512, "nn"),
          ("h1^T dS2", 1024, 100, 512, "tn"), ("dS2 W2^T", 100, 512, 1024, "nt"),
          ("h2 W3 (512 -> 256)", 100, 512, 256, "nn"), ("h2^T dS3", 512, 100, 256, "tn"),
          ("dS3 W3^T", 100, 256, 512, "nt")]


def operands(n: int, d: int, m: int, form: str) -> tuple:  # type: ignore[type-arg]
    """(a, b, the same product for np.matmul): a and b as ``kernels.matmul`` takes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    f = np.float32
    if form == "tn":  # x (d, n) of d examples; x^T dS, dS (d, m)
        a, b = rng.standard_normal((d, n), dtype=f), rng.standard_normal((d, m), dtype=f)
        return a, b, (a.T, b)
    if form == "nt":  # dS (n, d), W (m, d)
        a, b = rng.standard_normal((n, d), dtype=f), rng.standard_normal((m, d), dtype=f)
        return a, b, (a, b.T)
    a, b = rng.standard_normal((n, d), dtype=f), rng.standard_normal((d, m), dtype=f)
    return a, b, (a, b)


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from klayer.core import kernels

    kernels.set_threads(args.threads)
    out: dict[str, float] = {}
    for name, n, d, m, form in SHAPES:
        a, b, (x, y) = operands(n, d, m, form)
        c = np.empty((n, m), np.float32)
        f = (partial(kernels.matmul, a, b, form == "tn", form == "nt", out=c)
             if args.worker == "klayer" else partial(np.matmul, x, y, out=c))
        best = float("inf")
        for _ in range(5):
            f()
            start = time.perf_counter()
            for _ in range(args.calls):
                f()
            best = min(best, (time.perf_counter() - start) / args.calls)
        out[name] = best
    print(json.dumps({"matmul": kernels.matmul_isa(), "seconds": out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (1,2)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per thread count")
    p.add_argument("--calls", type=int, default=50, help="calls per timing")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=("klayer", "blas"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        worker(args)
        return
    results: dict[str, dict[str, list[float]]] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        runs: dict[str, list[dict]] = {"klayer": [], "blas": []}  # type: ignore[type-arg]
        for _ in range(args.rounds):
            for who in runs:
                cmd = [sys.executable, __file__, "--worker", who, "--threads", str(threads),
                       "--calls", str(args.calls)]
                out = run_worker(cmd, thread_env(threads)).strip().splitlines()[-1]
                runs[who].append(json.loads(out))
        print(f"{threads} thread(s), median of {args.rounds} rounds, matrix products by "
              f"{runs['klayer'][0]['matmul']} against BLAS ({machine()})")
        results[str(threads)] = {}
        for name, n, d, m, _ in SHAPES:
            ours, blas = (statistics.median(r["seconds"][name] for r in runs[who])
                          for who in ("klayer", "blas"))
            flop = 2 * n * d * m
            results[str(threads)][name] = [ours, blas]
            print(f"  {name:<22} {ours * 1e6:>7.0f} us {flop / ours / 1e9:>6.1f} GFLOP/s   BLAS "
                  f"{blas * 1e6:>7.0f} us {flop / blas / 1e9:>6.1f} GFLOP/s   {blas / ours:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "matrix products", "shapes": SHAPES, "rounds": args.rounds,
            "seconds": results, "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
