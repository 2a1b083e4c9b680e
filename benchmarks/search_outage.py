"""Search faults, measured: 4 workers on a 16-trial study on a private PostgreSQL server,
with the database stopped for 0.2, 10 and 60 s during the run (and once not at all).

    python benchmarks/search_outage.py      # as root; needs the postgresql server package

Per run it prints the workers' exit codes, the wall time, the trials by state, the
distinct seeds among the COMPLETE trials (every trial exactly once: 16), the workers'
"storage unreachable" lines and any traceback. The server runs as the postgres user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

TRAIN = ["--dataset", "synthetic", "--hidden", "16", "--n-batch", "50", "--n-s", "1500",
         "--cycles", "1", "--evals-per-cycle", "1", "--checkpoint-every", "0"]
KLAYER = [sys.executable, "-m", "klayer"]


def server() -> tuple[str, Path, str, Path]:
    """Start a throw-away server: (URL, its bin folder, its options, its root folder)."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    root = Path(tempfile.mkdtemp(prefix="klayer-pg-"))
    pw = pwd.getpwnam("postgres")
    os.chown(root, pw.pw_uid, pw.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(bindir, "initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
    pg(bindir, "pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o", opts,
       "start")
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                         autocommit=True) as c:
        c.execute("CREATE DATABASE klayer")
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/klayer", Path(bindir), opts, root


def pg(bindir: str | Path, tool: str, *args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", str(Path(bindir) / tool), *args],
                   check=True, capture_output=True, timeout=120)


def one_run(url: str, bindir: Path, opts: str, root: Path, pause: float | None,
            work: Path) -> str:
    name = "none" if pause is None else f"o{str(pause).replace('.', '_')}"
    subprocess.run([*KLAYER, "search", "init", "--study", name, "--storage", url,
                    "--heartbeat-interval", "5", "--grace-period", "20", "--param",
                    "lambda=1e-4..1e-1:log", "--trials", "16", *TRAIN],
                   cwd=work, check=True, capture_output=True)
    start = time.monotonic()
    procs = [subprocess.Popen([*KLAYER, "search", "worker", "--study", name, "--storage", url,
                               "--poll", "0.2", "--quiet"], cwd=work, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(4)]
    if pause is not None:
        time.sleep(4)
        pg(bindir, "pg_ctl", "-D", str(root / "data"), "-m", "fast", "-w", "stop")
        time.sleep(pause)
        pg(bindir, "pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
           opts, "start")
    outs = [p.communicate(timeout=900)[0] for p in procs]
    wall = time.monotonic() - start
    study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))
    ts = study.get_trials(deepcopy=False)
    n = {s: sum(t.state == s for t in ts) for s in TrialState}
    seeds = {t.user_attrs.get("seed") for t in ts if t.state == TrialState.COMPLETE}
    return (f"outage {pause} s: exit {[p.returncode for p in procs]}, wall {wall:.1f} s, "
            f"COMPLETE {n[TrialState.COMPLETE]}, FAIL {n[TrialState.FAIL]}, RUNNING "
            f"{n[TrialState.RUNNING]}, distinct seeds among COMPLETE {len(seeds)}, retry lines "
            f"{sum(o.count('storage unreachable') for o in outs)}, tracebacks "
            f"{sum('Traceback' in o for o in outs)}")


def main() -> None:
    url, bindir, opts, root = server()
    work = Path(tempfile.mkdtemp())
    try:
        for pause in (None, 0.2, 10.0, 60.0):
            print(one_run(url, bindir, opts, root, pause, work), flush=True)
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D",
                        str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
