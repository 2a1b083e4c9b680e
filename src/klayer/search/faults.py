"""Faults of a worker: heartbeats, and trials whose worker died.

On PostgreSQL a thread records each running trial's
heartbeat so that Optuna (``fail_stale_trials`` and the storage's retry callback) fails
and retries the trials of a worker that vanished (``Heartbeat``, ``fail_stale``): Optuna
beats only inside ``study.optimize``, not for the asked trials of a worker that trains
several at once. On a journal file (no heartbeat), ``recover`` does the same for the
trials of a worker known to be dead, found by their ``worker`` label (host:pid) or,
for a worker killed between asking for a trial and labelling it, by their lack of one.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from klayer.search.storage import Store, fail_trial, no_experimental_warnings


class Heartbeat:
    """Record the RDB heartbeat of running trials (by number) every interval, in a thread;
    nothing on a journal file."""

    def __init__(self, store: Store, numbers: Sequence[int]) -> None:
        rdb = store.storage
        self.rdb = rdb if isinstance(rdb, optuna.storages.RDBStorage) else None
        self.interval = self.rdb.get_heartbeat_interval() if self.rdb else None
        self.ids = [store.trial_id(n) for n in numbers] if self.interval else []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.beat()
            self._thread = threading.Thread(target=self._run, daemon=True)
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
        assert self.interval
        while not self._stop.wait(self.interval):
            self.beat()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
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

