"""The budget race, measured: 20 runs of 4 workers on a 12-trial study of very short
trials on a private PostgreSQL server; no run may end with more than 12 COMPLETE trials.

    python benchmarks/search_race.py      # as root; needs the postgresql server package

Per run it prints the COMPLETE trials, the trials told FAIL "over budget" (the race
happened and was caught) and all trials; then the largest COMPLETE count.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState
from search_outage import KLAYER, server

TINY = ["--dataset", "synthetic", "--hidden", "8", "--n-batch", "50", "--steps", "5",
        "--evals-per-cycle", "1", "--checkpoint-every", "0"]


def main(runs: int = 20) -> None:
    url, bindir, _, root = server()
    work = Path(tempfile.mkdtemp())
    most = 0
    try:
        for i in range(runs):
            name = f"race{i}"
            subprocess.run([*KLAYER, "search", "init", "--study", name, "--storage", url,
                            "--param", "lambda=1e-4..1e-1:log", "--trials", "12", *TINY],
                           cwd=work, check=True, capture_output=True)
            workers = [subprocess.Popen([*KLAYER, "search", "worker", "--study", name,
                                         "--storage", url, "--poll", "0.2", "--quiet"],
                                        cwd=work, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for _ in range(4)]
            for w in workers:
                w.wait(timeout=300)
            ts = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url)
                                   ).get_trials(deepcopy=False)
            done = sum(t.state == TrialState.COMPLETE for t in ts)
            over = sum("over budget" in t.user_attrs.get("fail_reason", "") for t in ts)
            most = max(most, done)
            print(f"run {i + 1}: COMPLETE {done}, over budget {over}, trials {len(ts)}",
                  flush=True)
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D",
                        str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"largest COMPLETE count: {most} (budget 12)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
