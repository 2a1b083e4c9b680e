"""Memory: peak resident memory of a full CIFAR-10 training run, ``klayer train``.

    python benchmarks/bench_memory.py --data-dir DIR                # full run, defaults
    python benchmarks/bench_memory.py --data-dir DIR --steps 500    # shortened run
    python benchmarks/bench_memory.py --data-dir DIR --cycles 0.5 --json out.json

Runs ``python -m klayer train --data-dir DIR --quiet --out TMP`` (the default recipe:
45k/5k split, 3-layer [50, 50] with batch norm, float32, two cycles, with its
evaluations, final test evaluation and run folder) in a fresh subprocess with the given
BLAS thread count, ``--repeats`` times. The peak resident set of each run is the
``ru_maxrss`` that ``os.wait4`` reports for it (the kernel's high-water mark, sampling
nothing); the median is compared with the 500 MB target. While a run goes, its
``/proc/PID/status`` is sampled every ``--interval`` seconds for the peak anonymous
(heap) and file-backed (memory-mapped cache, libraries) parts, which tell where the
memory goes. A baseline process that only imports klayer's training modules is
measured the same way. ``--cycles`` or ``--steps`` shorten the run (passed to
``klayer train``); extra ``klayer train`` flags go after ``--``.
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

from _common import machine, thread_env  # benchmarks/ is on sys.path when run as a script

TARGET_MB = 500.0
MB = 1024 * 1024  # ru_maxrss and /proc/PID/status count KiB; 1 MB = 1 MiB here


def measure(cmd: list[str], env: dict[str, str], interval: float) -> dict[str, float]:
    """Run ``cmd``; its wall time, peak RSS (ru_maxrss) and sampled peaks, in MB."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
            except (OSError, ValueError, IndexError):
                pass  # not on Linux, or the process is exiting
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(interval)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                     f"{log.read().decode(errors='replace')[-3000:]}")
    return {"max_rss_mb": usage.ru_maxrss * 1024 / MB, "wall_seconds": wall,
            "sampled_anon_mb": peaks["RssAnon"] * 1024 / MB,
            "sampled_file_mb": peaks["RssFile"] * 1024 / MB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--cycles", type=float, help="training length in cycles (default 2)")
    length.add_argument("--steps", type=int, help="training length in update steps")
    p.add_argument("--repeats", type=int, default=1, help="training runs (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS threads")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("extra", nargs="*", help="more `klayer train` flags, after --")
    args = p.parse_args()
    env = thread_env(args.threads)
    base = measure([sys.executable, "-c",
                    "import klayer.cli.main, klayer.training.trainer, klayer.data.fetch"],
                   env, args.interval)
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            cmd = [sys.executable, "-m", "klayer", "train", "--data-dir", args.data_dir,
                   "--quiet", "--out", str(Path(tmp) / "run")]
            if args.cycles is not None:
                cmd += ["--cycles", str(args.cycles)]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            runs.append(measure(cmd + args.extra, env, args.interval))
    peak = statistics.median(r["max_rss_mb"] for r in runs)
    length_desc = (f"{args.steps} steps" if args.steps is not None
                   else f"{args.cycles:g} cycles" if args.cycles is not None
                   else "the length the flags give" if args.extra else "2 cycles")
    import numpy

    result = {
        "benchmark": "peak resident memory", "command": "klayer train --data-dir DIR --quiet",
        "length": length_desc, "extra_flags": args.extra, "threads": args.threads,
        "repeats": args.repeats, "data": args.data_dir, "max_rss_mb": peak,
        "target_mb": TARGET_MB, "met": peak <= TARGET_MB, "baseline": base, "all": runs,
        "machine": machine(), "numpy": numpy.__version__,
    }
    print(f"klayer train, {length_desc}, {args.threads} threads, median of {args.repeats} "
          f"({result['machine']})")
    print(f"{'process':<22} {'peak RSS MB':>11} {'anon MB':>8} {'file MB':>8} {'wall s':>7}")
    rows = [("import klayer only", base)]
    rows += [(f"klayer train #{i}", r) for i, r in enumerate(runs, start=1)]
    for name, r in rows:
        print(f"{name:<22} {r['max_rss_mb']:>11.0f} {r['sampled_anon_mb']:>8.0f} "
              f"{r['sampled_file_mb']:>8.0f} {r['wall_seconds']:>7.1f}")
    print(f"peak RSS {peak:.0f} MB (median; target <= {TARGET_MB:.0f} MB: "
          f"{'met' if result['met'] else 'not met'}); anon/file are sampled peaks")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
