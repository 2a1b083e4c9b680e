"""Pruning, workers and batched trials on the assignment's lambda search: wall time and the
best validation accuracy found, against one worker with neither.

    python benchmarks/search_pruning.py --data-dir DIR                  # 3 seeds, all modes
    python benchmarks/search_pruning.py --data-dir DIR --modes base,sha --seeds 1

The search is the assignment's: lambda = 10^l, l ~ U[-5, -1], each trial the default
3-layer [50, 50] BN net for 2 cycles (n_s = 2250, 9,000 updates, 10 evaluations a cycle)
on CIFAR-10 (45k/5k), ``--trials`` sampled trials. Each search is ``klayer search init``
then ``klayer search worker`` in fresh processes, exactly as a user types them (1 BLAS
thread per worker, the CLI's default); its wall time is the worker command's. Search seed
s gives every mode the same ``--sampler-seed`` (and so, with one worker, the same lambdas
in the same order) and the same trial seeds; the modes run in a rotated order per seed.

Modes: ``base`` (one worker, no pruning), ``sha`` / ``hyperband`` / ``median`` (one
worker, that pruner with its defaults), ``jobs2`` / ``jobs2-sha`` (``--jobs 2``),
``batch8`` / ``batch8-sha`` (``--batch-trials 8``). Per mode: the mean over seeds of the
wall time, of its ratio to ``base`` of the same seed, and of the best validation accuracy
found minus ``base``'s (the target: pruned within 0.3 points in at most a third of the
time), with every run in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, thread_env  # benchmarks/ is on sys.path when run as a script

KLAYER = [sys.executable, "-m", "klayer"]
MODES: dict[str, tuple[list[str], list[str]]] = {  # name: (init flags, worker flags)
    "base": (["--pruner", "none"], []),
    "sha": (["--pruner", "sha"], []),
    "hyperband": (["--pruner", "hyperband"], []),
    "median": (["--pruner", "median"], []),
    "jobs2": (["--pruner", "none"], ["--jobs", "2"]),
    "jobs2-sha": (["--pruner", "sha"], ["--jobs", "2"]),
    "batch8": (["--pruner", "none"], ["--batch-trials", "8"]),
    "batch8-sha": (["--pruner", "sha"], ["--batch-trials", "8"]),
}


def one_search(mode: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Init and work one study in a fresh folder: its wall time and outcome."""
    import optuna
    from optuna.trial import TrialState

    init_flags, worker_flags = MODES[mode]
    with tempfile.TemporaryDirectory() as tmp:
        storage = str(Path(tmp) / "journal.log")
        common = ["--study", "lam", "--storage", storage]
        _run([*KLAYER, "search", "init", *common, "--data-dir", args.data_dir,
              "--param", "lambda=1e-5..1e-1:log", "--trials", str(args.trials),
              "--seed", str(seed), *init_flags, *args.extra])
        start = time.perf_counter()
        _run([*KLAYER, "search", "worker", *common, "--data-dir", args.data_dir,
              "--sampler-seed", str(seed), "--quiet", "--poll", "0.5", *worker_flags])
        wall = time.perf_counter() - start
        if args.keep:  # for pruning_replay.py: every trial's learning curve
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(storage, Path(args.keep) / f"{mode}-{seed}.log")
        study = optuna.load_study(study_name="lam", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage)))
        ts = study.get_trials(deepcopy=False)
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    pruned = [t for t in ts if t.state == TrialState.PRUNED]
    best = max(done, key=lambda t: t.value or 0.0)
    steps = sum(t.user_attrs.get("pruned_step", t.user_attrs.get("steps", 0))
                for t in done + pruned)
    return {"mode": mode, "seed": seed, "wall_seconds": wall, "best_val": best.value,
            "best_lambda": best.params["lambda"], "best_trial": best.number,
            "complete": len(done), "pruned": len(pruned),
            "failed": sum(t.state == TrialState.FAIL for t in ts), "steps_trained": steps}


def _run(cmd: list[str]) -> None:
    """Run a klayer command with 1 BLAS thread; on failure, exit with its own error."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(1))
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:5])} failed (exit {r.returncode}):\n"
                 f"{(r.stdout + r.stderr).strip()[-3000:]}")


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, float]]:
    """Per mode: mean wall, mean ratio to base's wall and mean best-val gap (per seed)."""
    base = {r["seed"]: r for r in runs if r["mode"] == "base"}
    out = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        row = {"wall_mean": statistics.mean(r["wall_seconds"] for r in mine),
               "best_val_mean": statistics.mean(r["best_val"] for r in mine),
               "pruned_mean": statistics.mean(r["pruned"] for r in mine)}
        paired = [(r, base[r["seed"]]) for r in mine if r["seed"] in base]
        if paired:
            row["time_ratio_mean"] = statistics.mean(
                r["wall_seconds"] / b["wall_seconds"] for r, b in paired)
            row["speedup_mean"] = statistics.mean(
                b["wall_seconds"] / r["wall_seconds"] for r, b in paired)
            row["best_gap_points_mean"] = statistics.mean(
                100 * (b["best_val"] - r["best_val"]) for r, b in paired)
            row["best_gap_points_max"] = max(100 * (b["best_val"] - r["best_val"])
                                             for r, b in paired)
        out[mode] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated (default all)")
    p.add_argument("--seeds", type=int, default=3, help="search seeds 0..N-1 (default 3)")
    p.add_argument("--trials", type=int, default=16, help="sampled trials (default 16)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--keep", metavar="DIR", help="keep each search's journal as DIR/MODE-SEED.log")
    p.add_argument("extra", nargs="*", help="more `klayer search init` flags, after --")
    args = p.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"--modes: unknown {unknown}; valid: {', '.join(MODES)}")
    runs = []
    for seed in range(args.seeds):
        k = seed % len(modes)
        for mode in modes[k:] + modes[:k]:  # rotated: no mode always runs first
            r = one_search(mode, seed, args)
            runs.append(r)
            print(json.dumps(r), flush=True)
    summary = summarize(runs, modes)
    print(f"\n{machine()}; {args.trials} trials per search, {args.seeds} seeds")
    for mode, row in summary.items():
        extra = (f"  {row['time_ratio_mean']:.3f} of base's time ({row['speedup_mean']:.2f}x)"
                 f"  best val {row['best_gap_points_mean']:+.2f} points below base's (worst "
                 f"{row['best_gap_points_max']:+.2f})" if "time_ratio_mean" in row else "")
        print(f"{mode:11s} {row['wall_mean']:7.1f} s  best val {100 * row['best_val_mean']:.2f} %"
              f"  pruned {row['pruned_mean']:.1f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "search pruning, workers and batched trials", "machine": machine(),
            "trials": args.trials, "seeds": args.seeds, "extra_init_flags": args.extra,
            "summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
