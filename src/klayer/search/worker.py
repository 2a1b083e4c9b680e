"""A search worker: asks Optuna for trials, trains them, tells the results.

A ``Worker`` runs until its study has its budget of COMPLETE trials (a grid study: until
no point is queued or running). Trial n trains with the seed SeedSequence([base seed, n])
(a retry: its original's n); validation accuracy is the objective, test accuracy, seed,
worker (host:pid) and timings are user attributes. ``batch_trials`` T > 1 trains T trials
of one architecture together. A diverged or invalid trial fails and the worker goes on; a
stop fails the running trials and queues them again; a storage outage is ridden out.
"""

from __future__ import annotations

import hashlib
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from klayer import __version__
from klayer.core.config import TrainConfig
from klayer.data.datasets import Data
from klayer.search.backend import StorageGone, budget_lock, masked
from klayer.search.faults import (
    EXIT_STORAGE,
    STORAGE_ERRORS,
    Heartbeat,
    beat,
    fail_stale,
    recover,
    retry_trial,
    ride_out,
    unlabelled,
    worker_id,
)
from klayer.search.space import config_for, fmt_params, make_sampler, suggest
from klayer.search.storage import (
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
from klayer.training import trainer as train
from klayer.training.batched import BatchedTrainer, batch_key, evaluate_trained
from klayer.training.plan import load_data, make_plan, validate_for_data
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


@dataclass
class _Job:
    """A trial asked for, with its configuration and its parameters (Optuna values)."""

    trial: Trial
    cfg: TrainConfig
    params: dict[str, Any]


class Worker:
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
        self.grid = None if self.info.grid is None else {point_key(p) for p in self.info.grid}
        self.failures = 0

    def log(self, text: str) -> None:
        if not self.opts.quiet:
            self._log(f"[{self.id}] {text}")

    def counts(self) -> Counter[TrialState]:
        return Counter(t.state for t in self.study.get_trials(deepcopy=False))

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

    def _ask(self, k: int) -> list[_Job]:
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
                    jobs.append(_Job(trial, cfg, p))
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
            deepcopy=False, states=(TrialState.COMPLETE,))}
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

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Train the jobs (together where they share the architecture) and tell the results."""
        groups: dict[tuple[Any, ...], list[_Job]] = {}
        for job in jobs:
            groups.setdefault(batch_key(job.cfg), []).append(job)
        pending = list(jobs)
        try:
            with Heartbeat(self.beats, [j.trial.number for j in jobs], self.hb_study):
                for group in groups.values():
                    if len(group) == 1:
                        self._run_one(group[0])
                    else:
                        self._run_batch(group)
                    pending = [j for j in pending if j not in group]
        except (Stopped, Exception) as e:  # a stop or an error: no trial may stay RUNNING
            stop = e.name if isinstance(e, Stopped) else None
            reason = (f"interrupted by {stop} (worker {self.id} stopped)" if stop
                      else f"error: {type(e).__name__}: {e}")
            for job in pending:
                self._fail(job.trial, job.params, reason, count=stop is None, retry=True)
            raise

    def _run_one(self, job: _Job) -> None:
        trial = job.trial

        def report(kind: str, info: dict[str, float]) -> None:
            if kind == "eval":
                with self.stop.held(), suppress(optuna.exceptions.UpdateFinishedTrialError,
                                                   *STORAGE_ERRORS):
                    trial.report(info["val_accuracy"], int(info["step"]))

        start = time.perf_counter()
        try:
            with self.stop.armed():
                # no run folder, so no checkpoints (they change nothing in the result)
                # and no train-set curve: a trial reports only validation accuracies
                result = train.train(replace(job.cfg, checkpoint_every=0), self.data,
                                     callback=report, train_curve=False)
        except train.Diverged as e:
            self._fail(trial, job.params, f"diverged: {e}")
            return
        keep = ("val_accuracy", "test_accuracy", "train_accuracy", "val_loss", "test_loss", "steps")
        self._complete(trial, job.params, {k: result.summary[k] for k in keep} | {
            "seconds": time.perf_counter() - start, "order_seed": job.cfg.shuffle_seed})

    def _run_batch(self, group: list[_Job]) -> None:
        cfgs = [j.cfg for j in group]
        plans = [make_plan(c, len(self.data.train.y)) for c in cfgs]
        numbers = [j.trial.number for j in group]
        with self.stop.held():
            for j in group:
                j.trial.set_user_attr("batch", numbers)
                j.trial.set_user_attr("order_seed", cfgs[0].shuffle_seed)
        start = time.perf_counter()
        with self.stop.armed():
            bt = BatchedTrainer(cfgs, self.data, [p.lr for p in plans],
                                plans[0].steps_per_epoch, plans[0].total_steps,
                                order_seed=cfgs[0].shuffle_seed,
                                eval_every=plans[0].eval_every)
            nets = bt.run()
            ok = [i for i, net in enumerate(nets) if net is not None]
            done = [net for net in nets if net is not None]
            results = evaluate_trained(done, [cfgs[i] for i in ok], self.data)
        seconds = time.perf_counter() - start
        for i, job in enumerate(group):
            if i in bt.diverged:
                self._fail(job.trial, job.params, f"diverged: {bt.diverged[i]}")
                continue
            r = results[ok.index(i)]
            with self.stop.held(), suppress(optuna.exceptions.UpdateFinishedTrialError,
                                                   *STORAGE_ERRORS):
                # the learning curve, as a lone trial reports it
                for step, acc in [*bt.curves[i], (plans[i].total_steps, r["val_accuracy"])]:
                    job.trial.report(acc, step)
            self._complete(job.trial, job.params, {
                **r, "steps": plans[i].total_steps, "seconds": seconds / len(group)})

    def _complete(self, trial: Trial, params: dict[str, Any], attrs: dict[str, Any]) -> None:
        self._retrying("telling a result", lambda: self._complete_now(trial, params, attrs))

    def _complete_now(self, trial: Trial, params: dict[str, Any], attrs: dict[str, Any]) -> None:
        """Tell a finished trial COMPLETE, unless the study met its budget meanwhile (other
        workers' trials ended first): then FAIL, with its results kept as attributes."""
        with self.stop.held(), budget_lock(self.store.storage, self.opts.storage,
                                           self.opts.study):
            done = self.counts()[TrialState.COMPLETE]
            if self.grid is None and done >= self.info.n_trials:
                reason = (f"over budget: the study had its {done} COMPLETE trials when this "
                          "one ended; not counted")
                self._finish(trial, TrialState.FAIL, None, {**attrs, "fail_reason": reason})
                self.log(f"#{trial.number} {reason}")
                return
            if self._finish(trial, TrialState.COMPLETE, attrs["val_accuracy"], attrs) is not None:
                self.failures = 0
                test = f"  test {attrs['test_accuracy']:.2%}" if self.opts.show_test else ""
                self.log(f"#{trial.number} COMPLETE  val {attrs['val_accuracy']:.2%}{test}  "
                         f"{fmt_params(params)}  ({attrs['seconds']:.1f} s)")

    def _fail(self, trial: Trial, params: dict[str, Any], reason: str, count: bool = True,
              retry: bool = False) -> None:
        self._retrying("telling a failure",
                       lambda: self._fail_now(trial, params, reason, count, retry))

    def _fail_now(self, trial: Trial, params: dict[str, Any], reason: str, count: bool,
                  retry: bool) -> None:
        """Fail the trial with ``reason``; with ``retry`` (a stop or a fault, not the
        trial's own outcome) it is queued again with its parameters (and so its seed)."""
        with self.stop.held():
            failed = self._finish(trial, TrialState.FAIL, None, {"fail_reason": reason})
            if failed is not None:
                self.failures += count
                self.log(f"#{trial.number} FAIL  {reason}  {fmt_params(params)}")
                if retry:
                    retry_trial(self.study, failed, max_retry=None)
                    self.log(f"#{trial.number} is queued again with the same parameters")

    def _finish(self, trial: Trial, state: TrialState, value: float | None,
                attrs: dict[str, Any]) -> FrozenTrial | None:
        """Record attributes and tell: the finished trial; None if someone (reap) finished
        it meanwhile."""
        try:
            for key, v in attrs.items():
                trial.set_user_attr(key, v)
            try:
                return self.study.tell(trial, value, state=state)
            except RuntimeError as e:  # the grid sampler's study.stop() after the last point
                if "Study.stop" not in str(e):  # (optuna stores the result first)
                    raise
                return self.store.trial(trial.number)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            now = self.store.trial(trial.number).state
            self.log(f"#{trial.number} was marked {now.name} while it ran (reaped?); its "
                     "result is not recorded")
            return None
