"""Time to accuracy: wall time until a training first reaches a target, klayer against peers.

    python benchmarks/bench_time_to_accuracy.py --data-dir DIR            # 3-layer to 52.5 % val
    python benchmarks/bench_time_to_accuracy.py --data-dir DIR --hidden 1024,512,256 \\
        --split test --target 0.60 --every 500                             # the wide net to 60 %

The recipe and the peers are ``bench_peers.py``'s (the assignment's cyclical SGD with
batch norm, each peer written its own way). Each worker, a fresh process pinned to
``--threads`` cores, starts its clock after the data are in memory and before the
first update (so a compiled peer's compilation counts), evaluates on ``--split`` every
``--every`` updates (evaluations count too: users evaluate to know when to stop), and
stops at the first evaluation at or above ``--target``, or after ``--max-steps``. The
peers alternate over ``--rounds`` rounds; the median time of each is printed, with the
steps it took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import machine, run_worker
from bench_peers import env_for, installed, load_sets, make_peer, run_flags, wait


def worker(args: argparse.Namespace) -> None:
    hidden = tuple(int(w) for w in args.hidden.split(","))
    data = load_sets(args.data_dir)
    split = getattr(data, args.split)
    start = time.perf_counter()
    step, accuracy = make_peer(args.worker, args.threads, hidden, data)
    t, acc = 0, 0.0
    while t < args.max_steps:
        for _ in range(args.every):
            last = step(t)
            t += 1
        wait(last)
        acc = accuracy(split)
        if acc >= args.target:
            break
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds if acc >= args.target else float("inf"),
                      "steps": t, "accuracy": acc}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder")
    p.add_argument("--hidden", default="50,50", help="hidden widths (default 50,50)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="the split the target is measured on (default val)")
    p.add_argument("--target", type=float, default=0.525, help="accuracy to reach (0.525)")
    p.add_argument("--every", type=int, default=250, help="updates between evaluations")
    p.add_argument("--max-steps", type=int, default=4 * 2 * 2250, help="give up after (4 cycles)")
    run_flags(p, "klayer,torch-malloc,torch-compile,jax")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    peers, missing = installed([x for x in args.peers.split(",") if x])
    runs: dict[str, list[dict[str, float]]] = {x: [] for x in peers}
    for _ in range(args.rounds):
        for peer in peers:
            out = run_worker([sys.executable, __file__, "--worker", peer, *sys.argv[1:]],
                             env_for(peer, args.threads))
            runs[peer].append(json.loads(out.strip().splitlines()[-1]))
    med = {x: statistics.median(r["seconds"] for r in v) for x, v in runs.items()}
    print(f"time to {args.target:.1%} {args.split} accuracy, hidden {args.hidden}, "
          f"{args.threads} thread(s), median (min..max) of {args.rounds} rounds ({machine()})")
    for x, v in runs.items():
        secs = [r["seconds"] for r in v]
        print(f"{x:<14} {med[x]:>7.1f} s  ({min(secs):.1f}..{max(secs):.1f}), after "
              f"{', '.join(str(r['steps']) for r in v)} updates")
    for x in missing:
        print(f"{x:<14} skipped: not installed")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "time to accuracy", "hidden": args.hidden, "split": args.split,
            "target": args.target, "every": args.every, "threads": args.threads,
            "rounds": args.rounds, "median_seconds": med, "runs": runs, "skipped": missing,
            "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
