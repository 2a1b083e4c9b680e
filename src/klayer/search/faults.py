"""Faults of a worker: heartbeats, and failing (and queueing again) a dead worker's trials.

On PostgreSQL a thread records the heartbeat of each running trial, since Optuna beats
only inside ``study.optimize``; Optuna's ``fail_stale_trials`` and the storage's retry
callback then fail and retry the trials of a worker that vanished. On a journal file
(no heartbeat) ``recover`` does it for a worker known to be dead, found by the trials'
``worker`` label (host:pid) or, if it died before labelling them, by their lack of one.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from klayer.search.backend import (
    MAX_RETRY,
    RETRY,
    StorageGone,
    masked,
    no_experimental_warnings,
    storage_errors,
)
from klayer.search.storage import Store
from klayer.training.stop import StopSignals


def worker_id() -> str:
    """This process as trials record it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Record the RDB heartbeat of running trials (by number) every interval, in a thread
    while the block runs; nothing on a journal file. With ``study``, each beat also
    fails (and retries) other workers' stale trials, so a dead worker's trial is found
    within the grace period and one interval, not when a trial here ends."""

    def __init__(self, store: Store, numbers: Sequence[int],
                 study: optuna.Study | None = None) -> None:
        self.study = study
        rdb = store.storage
        self.rdb = rdb if isinstance(rdb, optuna.storages.RDBStorage) else None
        self.interval = self.rdb.get_heartbeat_interval() if self.rdb else None
        self.ids = [store.trial_id(n) for n in numbers] if self.interval else []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.ids:
            self.beat()
            self._thread.start()
        return self

    def beat(self) -> None:
        for i in self.ids:
            try:
                assert self.rdb is not None
                self.rdb.record_heartbeat(i)
            except Exception as e:  # a lost connection: the next beat may work (pre-ping)
                print(f"warning: heartbeat of trial id {i} failed: {e}", file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
            if self.study is not None:
                fail_stale(self.study)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def beat(store: Store, number: int) -> None:
    """A first heartbeat at once (an RDB trial without one is never found stale)."""
    Heartbeat(store, [number]).beat()


def fail_stale(study: optuna.Study) -> None:
    """Fail (and retry) trials whose heartbeat stopped; a no-op for journal storage."""
    try:
        with no_experimental_warnings():
            optuna.storages.fail_stale_trials(study)
    except Exception as e:  # never let housekeeping stop a worker
        print(f"warning: checking for stale trials failed: {e}", file=sys.stderr)


def labelled(worker: str) -> Callable[[FrozenTrial], bool]:
    """Trials labelled as run by ``worker`` (host:pid)."""
    return lambda t: t.user_attrs.get("worker") == worker


def unlabelled(before: datetime) -> Callable[[FrozenTrial], bool]:
    """Trials without a worker label that started before ``before``: their worker died
    between asking for them and labelling them (a worker labels its trials at once)."""
    return lambda t: "worker" not in t.user_attrs and t.datetime_start is not None \
        and t.datetime_start <= before


def recover(study: optuna.Study, store: Store, lost: Callable[[FrozenTrial], bool],
            reason: str) -> list[int]:
    """Fail the RUNNING trials ``lost`` picks, queue each again; their numbers."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if lost(t) and fail_trial(study, store, t.number, reason)]


def fail_trial(study: optuna.Study, store: Store, number: int, reason: str,
               retry: bool = True) -> bool:
    """Mark another worker's RUNNING trial FAIL with a reason and (``retry``) queue a copy
    of it; False if it had finished meanwhile. (``study.tell`` would run the sampler's
    after-trial hook, which a grid sampler may end with ``study.stop()``.)"""
    trial_id = store.trial_id(number)
    try:
        store.storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        if not store.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False
    if retry:
        retry_trial(study, store.storage.get_trial(trial_id))
    return True


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int | None = MAX_RETRY
                ) -> None:
    """Enqueue a copy of a failed trial (same parameters), as Optuna's retry callback does;
    nothing once its point has been retried ``max_retry`` times (None: no limit). The copy
    drops this attempt's labels, or it would look like the dead worker's trial."""
    trial = copy.copy(trial)
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items()
                        if k not in ("worker", "fail_reason", "batch", "order_seed")}
    with no_experimental_warnings():
        RETRY(max_retry=max_retry)(study, trial)


STORAGE_ERRORS = storage_errors()
EXIT_STORAGE = 6  # a worker's exit code when the storage stays unreachable (documented)
T = TypeVar("T")


def ride_out(fn: Callable[[], T], what: str, storage: str, timeout: float, stop: StopSignals,
             who: str) -> T:
    """fn(), tried again while the storage is unreachable, after 1, 2, 4, ... (at most 30)
    s, one line each on stderr, for up to ``timeout`` seconds; then StorageGone naming the
    (masked) storage. A stop signal ends the wait at once."""
    deadline, delay = time.monotonic() + timeout, 1.0
    while True:
        try:
            return fn()
        except STORAGE_ERRORS as e:
            if time.monotonic() + delay > deadline:
                raise StorageGone(f"storage {masked(storage)} unreachable for {timeout:g} s "
                                  f"({what}): {str(e).splitlines()[0][:200]}") from None
            print(f"[{who}] storage unreachable ({what}); retrying in {delay:g} s",
                  file=sys.stderr, flush=True)
            with stop.armed():
                time.sleep(delay)
            delay = min(2 * delay, 30.0)
