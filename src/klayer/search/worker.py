"""A search worker: asks Optuna for trials, trains them, tells the results.

A ``Worker`` runs until its study has its budget of COMPLETE or PRUNED trials (a grid study: until
no point is queued or running). Trial n trains with the seed SeedSequence([base seed, n])
(a retry: its original's n); validation accuracy is the objective, test accuracy, seed,
worker (host:pid) and timings are user attributes. ``batch_trials`` T > 1 trains T trials
of one architecture together. The study's pruner (``pruning``) may stop a trial at any
evaluation: it ends PRUNED, its learning curve kept, and counts toward the budget. A
diverged or invalid trial fails and the worker goes on; a stop fails the running trials
and queues them again; a storage outage is ridden out.
"""

from __future__ import annotations

import hashlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import numpy as np
import optuna
from optuna.trial import Trial, TrialState

from klayer import __version__
from klayer.data.datasets import Data
from klayer.search.backend import StorageGone, masked
from klayer.search.faults import (
    EXIT_STORAGE,
    beat,
    fail_stale,
    recover,
    ride_out,
    unlabelled,
    worker_id,
)
from klayer.search.pruning import make_pruner
from klayer.search.space import config_for, make_sampler, suggest
from klayer.search.storage import (
    DONE,
    check_data,
    claim_queued,
    free_trials,
    open_for_worker,
    point_key,
    progress,
    queued_params,
    seed_of,
    worker_config,
)
from klayer.search.trials import Job, TrialRunner
from klayer.training.plan import load_data, validate_for_data
from klayer.training.stop import Stopped, StopSignals

# Parameters trials trained together may differ in (batched.BATCHABLE by TOML key).
BATCHABLE_PARAMS = ("lambda", "eta_min", "eta_max", "eta", "decay")
T = TypeVar("T")


@dataclass
class WorkerOptions:
    """What a worker joins and how it works (``klayer search worker``'s flags)."""

    study: str
    storage: str
    batch_trials: int = 1
    sampler_seed: int | None = None
    data_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # this worker's explicit settings
    heartbeat_interval: int | None = None  # None: the study's (a different value is refused)
    grace_period: int | None = None
    poll: float = 5.0  # seconds between looks at the study while others finish
    max_failures: int = 10  # consecutive failed trials before the worker gives up
    storage_timeout: float = 600.0  # seconds of storage outage ridden out before EXIT_STORAGE
    quiet: bool = False
    show_test: bool = False  # print each trial's test accuracy too


class Worker(TrialRunner):
    """One worker process: asks, trains and tells until the study has its budget."""

    def __init__(self, opts: WorkerOptions, log: Callable[[str], None] | None = None,
                 data: Data | None = None) -> None:
        self.opts = opts
        self.id = worker_id()
        self._log = log or (lambda s: print(s, flush=True))
        self.stop = StopSignals()
        self.hb_study, self.study, self.info, self.store = open_for_worker(
            opts.study, opts.storage, opts.heartbeat_interval, opts.grace_period)
        self.beats = self.info.store  # heartbeats and stale checks: the heartbeat storage
        self.base = worker_config(self.info, opts.overrides, opts.data_dir)
        self.data = data if data is not None else load_data(self.base)
        check_data(self.info, self.data)
        if self.info.version != __version__:
            self.log(f"warning: study made with klayer {self.info.version}, this is "
                     f"{__version__}")
        seed = opts.sampler_seed
        if seed is None:  # never the same in two workers: host, pid and time
            seed = int(np.random.SeedSequence([
                int.from_bytes(hashlib.sha256(self.id.encode()).digest()[:8], "little"),
                time.time_ns()]).generate_state(1)[0])
        # the study was loaded with Optuna's default sampler
        self.study.sampler = make_sampler(self.info.sampler, self.info.space, seed)
        self.study.pruner = make_pruner(self.info.pruner)
        self.grid = None if self.info.grid is None else {point_key(p) for p in self.info.grid}
        self.failures = 0
        self.show_test = opts.show_test

    def log(self, text: str) -> None:
        if not self.opts.quiet:
            self._log(f"[{self.id}] {text}")

    def run(self) -> int:
        """Work until the budget is met; 0, 128 + the signal that stopped it, or
        EXIT_STORAGE when the storage stayed unreachable past --storage-timeout."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with self.stop:
            try:
                return self._loop()
            except StorageGone as e:
                print(f"[{self.id}] {e}", file=sys.stderr, flush=True)
                return EXIT_STORAGE

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        return ride_out(fn, what, self.opts.storage, self.opts.storage_timeout, self.stop,
                        self.id)

    def _loop(self) -> int:
        n = self.info.n_trials
        c = self._retrying("counting trials", self.counts)
        self.log(f"joined study {self.opts.study!r} ({masked(self.opts.storage)}): "
                 f"{c[TrialState.COMPLETE]}/{n} COMPLETE, {c[TrialState.RUNNING]} RUNNING")
        waiting_said = False
        while not self.stop.signum:
            with self.stop.held():
                self._retrying("looking for dead workers' trials", self._housekeep)
            free = self._retrying("counting trials", lambda: free_trials(self.study, self.info))
            if free is None:
                break
            if free == 0:
                if not waiting_said:
                    c = self._retrying("counting trials", self.counts)
                    self.log(f"{c[TrialState.COMPLETE]}/{n} COMPLETE; waiting for "
                             f"{c[TrialState.RUNNING]} running trial(s) of other workers "
                             "(klayer search reap frees abandoned ones)")
                    waiting_said = True
                if not self._sleep():
                    break
                continue
            waiting_said = False
            try:
                jobs = self._retrying("asking for a trial",
                                      partial(self._ask, min(self.opts.batch_trials, free)))
                self._run_jobs(jobs)
            except Stopped:
                break
            if self.failures >= self.opts.max_failures:
                self.log(f"stopping: {self.failures} trials in a row failed")
                return 1
        return self._stopped()

    def _housekeep(self) -> None:
        """Fail and queue again the trials of workers that died (heartbeat or no label)."""
        fail_stale(self.hb_study)
        lost = recover(self.study, self.store, unlabelled(before=datetime.now() - timedelta(
            seconds=self.info.grace_period)), "its worker died as it began the trial")
        if lost:
            self.log(f"unlabelled trial(s) {', '.join(f'#{n}' for n in lost)} older than "
                     f"{self.info.grace_period} s failed and queued again")

    def _sleep(self) -> bool:
        """Wait one poll interval; False if a stop signal came meanwhile."""
        try:
            with self.stop.armed():
                time.sleep(self.opts.poll)
        except Stopped:
            return False
        return True

    def _stopped(self) -> int:
        """The exit code once the loop ended: 128 + a stop signal, else 0 (budget met)."""
        if self.stop.signum:
            self.log(f"stopped by {signal.Signals(self.stop.signum).name}")
            return 128 + self.stop.signum
        how = ": " if self.grid is not None else " has "
        done = self._retrying("counting trials", lambda: progress(self.study, self.info))
        self.log(f"done: study {self.opts.study!r}{how}{done}")
        return 0

    def _ask(self, k: int) -> list[Job]:
        """Up to k trials, labelled with this worker and their seeds, as jobs."""
        with self.stop.held():
            asked = self._claim_grid(k) if self.grid is not None else self._ask_sampled(k)
            jobs = []
            for trial, p in asked:
                seed = seed_of(self.store.trial(trial.number), self.info.config.seed)
                trial.set_user_attr("worker", self.id)
                trial.set_user_attr("seed", seed)
                try:
                    cfg = config_for(self.base, p, seed)
                    validate_for_data(cfg, self.data)  # e.g. a batch larger than the data
                    jobs.append(Job(trial, cfg, p))
                except (ValueError, TypeError) as e:
                    self._fail(trial, p, f"invalid configuration: {e}")
            return jobs

    def _ask_sampled(self, k: int) -> list[tuple[Trial, dict[str, Any]]]:
        """k trials from the sampler (or the queue of retries); after the first, the
        non-batchable parameters are fixed to its values."""
        sampler, out = self.study.sampler, []
        try:
            for _ in range(k):
                trial = self.study.ask()
                beat(self.beats, trial.number)
                out.append((trial, suggest(trial, self.info.space)))
                fixed = {key: v for key, v in out[0][1].items() if key not in BATCHABLE_PARAMS}
                if len(out) == 1 and k > 1 and fixed:
                    self.study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
        finally:
            self.study.sampler = sampler
        return out

    def _claim_grid(self, k: int) -> list[tuple[Trial, dict[str, Any]]]:
        """Up to k queued grid points (after the first, only points that share its
        non-batchable parameters); none is sampled, so none repeats or leaves the grid."""
        assert self.grid is not None
        done = {point_key(queued_params(t)) for t in self.study.get_trials(
            deepcopy=False, states=DONE)}
        out: list[tuple[Trial, dict[str, Any]]] = []
        fixed: dict[str, Any] | None = None
        while len(out) < k:
            trial = claim_queued(self.study, self.store, fixed)
            if trial is None:
                break
            beat(self.beats, trial.number)
            point = queued_params(self.store.trial(trial.number))
            problem = ("not a point of the study's grid" if point_key(point) not in self.grid
                       else "its grid point is done already" if point_key(point) in done
                       else None)
            if problem is not None:  # queued by hand: never trained
                self._fail(trial, point, problem, count=False)
                continue
            out.append((trial, suggest(trial, self.info.space)))  # the queued values
            fixed = fixed or {key: v for key, v in point.items() if key not in BATCHABLE_PARAMS}
        return out
