"""Run N search workers on one machine: child processes, watched by this one.

``klayer search worker --jobs N`` starts N worker processes (``--jobs 1``), each with
its BLAS limited to ``--threads`` threads. This process forwards SIGINT and SIGTERM to
them; when a child dies otherwise (SIGKILL, an OOM kill, a crash) it fails the child's
RUNNING trials and queues them again at once. Workers on other machines are covered by
the heartbeat (PostgreSQL) or by ``klayer search reap``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import optuna
from threadpoolctl import threadpool_limits

from klayer.core import kernels
from klayer.data.datasets import Data
from klayer.search.faults import labelled, recover, unlabelled
from klayer.search.storage import Store, free_trials, progress, trial_seed
from klayer.search.worker import Worker, WorkerOptions
from klayer.training.stop import StopSignals

# Seconds after a worker's death before RUNNING trials with no worker label count as its.
# Longer than Optuna's 30 s grace for a journal lock a dead writer left behind: a sibling
# that asked for a trial just before the death may wait that long to label it.
ORPHAN_DELAY = 35.0
BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_workers(opts: WorkerOptions, jobs: int = 1, threads: int = 1,
                log: Callable[[str], None] | None = None, data: Data | None = None) -> int:
    """Run ``jobs`` worker processes (this one if jobs = 1) with ``threads`` BLAS threads:
    0 once the study is done, 128 + a forwarded stop signal, else a child's exit code."""
    say = log or (lambda s: print(s, flush=True))
    if jobs <= 1:
        with threadpool_limits(limits=threads), kernels.limited_threads(threads):
            return Worker(opts, log, data).run()
    first = Worker(replace(opts, quiet=True))  # checks study, configuration and data once
    study, info = first.study, first.info
    del first
    if free_trials(study, info) is None:
        say(f"study {opts.study!r} already has {progress(study, info)}; nothing to do")
        return 0
    children = [spawn_worker(opts, threads, j) for j in range(jobs)]
    say(f"started {jobs} workers (pids {', '.join(str(p.pid) for p in children)}), "
        f"{threads} BLAS thread(s) each")
    pool = _Pool(study, info.store, children, say)
    with StopSignals() as stop, stop.held():  # held: no signal leaves the children orphans
        pool.watch(stop)
    if pool.forwarded:
        return 128 + pool.forwarded
    if free_trials(study, info) is None:
        return 0
    bad = [rc for rc in pool.codes.values() if rc > 0]
    say(f"the workers stopped: study {opts.study!r} has {progress(study, info)}; "
        "run klayer search worker again")
    return bad[0] if bad else 1


def spawn_worker(opts: WorkerOptions, threads: int, j: int) -> subprocess.Popen[bytes]:
    """Worker child ``j``: ``klayer search worker --jobs 1`` in its own session."""
    argv = [sys.executable, "-m", "klayer", "search", "worker", "--study", opts.study,
            "--jobs", "1", "--threads", str(threads), "--max-failures", str(opts.max_failures),
            "--batch-trials", str(opts.batch_trials),
            "--poll", str(opts.poll), "--storage-timeout", str(opts.storage_timeout)]
    if opts.data_dir is not None:
        argv += ["--data-dir", opts.data_dir]
    if opts.sampler_seed is not None:
        argv += ["--sampler-seed", str(trial_seed(opts.sampler_seed, j))]
    if opts.quiet:
        argv.append("--quiet")
    if opts.show_test:
        argv.append("--show-test")
    # the storage goes by the environment: a PostgreSQL password stays out of `ps`
    env = {**os.environ, **dict.fromkeys(BLAS_VARS, str(threads)), "KLAYER_STORAGE": opts.storage}
    return subprocess.Popen(argv, start_new_session=True, env=env)


class _Pool:
    """The worker children of one ``run_workers``: their exit codes and deaths."""

    def __init__(self, study: optuna.Study, store: Store,
                 children: list[subprocess.Popen[bytes]], say: Callable[[str], None]) -> None:
        self.study, self.store, self.children, self.say = study, store, children, say
        self.host = socket.gethostname()
        self.forwarded = 0  # the stop signal passed on to the children, if any
        self.codes: dict[int, int] = {}  # pid -> exit code
        # (pid, signal name, time, monotonic time): orphans are looked for a bit later
        self.deaths: list[tuple[int, str, datetime, float]] = []

    def watch(self, stop: StopSignals) -> None:
        """Until every child has exited and every death has been dealt with; a stop
        signal is passed on to the running children."""
        while len(self.codes) < len(self.children) or self.deaths:
            if stop.signum and not self.forwarded:
                self.forwarded = stop.signum
                for p in self.children:
                    if p.poll() is None:
                        p.send_signal(stop.signum)
            for p in self.children:
                if p.pid in self.codes or p.poll() is None:
                    continue
                self.codes[p.pid] = rc = p.returncode
                if rc < 0 and -rc != self.forwarded:
                    self._died(p.pid, signal.Signals(-rc).name)
                elif rc > 0 and not self.forwarded:  # crashed: its trials must not hang
                    self._died(p.pid, f"exit status {rc}")
            alone = len(self.codes) == len(self.children)  # no sibling left to mistake
            for death in list(self.deaths):
                if alone or time.monotonic() - death[3] >= ORPHAN_DELAY:
                    self.deaths.remove(death)
                    self._orphans(*death[:3])
            time.sleep(0.2)

    def _died(self, pid: int, name: str) -> None:
        """Fail and queue again the trials labelled as the dead child's."""
        # it died before now: later trials are other workers', even if recover() is slow
        # (a journal lock the child held when it died takes Optuna 30 s to free)
        when = datetime.now()
        who = f"{self.host}:{pid}"
        lost = recover(self.study, self.store, labelled(who), f"worker {who} died ({name})")
        self.say(f"worker {pid} died ({name}); "
                 + (f"trial(s) {', '.join(f'#{n}' for n in lost)} failed and queued "
                    "again" if lost else "it held no trial"))
        self.deaths.append((pid, name, when, time.monotonic()))

    def _orphans(self, pid: int, name: str, when: datetime) -> None:
        """Killed between asking for a trial and labelling it: RUNNING, unlabelled."""
        lost = recover(self.study, self.store, unlabelled(before=when),
                       f"worker {self.host}:{pid} died ({name}) as it began the trial")
        if lost:
            self.say(f"trial(s) {', '.join(f'#{n}' for n in lost)} of worker {pid} failed "
                     "and queued again")
