"""How a search worker trains the trials it asked for and tells their results.

``TrialRunner`` is the part of a ``worker.Worker`` that acts on trials once asked: it
trains them (alone, or together where they share an architecture), reports their
learning curves to Optuna with the study's pruner deciding at each point, and tells each
trial COMPLETE, PRUNED or FAIL, under the budget lock and riding out storage outages.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from klayer.core.config import TrainConfig
from klayer.data.datasets import Data
from klayer.search.backend import budget_lock
from klayer.search.faults import STORAGE_ERRORS, Heartbeat, retry_trial
from klayer.search.space import fmt_params
from klayer.search.storage import DONE, Store, StudyInfo
from klayer.training import trainer as train
from klayer.training.batched import BatchedTrainer, batch_key, evaluate_trained
from klayer.training.plan import make_plan
from klayer.training.stop import Stopped, StopSignals

T = TypeVar("T")


class _Pruned(Exception):
    """The study's pruner stopped a lone trial at ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


@dataclass
class Job:
    """A trial asked for, with its configuration and its parameters (Optuna values)."""

    trial: Trial
    cfg: TrainConfig
    params: dict[str, Any]


class TrialRunner:
    """Trains asked trials and tells their results (a ``Worker`` sets the attributes)."""

    id: str
    study: optuna.Study
    hb_study: optuna.Study
    store: Store
    info: StudyInfo
    data: Data
    stop: StopSignals
    beats: Store  # heartbeats and stale checks: the heartbeat storage
    grid: set[str] | None
    failures: int
    show_test: bool

    def log(self, text: str) -> None:
        raise NotImplementedError

    def counts(self) -> Counter[TrialState]:
        return Counter(t.state for t in self.study.get_trials(deepcopy=False))

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        raise NotImplementedError

    def _run_jobs(self, jobs: list[Job]) -> None:
        """Train the jobs (together where they share the architecture) and tell the results."""
        groups: dict[tuple[Any, ...], list[Job]] = {}
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

    def _run_one(self, job: Job) -> None:
        trial, total = job.trial, make_plan(job.cfg, len(self.data.train.y)).total_steps

        def report(kind: str, info: dict[str, float]) -> None:
            if kind == "eval" and self._prune(trial, int(info["step"]), info["val_accuracy"],
                                              total):
                raise _Pruned(int(info["step"]))

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
        except _Pruned as e:
            self._tell(trial, job.params, TrialState.PRUNED, {
                "pruned_step": e.step, "steps": total, "order_seed": job.cfg.shuffle_seed,
                "seconds": time.perf_counter() - start})
            return
        keep = ("val_accuracy", "test_accuracy", "train_accuracy", "val_loss", "test_loss", "steps")
        self._tell(trial, job.params, TrialState.COMPLETE, {
            k: result.summary[k] for k in keep} | {
            "seconds": time.perf_counter() - start, "order_seed": job.cfg.shuffle_seed})

    def _prune(self, trial: Trial, step: int, accuracy: float, total: int) -> bool:
        """Report a point of the trial's curve; whether the study's pruner stops it there
        (never at its last step, when nothing is left to save; a storage fault: no)."""
        with self.stop.held(), suppress(optuna.exceptions.UpdateFinishedTrialError,
                                           *STORAGE_ERRORS):
            trial.report(accuracy, step)
            return step < total and trial.should_prune()
        return False

    def _run_batch(self, group: list[Job]) -> None:
        cfgs = [j.cfg for j in group]
        plans = [make_plan(c, len(self.data.train.y)) for c in cfgs]
        numbers = [j.trial.number for j in group]
        with self.stop.held():
            for j in group:
                j.trial.set_user_attr("batch", numbers)
                j.trial.set_user_attr("order_seed", cfgs[0].shuffle_seed)
        total = plans[0].total_steps
        start = time.perf_counter()
        with self.stop.armed():
            bt = BatchedTrainer(cfgs, self.data, [p.lr for p in plans],
                                plans[0].steps_per_epoch, total,
                                order_seed=cfgs[0].shuffle_seed, eval_every=plans[0].eval_every,
                                on_eval=lambda i, t, acc: self._prune(group[i].trial, t, acc,
                                                                      total))
            nets = bt.run()
            ok = [i for i, net in enumerate(nets) if net is not None]
            done = [net for net in nets if net is not None]
            results = evaluate_trained(done, [cfgs[i] for i in ok], self.data)
        seconds = time.perf_counter() - start
        for i, job in enumerate(group):
            if i in bt.diverged:
                self._fail(job.trial, job.params, f"diverged: {bt.diverged[i]}")
            elif i in bt.pruned:
                self._tell(job.trial, job.params, TrialState.PRUNED, {
                    "pruned_step": bt.pruned[i], "steps": total,
                    "seconds": seconds * bt.pruned[i] / total / len(group)})
            else:
                r = results[ok.index(i)]
                self._prune(job.trial, total, r["val_accuracy"], total)  # the curve's end
                self._tell(job.trial, job.params, TrialState.COMPLETE, {
                    **r, "steps": total, "seconds": seconds / len(group)})

    def _tell(self, trial: Trial, params: dict[str, Any], state: TrialState,
              attrs: dict[str, Any]) -> None:
        self._retrying("telling a result",
                       lambda: self._tell_now(trial, params, state, attrs))

    def _tell_now(self, trial: Trial, params: dict[str, Any], state: TrialState,
                  attrs: dict[str, Any]) -> None:
        """Tell a finished trial COMPLETE (or PRUNED), unless the study met its budget
        meanwhile (other workers' trials ended first): then FAIL, its results kept as
        attributes."""
        with self.stop.held(), budget_lock(self.store.storage, self.info.storage,
                                           self.info.name):
            c = self.counts()
            done = sum(c[s] for s in DONE)
            if self.grid is None and done >= self.info.n_trials:
                reason = (f"over budget: the study had its {done} trials when this one "
                          f"ended ({state.name}); not counted")
                self._finish(trial, TrialState.FAIL, None, {**attrs, "fail_reason": reason})
                self.log(f"#{trial.number} {reason}")
                return
            value = attrs["val_accuracy"] if state == TrialState.COMPLETE else None
            if self._finish(trial, state, value, attrs) is None:
                return
            self.failures = 0
            if state == TrialState.PRUNED:
                self.log(f"#{trial.number} PRUNED at step {attrs['pruned_step']}  "
                         f"{fmt_params(params)}  ({attrs['seconds']:.1f} s)")
                return
            test = f"  test {attrs['test_accuracy']:.2%}" if self.show_test else ""
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
