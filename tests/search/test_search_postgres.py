"""`klayer search` on a real PostgreSQL server: heartbeat retries and clean SIGTERM.

The fixture starts a private cluster (initdb + pg_ctl of the Debian package
``postgresql``) in a temporary folder, listening on a free loopback port; the tests are
skipped when PostgreSQL or psycopg is not installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")
psycopg = pytest.importorskip("psycopg")

from optuna.trial import TrialState  # noqa: E402

from klayer.search import storage as search_storage  # noqa: E402

TRAIN = ["--dataset", "synthetic", "--hidden", "16", "--n-batch", "50", "--n-s", "1500",
         "--cycles", "1", "--evals-per-cycle", "1", "--checkpoint-every", "0",
         "--pruner", "none"]  # ~1.5 s trials; tests/search/test_pruning.py prunes
TIMING = ["--heartbeat-interval", "1", "--grace-period", "2"]  # the study's, set at init
HEARTBEAT = [*TIMING, "--poll", "0.2"]  # a worker may repeat the study's timing


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(folder, name), os.X_OK):
            return os.path.join(folder, name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER: dict[str, Callable[[float], None]] = {}  # the running server's outage(seconds)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL server; yields a postgresql+psycopg:// URL of an empty database."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="klayer-pg-"))
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv  # noqa: E731
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as postgres
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        if shutil.which("runuser"):
            wrap = lambda argv: ["runuser", "-u", "postgres", "--", *argv]  # noqa: E731
        else:
            wrap = lambda argv: ["su", "-s", "/bin/sh", "postgres", "-c",  # noqa: E731
                                 shlex.join(argv)]
    data, port = root / "data", _free_port()

    def run(*argv: str) -> None:
        subprocess.run(wrap(list(argv)), check=True, capture_output=True, timeout=120)

    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr!r}")
    def outage(seconds: float) -> None:  # the database down for a while, then back
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        time.sleep(seconds)
        run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    SERVER["outage"] = outage
    try:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE klayer")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/klayer"
    finally:
        subprocess.run(wrap([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def klayer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "klayer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def spawn(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "klayer", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def worker(postgres: str, study: str, *extra: str, cwd: Path) -> subprocess.Popen[str]:
    """``klayer search worker`` on ``study`` with the tests' heartbeat timing."""
    return spawn("search", "worker", "--study", study, "--storage", postgres, *HEARTBEAT,
                 *extra, cwd=cwd)


def wait_for(cond: Any, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


_OPEN: dict[tuple[str, str], Any] = {}  # one storage per study polled: no connection churn


def trials_of(url: str, name: str, worker_pid: int,
              states: tuple[TrialState, ...] | None = None) -> list[Any]:
    """The trials that the worker with process id ``worker_pid`` labelled as its own."""
    if (url, name) not in _OPEN:
        _OPEN[url, name] = search_storage.load_study(name, url)[0]
    return [t for t in _OPEN[url, name].get_trials(deepcopy=False, states=states)
            if t.user_attrs.get("worker", "").endswith(f":{worker_pid}")]


def running_of(url: str, name: str, worker_pid: int) -> list[Any]:
    return trials_of(url, name, worker_pid, (TrialState.RUNNING,))


def joined(url: str, name: str, procs: list[subprocess.Popen[str]],
           timeout: float = 90.0) -> None:
    """Wait until each worker has claimed a trial; a worker that exits first, or a
    timeout, fails the test with the workers' own output."""
    waiting = list(procs)
    end = time.monotonic() + timeout
    while waiting and time.monotonic() < end and all(p.poll() is None for p in procs):
        waiting = [p for p in waiting if not trials_of(url, name, p.pid)]
        time.sleep(0.1)
    waiting = [p for p in waiting if not trials_of(url, name, p.pid)]  # after the last sleep
    if waiting:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outs = {p.pid: p.communicate(timeout=30)[0] for p in procs}
        raise AssertionError(f"workers {[p.pid for p in waiting]} claimed no trial; "
                             f"exit codes {[p.returncode for p in procs]}; output {outs}")


def test_killed_worker_trial_is_retried_and_the_study_completes(
        postgres: str, tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "kill", "--storage", postgres, *TIMING, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "5", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = worker(postgres, "kill", cwd=tmp_path)
    b = worker(postgres, "kill", cwd=tmp_path)
    # in its training loop: its first evaluation (step 0) is reported, the last write before
    wait_for(lambda: [t for t in running_of(postgres, "kill", a.pid) if 0 in t.intermediate_values])
    a.kill()  # SIGKILL mid-trial: no chance to clean up
    a.wait(timeout=30)
    out, _ = b.communicate(timeout=120)
    assert b.returncode == 0, out
    study, _ = search_storage.load_study("kill", postgres)
    ts = study.get_trials(deepcopy=False)
    failed = [t for t in ts if t.state == TrialState.FAIL]  # by the heartbeat check
    assert len(failed) == 1 and failed[0].user_attrs["worker"].endswith(f":{a.pid}"), out
    dead = failed[0]
    retries = [t for t in ts if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, out
    assert retries[0].params == dead.params
    assert retries[0].user_attrs["seed"] == search_storage.trial_seed(0, dead.number)
    assert sum(t.state == TrialState.COMPLETE for t in ts) >= 5
    assert not [t for t in ts if t.state == TrialState.RUNNING]


def test_sigterm_marks_the_trial_failed_not_running(postgres: str, tmp_path: Path) -> None:
    long = [a if a != "1500" else "200000" for a in TRAIN]
    r = klayer("search", "init", "--study", "term", "--storage", postgres, *TIMING, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "3", *long, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w = worker(postgres, "term", cwd=tmp_path)
    wait_for(lambda: running_of(postgres, "term", w.pid))
    w.send_signal(signal.SIGTERM)
    out, _ = w.communicate(timeout=60)
    assert w.returncode == 143, out
    study, _ = search_storage.load_study("term", postgres)
    ts = study.get_trials(deepcopy=False)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.WAITING], out
    assert "SIGTERM" in ts[0].user_attrs["fail_reason"]
    assert ts[1].params == ts[0].params and ts[1].system_attrs["failed_trial"] == 0  # retried


def test_grid_points_each_run_once_by_concurrent_workers(postgres: str, tmp_path: Path) -> None:
    quick = [a if a != "1500" else "20" for a in TRAIN]
    r = klayer("search", "init", "--study", "grid", "--storage", postgres, *TIMING,
               "--sampler", "grid", "--param", "lambda=0.01..0.08:points=8", *quick, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    procs = [worker(postgres, "grid", *extra, cwd=tmp_path)
             for extra in ([], [], ["--batch-trials", "2"])]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    study, _ = search_storage.load_study("grid", postgres)
    ts = study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE for t in ts), outs
    assert sorted(t.params["lambda"] for t in ts) == pytest.approx(
        [0.01 * i for i in range(1, 9)], rel=1e-12), outs  # each point once, no other


def test_the_fault_timing_belongs_to_the_study(postgres: str, tmp_path: Path) -> None:
    """A worker with a shorter grace period would fail other workers' healthy trials."""
    r = klayer("search", "init", "--study", "timing", "--storage", postgres, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "1", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = klayer("search", "worker", "--study", "timing", "--storage", postgres,
               "--grace-period", "3", cwd=tmp_path)
    assert r.returncode == 2 and "--grace-period 3: study 'timing' uses 300 s" in r.stderr
    _, info = search_storage.load_study("timing", postgres)
    assert (info.heartbeat_interval, info.grace_period) == (60, 300)


def test_the_budget_holds_when_two_workers_finish_at_once(postgres: str, tmp_path: Path) -> None:
    """The advisory lock: the second of two trials asked for the last place is not counted."""
    from klayer.search.worker import Worker, WorkerOptions

    quick = [a if a != "1500" else "20" for a in TRAIN]
    r = klayer("search", "init", "--study", "budget", "--storage", postgres, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "1", *quick, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    opts = WorkerOptions(study="budget", storage=postgres, quiet=True)
    a, b = Worker(opts), Worker(opts)
    jobs_a, jobs_b = a._ask(1), b._ask(1)
    a._run_jobs(jobs_a)
    b._run_jobs(jobs_b)
    study, _ = search_storage.load_study("budget", postgres)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 1 and states.count(TrialState.FAIL) == 1


def test_a_dead_workers_trial_is_found_while_the_others_still_train(
        postgres: str, tmp_path: Path) -> None:
    """Stale trials are looked for on the heartbeat's timer, not when a trial ends."""
    long = [a if a != "1500" else "200000" for a in TRAIN]  # trials of minutes
    r = klayer("search", "init", "--study", "timer", "--storage", postgres, *TIMING, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "2", *long, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = worker(postgres, "timer", cwd=tmp_path)
    b = worker(postgres, "timer", cwd=tmp_path)
    try:
        for w in (a, b):
            wait_for(lambda w=w: [t for t in running_of(postgres, "timer", w.pid)
                                  if 0 in t.intermediate_values])
        a.kill()
        a.wait(timeout=30)
        start = time.monotonic()

        def failed() -> list[Any]:
            study, _ = search_storage.load_study("timer", postgres)
            return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    if t.user_attrs.get("worker", "").endswith(f":{a.pid}")]

        wait_for(failed, timeout=20)
        assert time.monotonic() - start < 2 + 1 + 5  # grace + one interval + slack
        assert running_of(postgres, "timer", b.pid), "b still trains its own trial"
        r = klayer("search", "status", "--study", "timer", "--storage", postgres, cwd=tmp_path)
        assert "no heartbeat: its worker died or hung" in r.stdout, r.stdout
    finally:
        for w in (a, b):
            if w.poll() is None:
                w.terminate()
                w.wait(timeout=60)


def test_a_postgres_worker_uses_optunas_heartbeat_without_its_warning(
        postgres: str, tmp_path: Path) -> None:
    """The heartbeat is Optuna's, recorded for the worker's trials; asking and telling go
    through a storage without it, so Optuna's 'supposed to be used with Study.optimize'
    warning has no cause (it is not filtered)."""
    quick = [a if a != "1500" else "20" for a in TRAIN]
    r = klayer("search", "init", "--study", "quiet", "--storage", postgres, *TIMING, "--param",
               "lambda=1e-4..1e-1:log", "--trials", "2", *quick, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = klayer("search", "worker", "--study", "quiet", "--storage", postgres, "--poll", "0.2",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "supposed to be used with" not in r.stdout + r.stderr
    study, _ = search_storage.load_study("quiet", postgres)
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) == 2


def test_workers_ride_out_a_database_restart(postgres: str, tmp_path: Path) -> None:
    """Two workers keep going through a 3 s outage; the study reaches its budget, every
    trial once, and each worker says once a step that it waits (no traceback)."""
    r = klayer("search", "init", "--study", "outage", "--storage", postgres, *TIMING,
               "--param", "lambda=1e-4..1e-1:log", "--trials", "8", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    procs = [worker(postgres, "outage", cwd=tmp_path) for _ in range(2)]
    joined(postgres, "outage", procs)  # both workers train before the outage
    SERVER["outage"](3.0)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("storage unreachable" in o for o in outs) and not any(
        "Traceback" in o for o in outs), outs
    study, _ = search_storage.load_study("outage", postgres)
    ts = study.get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 8
    assert not [t for t in ts if t.state == TrialState.RUNNING]


def test_a_worker_gives_up_after_its_storage_timeout(postgres: str, tmp_path: Path) -> None:
    r = klayer("search", "init", "--study", "gone", "--storage", postgres, *TIMING,
               "--param", "lambda=1e-4..1e-1:log", "--trials", "50", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w = worker(postgres, "gone", "--storage-timeout", "3", cwd=tmp_path)
    wait_for(lambda: running_of(postgres, "gone", w.pid))
    SERVER["outage"](10.0)
    out, _ = w.communicate(timeout=120)
    assert w.returncode == 6, out
    assert "unreachable for 3 s" in out and "Traceback" not in out, out


def test_an_init_cut_short_is_made_again_and_can_be_deleted(postgres: str,
                                                            tmp_path: Path) -> None:
    import optuna

    half = optuna.create_study(study_name="half", storage=postgres)  # init killed here
    half.set_user_attr("sampler", "random")
    init = ("search", "init", "--study", "half", "--storage", postgres, *TIMING, "--param",
            "lambda=1e-4..1e-1:log", "--trials", "2", *TRAIN)
    r = klayer(*init, cwd=tmp_path)
    assert r.returncode == 0 and "created study half" in r.stdout, r.stderr
    assert klayer(*init, cwd=tmp_path).returncode == 2  # a finished study stays
    r = klayer("search", "delete", "--study", "half", "--storage", postgres, "--yes",
               cwd=tmp_path)
    assert r.returncode == 0 and "deleted study half" in r.stdout, r.stderr
    r = klayer("search", "status", "--study", "half", "--storage", postgres, cwd=tmp_path)
    assert r.returncode == 2 and "no study 'half'" in r.stderr
