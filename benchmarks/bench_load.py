"""Loading CIFAR-10 from the cache, and evaluating the 10,000 test images.

    python benchmarks/bench_load.py --data-dir DIR
    python benchmarks/bench_load.py --data-dir DIR --repeats 9 --json out.json

The batch files of DIR are linked into a fresh temporary folder (``--tmp-dir``), so the
first load there is a real first time (safe unpickling, MD5 check, writing the decoded
``.npy`` cache) and DIR's own cache is neither used nor touched. Then ``--repeats``
fresh subprocesses, with the same BLAS thread count, each:

* time ``fetch.locate_cifar10`` + ``data.load_cifar10`` (45k/5k split, as
  ``klayer train`` loads it; training statistics included) from the cache, after the
  imports; the whole process's wall time, interpreter start and imports included, is
  reported beside it;
* build the default 3-layer [50, 50] batch-norm network (``train.Trainer``, float32),
  take ``--train-steps`` update steps so the batch-norm statistics are trained ones,
  evaluate it once on ``data.test`` (``evaluation.evaluate``: loss, cost, accuracy;
  the first call, reported apart) and then ``--eval-repeats`` more times.

The first load is reported apart; the medians of the cached loads and of the timed
evaluations (pooled over the processes) are compared with the 2 s and 0.1 s targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, thread_env  # benchmarks/ is on sys.path when run as a script

LOAD_TARGET, EVAL_TARGET = 2.0, 0.1


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    from klayer.core.config import TrainConfig
    from klayer.data.datasets import load_cifar10
    from klayer.data.fetch import ChecksumWarning, locate_cifar10
    from klayer.training.evaluation import evaluate
    from klayer.training.trainer import Trainer

    warnings.simplefilter("ignore", ChecksumWarning)  # a stand-in copy is fine here
    start = time.perf_counter()
    data = load_cifar10(locate_cifar10(args.data_dir))
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - start,
                              "n_test": data.test.n}
    if args.eval_repeats:
        cfg = TrainConfig(seed=0)
        trainer = Trainer(cfg, data)
        for _ in range(args.train_steps):
            trainer.step()
        times = []
        for _ in range(1 + args.eval_repeats):
            start = time.perf_counter()
            metrics = evaluate(trainer.net, data, data.test.X, data.test.y, cfg.lam)
            times.append(time.perf_counter() - start)
        out.update(eval_first_seconds=times[0], eval_seconds=times[1:],
                   test_accuracy=metrics.accuracy)
    return out


def link_batches(data_dir: str, tmp: Path) -> Path:
    """A folder in ``tmp`` linking DIR's CIFAR-10 batch files, without klayer's own files."""
    import warnings

    from klayer.data.fetch import ChecksumWarning, locate_cifar10

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChecksumWarning)
        folder = locate_cifar10(data_dir)
    target = tmp / "cifar-10-batches-py"
    target.mkdir()
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith(("klayer-", ".klayer")):
            (target / f.name).symlink_to(f.resolve())
    return target


def worker(args: argparse.Namespace, folder: Path, eval_repeats: int) -> dict[str, Any]:
    """One fresh process on ``folder``: its result and its whole wall time."""
    cmd = [sys.executable, __file__, "--worker", *sys.argv[1:], "--data-dir", str(folder),
           "--eval-repeats", str(eval_repeats)]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes loading the cache")
    p.add_argument("--eval-repeats", type=int, default=10, help="timed evaluations per process")
    p.add_argument("--train-steps", type=int, default=100, help="update steps before evaluating")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS threads")
    p.add_argument("--tmp-dir", help="where the temporary copy goes (needs ~200 MB)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=args.tmp_dir) as tmp:
        folder = link_batches(args.data_dir, Path(tmp))
        first = worker(args, folder, 0)
        cached = [worker(args, folder, args.eval_repeats) for _ in range(args.repeats)]
    load = statistics.median(r["load_seconds"] for r in cached)
    process = statistics.median(r["process_seconds"] for r in cached)
    evals = [t for r in cached for t in r.get("eval_seconds", [])]
    ev = statistics.median(evals) if evals else float("nan")
    ev_first = (statistics.median(r["eval_first_seconds"] for r in cached)
                if evals else float("nan"))
    import numpy

    result = {
        "benchmark": "loading and evaluation", "threads": args.threads,
        "repeats": args.repeats, "eval_repeats": args.eval_repeats,
        "train_steps": args.train_steps, "data": args.data_dir,
        "first_load_seconds": first["load_seconds"],
        "first_process_seconds": first["process_seconds"],
        "load_seconds": load, "process_seconds": process, "load_target_seconds": LOAD_TARGET,
        "load_met": load <= LOAD_TARGET, "n_test": cached[0]["n_test"] if cached else None,
        "eval_seconds": ev, "eval_first_seconds": ev_first, "eval_target_seconds": EVAL_TARGET,
        "eval_met": ev <= EVAL_TARGET, "first": first, "all": cached,
        "machine": machine(), "numpy": numpy.__version__,
    }
    print(f"{args.threads} threads, medians of {args.repeats} processes "
          f"x {args.eval_repeats} evaluations ({result['machine']})")
    print(f"{'step':<34} {'seconds':>8} {'process s':>9} {'target':>7}")
    print(f"{'load, first time (decode + cache)':<34} {first['load_seconds']:>8.3f} "
          f"{first['process_seconds']:>9.3f}")
    print(f"{'load from the cache':<34} {load:>8.3f} {process:>9.3f} {LOAD_TARGET:>7.1f}"
          f"  {'met' if result['load_met'] else 'not met'}")
    print(f"{'evaluate 10,000 test, first call':<34} {ev_first:>8.3f}")
    print(f"{'evaluate 10,000 test':<34} {ev:>8.3f} {'':>9} {EVAL_TARGET:>7.1f}"
          f"  {'met' if result['eval_met'] else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
