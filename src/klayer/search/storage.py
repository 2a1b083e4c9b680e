"""Studies in Optuna storages: where they live, their stored set-up, and who may join.

A study is stored in a journal file in its run folder (``runs/search/<study>/
journal.log``, no server) or in a PostgreSQL database that many machines share (with
connection pre-ping, a heartbeat and retries of trials whose worker died).
``create_study`` makes it once and records, as study user attributes, everything a
worker needs: the base training configuration, the search space, the sampler, the
trial budget, a fingerprint of the data, the klayer version and, last, the study
format; ``load_study`` reads them back and refuses another format, ``check_compatible``
a worker whose configuration or data differ. Also here: the per-trial seed rule and the
trial operations the fault handling builds on (fail a RUNNING trial, queue a copy of it
again), through the storage object klayer opened (``Store``) where ``optuna.Study`` lacks one.

A grid study queues every grid point at creation (``enqueue_trial``); workers only
claim queued trials (``claim_queued``), never sample new ones. The storage hands each
queued trial to one worker alone (its WAITING -> RUNNING update succeeds once, on a
journal file as on PostgreSQL), so every point is tried exactly once across any number
of workers and machines, and a point whose trial failed is run again from its queued
copy.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from klayer.search.space import SearchError, Space, grid

SAMPLERS = ("random", "tpe", "grid")
HEARTBEAT_INTERVAL, GRACE_PERIOD = 60, 300  # seconds (PostgreSQL / RDB storages)
MAX_RETRY = 3  # retries of a trial whose worker died
# Optuna's retry of a failed trial, and RDBStorage's argument for it (renamed in optuna 4.9)
RETRY, RETRY_ARG = (
    (optuna.storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback")
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    else (optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"))
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Keys a worker may set for itself: where its copy of the data lives (and checkpointing,
# which search trainings do not do).
LOCAL_KEYS = ("data_dir", "strict_checksums", "checkpoint_every")

# Study user attributes.
A_CONFIG, A_SPACE, A_SAMPLER, A_TRIALS = "config", "space", "sampler", "n_trials"
A_DATA, A_VERSION, A_PARENT, A_CREATED = "data_fingerprint", "klayer_version", "parent", "created"
A_GRID = "grid"  # the grid sampler's points, each queued once at creation
A_FORMAT, FORMAT = "klayer_format", 1  # the study format this klayer reads (set last)


# --- storage ---------------------------------------------------------------------------------


def study_dir(study: str, runs_dir: str | Path = "runs") -> Path:
    """The study's run folder: runs/search/<study>."""
    return Path(runs_dir) / "search" / study


def resolve_storage(study: str, storage: str | None = None, runs_dir: str | Path = "runs") -> str:
    """``storage``, else $KLAYER_STORAGE, else the journal file in the study's run folder."""
    spec = storage or os.environ.get("KLAYER_STORAGE")
    return spec if spec else str(study_dir(study, runs_dir) / "journal.log")


def is_url(spec: str) -> bool:
    """Whether a storage is a database URL (else a journal file path)."""
    return "://" in spec


def masked(spec: str) -> str:
    """A storage URL without its password, for messages and attributes."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", spec)


def open_storage(spec: str, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD) -> optuna.storages.BaseStorage:
    """A journal file (a path) or an RDB storage (a URL) with pre-ping, heartbeat and retry."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not is_url(spec):
        return _journal_storage(Path(spec))
    return _rdb_storage(spec, heartbeat_interval, grace_period)


def _journal_storage(path: Path) -> optuna.storages.BaseStorage:
    """Optuna's journal file at ``path``; a folder, a file that is not a journal or an
    unwritable place is a clear error before any trial."""
    from klayer.training.runfolder import OutputError

    if path.is_dir():
        raise SearchError(f"--storage: {path} is a folder; name a journal file in it, "
                          f"e.g. {path / 'journal.log'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--storage: cannot create {path.parent}: {e.strerror}") from None
    from optuna.storages import JournalStorage

    # An absolute path: the lock is a symlink to the journal, and Optuna frees a lock
    # whose writer died only if that symlink resolves; a relative target resolves
    # against the lock's own folder, so a dead writer's lock would block every worker.
    target = str(path.absolute())
    backend_cls: Any
    try:
        from optuna.storages.journal import JournalFileBackend as backend_cls
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as backend_cls
    try:
        return JournalStorage(backend_cls(target))  # replays the file: a foreign one fails here
    except OSError as e:
        raise OutputError(f"--storage: cannot open {path} for writing: {e.strerror or e}"
                          ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SearchError(f"--storage: {path} is not an Optuna journal file ({e})") from None


def _rdb_storage(spec: str, heartbeat_interval: int,
                 grace_period: int) -> optuna.storages.BaseStorage:
    if spec.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SearchError("PostgreSQL storage needs psycopg: pip install 'klayer[postgres]'"
                              ) from None
    try:
        with no_experimental_warnings():
            retry: dict[str, Any] = {RETRY_ARG: RETRY(max_retry=MAX_RETRY)}
            return optuna.storages.RDBStorage(
                spec, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, **retry)
    except Exception as e:  # sqlalchemy errors: bad URL, server down, no such database
        raise SearchError(f"--storage: cannot open {masked(spec)}: {e}") from None


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int | None = MAX_RETRY
                ) -> None:
    """Enqueue a copy of a failed trial (same parameters), as Optuna's retry callback does;
    nothing once the trial's point has been retried ``max_retry`` times (None: no limit)."""
    # the retry copies user_attrs: drop this attempt's worker label and failure reason, or
    # the retry would look like the dead worker's (and never be found if it dies too)
    trial = copy.copy(trial)
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items()
                        if k not in ("worker", "fail_reason", "batch", "order_seed")}
    with no_experimental_warnings():
        RETRY(max_retry=max_retry)(study, trial)


@contextmanager
def no_experimental_warnings() -> Iterator[None]:
    """No ExperimentalWarning for Optuna's heartbeat and retry features."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def original_number(trial: FrozenTrial) -> int:
    """The number of the trial this one retries (its own number if it is no retry)."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def trial_seed(base_seed: int, number: int) -> int:
    """The training seed of trial ``number``: SeedSequence([base_seed, number])."""
    return int(np.random.SeedSequence([base_seed, number]).generate_state(1)[0])


def retrain_seeds(seed: int, n: int) -> list[int]:
    """The seeds of n retrainings: the trial's own, then SeedSequence([seed, i]), i = 1..n-1."""
    return [seed] + [trial_seed(seed, i) for i in range(1, n)]


def data_fingerprint(data: Data) -> str:
    """The data's fingerprint, as checkpoints record it: ``datasets.data_fingerprint``."""
    return datasets.data_fingerprint(data)


# --- studies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """The storage object klayer opened for a study, for what ``optuna.Study`` has no
    method for (claim a queued trial, fail another worker's, read one, heartbeats), by
    public ``BaseStorage`` methods: a trial's id (private in Optuna's trial objects) is
    looked up by its number."""

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


def load_study(name: str, storage: str, sampler: optuna.samplers.BaseSampler | None = None,
               heartbeat_interval: int = HEARTBEAT_INTERVAL,
               grace_period: int = GRACE_PERIOD) -> tuple[optuna.Study, StudyInfo]:
    """Open an existing klayer study; SearchError if there is none by that name, or if it
    is not of this klayer's study format."""
    if not is_url(storage) and not Path(storage).exists():
        raise SearchError(f"no study {name!r}: {storage} does not exist; create it with "
                          f"klayer search init --study {name} ...")
    st = open_storage(storage, heartbeat_interval, grace_period)
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
    info = StudyInfo(name, storage, TrainConfig.from_dict(attrs[A_CONFIG]), attrs[A_SPACE],
                     attrs[A_SAMPLER], int(attrs[A_TRIALS]), attrs[A_DATA], attrs[A_VERSION],
                     Store(st, st.get_study_id_from_name(name)), attrs.get(A_PARENT), attrs,
                     attrs.get(A_GRID))
    return study, info


def create_study(name: str, storage: str, config: TrainConfig, data: Data, space: Space,
                 n_trials: int = 16, sampler: str = "random",
                 parent: dict[str, Any] | None = None) -> StudyInfo:
    """Create the study once, with its set-up as user attributes; SearchError if it exists.

    A grid study runs each point of its grid once, whatever ``n_trials`` says: every
    point is queued here, and its budget is the number of points. The format attribute
    comes last, once the study is complete: ``load_study`` refuses a study without it.
    """
    if not STUDY_NAME.match(name):
        raise SearchError(f"--study {name!r}: use letters, digits, '_', '.', '-' (max 100)")
    if sampler not in SAMPLERS:
        raise SearchError(f"--sampler {sampler!r}: valid: {', '.join(SAMPLERS)}")
    if n_trials < 1:
        raise SearchError(f"--trials must be >= 1, got {n_trials}")
    points = grid_points(space) if sampler == "grid" else None
    if points is not None:
        n_trials = len(points)
    st = open_storage(storage)
    try:
        study = optuna.create_study(study_name=name, storage=st, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        raise SearchError(f"study {name!r} already exists in {masked(storage)}; pick another "
                          "name (workers join it with klayer search worker)") from None
    attrs: dict[str, Any] = {
        A_CONFIG: config.to_dict(), A_SPACE: space, A_SAMPLER: sampler, A_TRIALS: n_trials,
        A_DATA: data_fingerprint(data), A_VERSION: __version__,
        A_CREATED: datetime.now().isoformat(timespec="seconds"),
    }
    if parent is not None:
        attrs[A_PARENT] = parent
    if points is not None:
        attrs[A_GRID] = points
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for point in points or ():
        study.enqueue_trial(point)
    attrs[A_FORMAT] = FORMAT  # last: no worker joins before every point is queued
    study.set_user_attr(A_FORMAT, FORMAT)
    return StudyInfo(name, storage, config, space, sampler, n_trials, attrs[A_DATA],
                     __version__, Store(st, st.get_study_id_from_name(name)), parent, attrs,
                     points)


# --- grid studies ----------------------------------------------------------------------------


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every point of the grid sampler's grid (the product of ``grid``'s values)."""
    values = grid(space)
    return [dict(zip(values, combo, strict=True))
            for combo in itertools.product(*values.values())]


def point_key(params: dict[str, Any]) -> str:
    """A grid point as a key: its parameters as sorted JSON (as the storage keeps them)."""
    return json.dumps(params, sort_keys=True)


def queued_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters a trial was queued with (its grid point, copied by retries), else
    those it has (a point is known before its trial suggests anything)."""
    return dict(trial.system_attrs.get("fixed_params") or trial.params)


def claim_queued(study: optuna.Study, store: Store,
                 accept: Callable[[FrozenTrial], bool] | None = None) -> Trial | None:
    """A queued (WAITING) trial that ``accept`` takes, now RUNNING for this worker; None
    when there is none. Never a new trial: unlike ``study.ask`` it samples nothing (nor
    can it pick among the queued trials), so this is ``ask`` by hand: the storage's
    WAITING -> RUNNING update, then Optuna's public ``Trial(study, trial_id)``.

    The storage changes a trial from WAITING to RUNNING for one caller only (journal
    lock, PostgreSQL row lock), so each queued trial goes to exactly one worker.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if accept is not None and not accept(t):
            continue
        trial_id = store.trial_id(t.number)
        try:
            if store.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # claimed and finished by another worker since we looked
    return None


GRID_STATES = ("done", "running", "waiting", "failed")


def grid_progress(points: list[dict[str, Any]], trials: list[FrozenTrial]
                  ) -> list[tuple[dict[str, Any], str, list[FrozenTrial]]]:
    """Each grid point, its state and its trials: done (a COMPLETE trial), else running,
    else waiting (queued), else failed; "missing" if no trial has its parameters."""
    mine: dict[str, list[FrozenTrial]] = {point_key(p): [] for p in points}
    for t in trials:
        mine.setdefault(point_key(queued_params(t)), []).append(t)
    order = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)
    out = []
    for p in points:
        ts = mine[point_key(p)]
        states = {t.state for t in ts}
        state = next((name for s, name in zip(order, GRID_STATES, strict=True) if s in states),
                     "missing")
        out.append((p, state, ts))
    return out


def study_finished(study: optuna.Study, info: StudyInfo) -> bool:
    """Whether the workers are done: a grid study once no trial is queued or running
    (every point has its outcome), any other once it has its COMPLETE trials."""
    trials = study.get_trials(deepcopy=False)
    if info.sampler == "grid":
        return not any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials)
    return sum(t.state == TrialState.COMPLETE for t in trials) >= info.n_trials


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k COMPLETE trials with the highest validation accuracy, best first."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (-(t.value or 0.0), t.number))[:k]


def make_sampler(name: str, space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    """A worker's sampler. A grid study's workers sample nothing (they claim its queued
    points); its GridSampler only refuses a trial queued by hand without every parameter."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def check_compatible(info: StudyInfo, overrides: dict[str, Any], fingerprint: str | None) -> None:
    """SearchError unless this worker's configuration and data are the study's."""
    base = info.config.to_dict()
    mine = {**base, **overrides}
    try:
        mine = TrainConfig.from_dict(mine).to_dict()
    except (ValueError, TypeError) as e:
        raise SearchError(str(e)) from None
    differ = [k for k in base if k not in LOCAL_KEYS and mine[k] != base[k]]
    if differ:
        detail = ", ".join(f"{k} = {json.dumps(mine[k])} here, {json.dumps(base[k])} in the "
                           "study" for k in differ)
        raise SearchError(f"refusing to join study {info.name!r}: this worker's configuration "
                          f"differs ({detail}). Workers train the study's configuration; "
                          f"leave those settings out (only {', '.join(LOCAL_KEYS)} may differ)")
    if fingerprint is not None and fingerprint != info.fingerprint:
        raise SearchError(f"refusing to join study {info.name!r}: this worker's data "
                          f"({fingerprint[:19]}...) differ from the study's "
                          f"({info.fingerprint[:19]}...); check --data-dir / --dataset and that "
                          "every machine has the same copy of the data")


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

