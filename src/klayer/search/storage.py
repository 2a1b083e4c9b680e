"""Studies in Optuna storages: where they live, their stored set-up, and who may join.

A study lives in a journal file (``runs/search/<study>/journal.log``, no server) or in
a PostgreSQL database that many machines share (pre-ping, heartbeat, retries).
``create_study`` records as study user attributes all a worker needs (base configuration,
space, sampler, budget, data fingerprint, klayer version and, last, the study format);
``load_study`` reads them back; ``worker_config`` and ``check_data`` refuse a worker whose
configuration or data differ. A grid study queues every point at creation and its
workers only claim queued trials (``claim_queued``): the storage's WAITING -> RUNNING
update succeeds for one caller only, so each point runs once across machines.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from klayer import __version__
from klayer.core.config import TrainConfig
from klayer.data import datasets
from klayer.data.datasets import Data
from klayer.search.backend import GRACE_PERIOD, HEARTBEAT_INTERVAL, is_url, masked, open_storage
from klayer.search.pruning import PrunerSettings
from klayer.search.space import SearchError, Space, fmt_params, grid_points

SAMPLERS = ("random", "tpe", "grid")
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Keys a worker may set for itself: where its copy of the data lives (and checkpointing,
# which search trainings do not do).
LOCAL_KEYS = ("data_dir", "strict_checksums", "checkpoint_every")

# Study user attributes.
A_CONFIG, A_SPACE, A_SAMPLER, A_TRIALS = "config", "space", "sampler", "n_trials"
A_DATA, A_VERSION, A_PARENT, A_CREATED = "data_fingerprint", "klayer_version", "parent", "created"
A_GRID = "grid"  # the grid sampler's points, each queued once at creation
# the study's fault timing, the same for every worker (seconds)
A_HEARTBEAT, A_GRACE = "heartbeat_interval", "grace_period"
A_PRUNER = "pruner"  # pruning.PrunerSettings, the same for every worker
# The states that use up the budget: a pruned trial was sampled and got its answer.
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
A_FORMAT, FORMAT = "klayer_format", 1  # the study format this klayer reads (set last)


def study_dir(study: str, runs_dir: str | Path = "runs") -> Path:
    """The study's run folder: runs/search/<study>."""
    return Path(runs_dir) / "search" / study


def resolve_storage(study: str, storage: str | None = None, runs_dir: str | Path = "runs") -> str:
    """``storage``, else $KLAYER_STORAGE, else the journal file in the study's run folder."""
    spec = storage or os.environ.get("KLAYER_STORAGE")
    return spec if spec else str(study_dir(study, runs_dir) / "journal.log")


def seed_of(trial: FrozenTrial, base_seed: int) -> int:
    """A trial's training seed: ``trial_seed`` of its number, or of the number of the trial
    it retries (a retry trains as its original did)."""
    return trial_seed(base_seed, int(trial.system_attrs.get("failed_trial", trial.number)))


def trial_seed(base_seed: int, number: int) -> int:
    """The training seed of trial ``number``: SeedSequence([base_seed, number])."""
    return int(np.random.SeedSequence([base_seed, number]).generate_state(1)[0])


def retrain_seeds(seed: int, n: int) -> list[int]:
    """The seeds of n retrainings: the trial's own, then SeedSequence([seed, i]), i = 1..n-1."""
    return [seed] + [trial_seed(seed, i) for i in range(1, n)]


def data_fingerprint(data: Data) -> str:
    """The data's fingerprint, as checkpoints record it: ``datasets.data_fingerprint``."""
    return datasets.data_fingerprint(data)


@dataclass(frozen=True)
class Store:
    """The storage klayer opened for a study, for what ``optuna.Study`` has no method for
    (claim a queued trial, fail another worker's, heartbeats), by public ``BaseStorage``
    methods; a trial's id (private in Optuna's trial objects) is found by its number."""

    storage: optuna.storages.BaseStorage
    study_id: int

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def trial(self, number: int) -> FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))


@dataclass
class StudyInfo:
    """A study's stored set-up (its user attributes)."""

    name: str
    storage: str
    config: TrainConfig
    space: Space
    sampler: str
    n_trials: int
    fingerprint: str
    version: str
    store: Store = field(repr=False)
    parent: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict, repr=False)
    grid: list[dict[str, Any]] | None = None  # a grid study's points (None: not queued)
    heartbeat_interval: int = HEARTBEAT_INTERVAL  # seconds between a trial's heartbeats
    grace_period: int = GRACE_PERIOD  # seconds without one before a trial is failed
    pruner: PrunerSettings = field(default_factory=PrunerSettings)


def load_study(name: str, storage: str, sampler: optuna.samplers.BaseSampler | None = None,
               heartbeat_interval: int | None = None,
               grace_period: int | None = None) -> tuple[optuna.Study, StudyInfo]:
    """Open an existing klayer study; SearchError if there is none by that name, if it is
    not of this klayer's study format, or if a worker's ``heartbeat_interval`` /
    ``grace_period`` (None: the study's) disagree with the study's, set at init: with
    another grace period a worker would fail other workers' healthy trials."""
    if not is_url(storage) and not Path(storage).exists():
        raise SearchError(f"no study {name!r}: {storage} does not exist; create it with "
                          f"klayer search init --study {name} ...")
    st = open_storage(storage)
    try:
        study = optuna.load_study(study_name=name, storage=st, sampler=sampler)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(st)]
        raise SearchError(f"no study {name!r} in {masked(storage)} (studies there: "
                          f"{', '.join(known) or 'none'}); create it with klayer search "
                          f"init --study {name} ...") from None
    attrs = study.user_attrs
    found = attrs.get(A_FORMAT)
    if found != FORMAT:  # set last: a study of this format has every attribute below
        what = (f"study format {found!r}" if found is not None else "no study format (made "
                "by an earlier klayer, or not by klayer search init, or still being created)")
        raise SearchError(f"study {name!r} has {what}; this klayer reads study format "
                          f"{FORMAT} only: create the study again with klayer search init")
    info = _study_info(name, storage, st, attrs)
    for flag, mine, its in (("--heartbeat-interval", heartbeat_interval,
                             info.heartbeat_interval),
                            ("--grace-period", grace_period, info.grace_period)):
        if mine is not None and mine != its:
            raise SearchError(f"{flag} {mine}: study {name!r} uses {its} s (set by search "
                              "init, the same for every worker); leave the flag out")
    if is_url(storage) and (info.heartbeat_interval, info.grace_period) != (
            HEARTBEAT_INTERVAL, GRACE_PERIOD):  # the storage's heartbeat is the study's
        st = open_storage(storage, info.heartbeat_interval, info.grace_period)
        study = optuna.load_study(study_name=name, storage=st, sampler=sampler)
        info = _study_info(name, storage, st, attrs)
    return study, info


def open_for_worker(name: str, storage: str, heartbeat_interval: int | None,
                    grace_period: int | None) -> tuple[optuna.Study, optuna.Study, StudyInfo,
                                                       Store]:
    """(the study through its heartbeat storage, for heartbeats and stale checks; the
    study to ask and tell through, on a database one without the heartbeat, which Optuna
    means for ``Study.optimize``; its info; that study's Store)."""
    hb_study, info = load_study(name, storage, heartbeat_interval=heartbeat_interval,
                                grace_period=grace_period)
    if not is_url(storage):
        return hb_study, hb_study, info, info.store
    plain = open_storage(storage, heartbeat_interval=None)
    return (hb_study, optuna.load_study(study_name=name, storage=plain), info,
            Store(plain, info.store.study_id))


def _study_info(name: str, storage: str, st: optuna.storages.BaseStorage,
                attrs: dict[str, Any]) -> StudyInfo:
    return StudyInfo(name, storage, TrainConfig.from_dict(attrs[A_CONFIG]), attrs[A_SPACE],
                     attrs[A_SAMPLER], int(attrs[A_TRIALS]), attrs[A_DATA], attrs[A_VERSION],
                     Store(st, st.get_study_id_from_name(name)), attrs.get(A_PARENT), attrs,
                     attrs.get(A_GRID), int(attrs.get(A_HEARTBEAT, HEARTBEAT_INTERVAL)),
                     int(attrs.get(A_GRACE, GRACE_PERIOD)),
                     PrunerSettings.from_attr(attrs.get(A_PRUNER)))


def create_study(name: str, storage: str, config: TrainConfig, data: Data, space: Space,
                 n_trials: int = 16, sampler: str = "random",
                 parent: dict[str, Any] | None = None,
                 heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD,
                 pruner: PrunerSettings | None = None,
                 points: list[dict[str, Any]] | None = None) -> StudyInfo:
    """Create the study once, with its set-up as user attributes; SearchError if it exists.

    A grid study runs each point of its grid once, whatever ``n_trials`` says: every
    point is queued here, and its budget is the number of points. ``points`` (drawn by
    the caller, e.g. an experiment's seeded random draws) are queued and run the same
    way, whatever the number of workers. The format attribute
    comes last, once the study is complete: ``load_study`` refuses a study without it.
    """
    if not STUDY_NAME.match(name):
        raise SearchError(f"--study {name!r}: use letters, digits, '_', '.', '-' (max 100)")
    if sampler not in SAMPLERS:
        raise SearchError(f"--sampler {sampler!r}: valid: {', '.join(SAMPLERS)}")
    if n_trials < 1:
        raise SearchError(f"--trials must be >= 1, got {n_trials}")
    if not 0 < heartbeat_interval < grace_period:
        raise SearchError(f"--grace-period ({grace_period}) must exceed --heartbeat-interval "
                          f"({heartbeat_interval}), which must be >= 1")
    if points is None and sampler == "grid":
        points = grid_points(space)
    if points is not None:
        n_trials = len(points)
    st = open_storage(storage)
    try:
        study = optuna.create_study(study_name=name, storage=st, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        if not _half_made(name, st):
            raise SearchError(f"study {name!r} already exists in {masked(storage)}; pick "
                              "another name (workers join it with klayer search worker)") from None
        optuna.delete_study(study_name=name, storage=st)  # an init cut short: made again
        study = optuna.create_study(study_name=name, storage=st, direction="maximize")
    attrs: dict[str, Any] = {
        A_CONFIG: config.to_dict(), A_SPACE: space, A_SAMPLER: sampler, A_TRIALS: n_trials,
        A_DATA: data_fingerprint(data), A_VERSION: __version__,
        A_CREATED: datetime.now().isoformat(timespec="seconds"), A_PARENT: parent,
        A_GRID: points, A_HEARTBEAT: heartbeat_interval, A_GRACE: grace_period,
        A_PRUNER: (pruner or PrunerSettings()).to_attr()}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for point in points or ():
        study.enqueue_trial(point)
    attrs[A_FORMAT] = FORMAT  # last: no worker joins before every point is queued
    study.set_user_attr(A_FORMAT, FORMAT)
    return _study_info(name, storage, st, attrs)


def _half_made(name: str, st: optuna.storages.BaseStorage) -> bool:
    """A study that ``create_study`` began and never finished (killed between its steps):
    no format attribute yet, and no trial ever ran (only queued grid points, if any)."""
    study = optuna.load_study(study_name=name, storage=st)
    return A_FORMAT not in study.user_attrs and all(
        t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))


def delete_study(name: str, storage: str) -> int:
    """Delete a study and its trials (Optuna's ``delete_study``); the trials it had."""
    if not is_url(storage) and not Path(storage).exists():
        raise SearchError(f"no study {name!r}: {storage} does not exist")
    st = open_storage(storage)
    try:
        n = len(optuna.load_study(study_name=name, storage=st).get_trials(deepcopy=False))
        optuna.delete_study(study_name=name, storage=st)
    except KeyError:
        raise SearchError(f"no study {name!r} in {masked(storage)}") from None
    return n


def point_key(params: dict[str, Any]) -> str:
    """A grid point as a key: its parameters as sorted JSON (as the storage keeps them)."""
    return json.dumps(params, sort_keys=True)


def queued_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters a trial was queued with (its grid point, copied by retries), else
    those it has (a point is known before its trial suggests anything)."""
    return dict(trial.system_attrs.get("fixed_params") or trial.params)


def claim_queued(study: optuna.Study, store: Store,
                 fixed: dict[str, Any] | None = None) -> Trial | None:
    """A queued (WAITING) trial whose point has the ``fixed`` values, now RUNNING for this
    worker; None when there is none. This is ``study.ask`` by hand, as ``ask`` would sample
    a new trial when none is queued and cannot pick among the queued ones: the storage's
    WAITING -> RUNNING update (one caller only: journal lock, row lock), then Optuna's
    public ``Trial(study, trial_id)``."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if any(queued_params(t).get(k) != v for k, v in (fixed or {}).items()):
            continue
        trial_id = store.trial_id(t.number)
        try:
            if store.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # claimed and finished by another worker since we looked
    return None


# a grid point's state: that of its first trial in this order ("missing" without one)
GRID_STATES = {TrialState.COMPLETE: "done", TrialState.PRUNED: "pruned",
               TrialState.RUNNING: "running",
               TrialState.WAITING: "waiting", TrialState.FAIL: "failed"}


def grid_progress(points: list[dict[str, Any]], trials: list[FrozenTrial]
                  ) -> list[tuple[dict[str, Any], str, list[FrozenTrial]]]:
    """Each grid point, its state and its trials: done (a COMPLETE trial), else pruned,
    else running,
    else waiting (queued), else failed; "missing" if no trial has its parameters."""
    mine: dict[str, list[FrozenTrial]] = {point_key(p): [] for p in points}
    for t in trials:
        mine.setdefault(point_key(queued_params(t)), []).append(t)
    out = []
    for p in points:
        ts = mine[point_key(p)]
        states = {t.state for t in ts}
        out.append((p, next((v for s, v in GRID_STATES.items() if s in states), "missing"), ts))
    return out


def free_trials(study: optuna.Study, info: StudyInfo) -> int | None:
    """Trials a worker may start now; 0 while it waits for others' running trials, None once
    the study is done. A grid study runs its queued points and is done when none is queued
    or running; any other asks for what its budget lacks beyond the running trials."""
    c = Counter(t.state for t in study.get_trials(deepcopy=False))
    running = c[TrialState.RUNNING]
    if info.grid is not None:
        return c[TrialState.WAITING] or (0 if running else None)
    left = info.n_trials - sum(c[s] for s in DONE)
    return None if left <= 0 else max(left - running, 0)


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k COMPLETE trials with the highest validation accuracy, best first."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (-(t.value or 0.0), t.number))[:k]


def worker_config(info: StudyInfo, overrides: dict[str, Any], data_dir: str | None
                  ) -> TrainConfig:
    """The study's configuration with a worker's local settings (``LOCAL_KEYS``, and
    ``data_dir``); SearchError if its other ``overrides`` differ from the study's."""
    base = info.config.to_dict()
    try:
        mine = TrainConfig.from_dict({**base, **overrides}).to_dict()
    except (ValueError, TypeError) as e:
        raise SearchError(str(e)) from None
    differ = [k for k in base if k not in LOCAL_KEYS and mine[k] != base[k]]
    if differ:
        detail = ", ".join(f"{k} = {json.dumps(mine[k])} here, {json.dumps(base[k])} in the "
                           "study" for k in differ)
        raise SearchError(f"refusing to join study {info.name!r}: this worker's configuration "
                          f"differs ({detail}). Workers train the study's configuration; "
                          f"leave those settings out (only {', '.join(LOCAL_KEYS)} may differ)")
    local = {k: v for k, v in overrides.items() if k in LOCAL_KEYS}
    if data_dir is not None:
        local["data_dir"] = data_dir
    return replace(info.config, **local)


def check_data(info: StudyInfo, data: Data) -> None:
    """SearchError unless ``data`` are the study's (by their fingerprint)."""
    fingerprint = data_fingerprint(data)
    if fingerprint != info.fingerprint:
        raise SearchError(f"refusing to join study {info.name!r}: this worker's data "
                          f"({fingerprint[:19]}...) differ from the study's "
                          f"({info.fingerprint[:19]}...); check --data-dir / --dataset and that "
                          "every machine has the same copy of the data")


def progress(study: optuna.Study, info: StudyInfo) -> str:
    """'5/8 trials done (3 COMPLETE, 2 PRUNED)', or a grid study's points done and those
    not done (failed, not queued, ...)."""
    trials = study.get_trials(deepcopy=False)
    if info.grid is None:
        c = Counter(t.state for t in trials)
        return (f"{sum(c[s] for s in DONE)}/{info.n_trials} trials done "
                f"({c[TrialState.COMPLETE]} COMPLETE, {c[TrialState.PRUNED]} PRUNED)")
    points = grid_progress(info.grid, trials)
    left = [f"{fmt_params(p)} ({state})" for p, state, _ in points
            if state not in ("done", "pruned")]
    return (f"{len(points) - len(left)}/{len(points)} grid points done"
            + (f"; not done: {', '.join(left)}" if left else ""))
