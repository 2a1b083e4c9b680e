"""Time to accuracy: wall time until a training first reaches a target, klayer against peers.

    python benchmarks/bench_time_to_accuracy.py --data-dir DIR            # 3-layer to 52.5 % val
    python benchmarks/bench_time_to_accuracy.py --data-dir DIR --hidden 1024,512,256 \\
        --split test --target 0.60 --every 500                             # the wide net to 60 %
    python benchmarks/bench_time_to_accuracy.py --data-dir DIR --recipe augmented \\
        --hidden 1024,512,256 --split test --target 0.60,0.63 --every 450 --peers klayer,jax

``--recipe assignment`` (the default) is ``bench_peers.py``'s recipe and peers (the
assignment's cyclical SGD with batch norm, each peer written its own way);
``--recipe augmented`` is the best recipe's training on a 40-epoch schedule
(``peers_augmented.py``: ZCA, flips and translations, Nesterov, one-cycle, label
smoothing; klayer and JAX). Each worker, a fresh process pinned to ``--threads`` cores,
starts its clock after the data are in memory and before the first update (so a
compiled peer's compilation counts, and whitening where the recipe whitens), evaluates
on ``--split`` every ``--every`` updates (evaluations count too: users evaluate to know
when to stop), notes the first evaluation at or above each of the ``--target``s and
stops at the last, or after ``--max-steps``. The peers alternate over ``--rounds``
rounds; the median time to each target is printed, with the updates it took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine, run_worker
from bench_peers import env_for, installed, load_sets, make_peer, run_flags, wait


def worker(args: argparse.Namespace) -> None:
    hidden = tuple(int(w) for w in args.hidden.split(","))
    data = load_sets(args.data_dir)
    split = getattr(data, args.split)
    targets = sorted(float(x) for x in args.target.split(","))
    start = time.perf_counter()
    if args.recipe == "augmented":
        import peers_augmented

        step, accuracy = peers_augmented.make_peer(args.worker, hidden, data)
    else:
        step, accuracy = make_peer(args.worker, args.threads, hidden, data)
    t, acc, reached = 0, 0.0, {}
    while t < args.max_steps and len(reached) < len(targets):
        for _ in range(args.every):
            last = step(t)
            t += 1
        wait(last)
        acc = accuracy(split)
        for x in targets:
            if acc >= x and str(x) not in reached:
                reached[str(x)] = {"seconds": time.perf_counter() - start, "steps": t}
    never = {"seconds": float("inf"), "steps": t}
    print(json.dumps({"targets": {str(x): reached.get(str(x), never) for x in targets},
                      "steps": t, "accuracy": acc}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder")
    p.add_argument("--recipe", choices=("assignment", "augmented"), default="assignment",
                   help="what the peers train (default: the assignment's)")
    p.add_argument("--hidden", default="50,50", help="hidden widths (default 50,50)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="the split the target is measured on (default val)")
    p.add_argument("--target", default="0.525",
                   help="accuracies to reach, comma-separated (default 0.525)")
    p.add_argument("--every", type=int, default=250, help="updates between evaluations")
    p.add_argument("--max-steps", type=int, default=4 * 2 * 2250, help="give up after (4 cycles)")
    run_flags(p, "klayer,torch-malloc,torch-compile,jax")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    peers, missing = installed([x for x in args.peers.split(",") if x])
    if args.recipe == "augmented" and set(peers) - {"klayer", "jax"}:
        p.error("--recipe augmented has the peers klayer and jax only")
    runs: dict[str, list[dict[str, Any]]] = {x: [] for x in peers}
    for _ in range(args.rounds):
        for peer in peers:
            out = run_worker([sys.executable, __file__, "--worker", peer, *sys.argv[1:]],
                             env_for(peer, args.threads))
            runs[peer].append(json.loads(out.strip().splitlines()[-1]))
    report(args, runs, missing)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
           missing: list[str]) -> None:
    targets = sorted(float(x) for x in args.target.split(","))
    med = {x: {str(g): statistics.median(r["targets"][str(g)]["seconds"] for r in v)
               for g in targets} for x, v in runs.items()}
    print(f"time to {', '.join(f'{g:.1%}' for g in targets)} {args.split} accuracy, "
          f"{args.recipe} recipe, hidden {args.hidden}, {args.threads} thread(s), median "
          f"(min..max) of {args.rounds} rounds ({machine()})")
    for x, v in runs.items():
        for g in targets:
            secs = [r["targets"][str(g)]["seconds"] for r in v]
            steps = ", ".join(str(r["targets"][str(g)]["steps"]) for r in v)
            print(f"{x:<14} {g:.1%}: {med[x][str(g)]:>7.1f} s  ({min(secs):.1f}..{max(secs):.1f}),"
                  f" after {steps} updates")
        last = ", ".join(f"{r['accuracy']:.2%}" for r in v)
        print(f"{'':<14} accuracy at the last evaluation: {last}")
    for x in missing:
        print(f"{x:<14} skipped: not installed")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "time to accuracy", "recipe": args.recipe, "hidden": args.hidden,
            "split": args.split, "targets": targets, "every": args.every,
            "threads": args.threads, "rounds": args.rounds, "median_seconds": med,
            "runs": runs, "skipped": missing, "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
