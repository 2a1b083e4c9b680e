"""Where a study lives: a journal file or a database URL, opened with Optuna's heartbeat
and retry, and shown without its secrets; the lock that keeps a study within its budget.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from klayer.search.space import SearchError

HEARTBEAT_INTERVAL, GRACE_PERIOD = 60, 300  # seconds (PostgreSQL / RDB storages)
MAX_RETRY = 3  # retries of a trial whose worker died
# Optuna's retry of a failed trial, and RDBStorage's argument for it (renamed in optuna 4.9)
RETRY, RETRY_ARG = (
    (optuna.storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback")
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    else (optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"))

# "postgresql+psycopg:" and the like: a scheme of two or more letters (C:/ is a drive)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


def is_url(spec: str) -> bool:
    """Whether a storage is a database URL (else a journal file path). Something that
    starts like a URL but does not parse as one (``scheme:/user:pw@host``) is refused,
    never taken for a path: it would make folders named after the password."""
    if "://" in spec:
        return True
    if _SCHEME.match(spec):
        raise SearchError(f"--storage: {masked(spec)} starts like a database URL but is not "
                          "one (scheme://user@host/database); a journal file needs a path")
    return False


def masked(spec: str) -> str:
    """A storage URL without its secrets, for messages and attributes: the password of
    its user part (which may hold a raw '@': the host follows the last one) and any
    ``password=`` in its query string."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        scheme, sep, rest = spec.partition(":/")
    authority, slash, tail = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if at and ":" in user:
        authority = f"{user.split(':', 1)[0]}:***@{host}"
    tail = re.sub(r"(?i)((?:^|[?&])password=)[^&]*", r"\1***", tail)
    return f"{scheme}{sep}{authority}{slash}{tail}" if sep else spec


def open_storage(spec: str, heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD) -> optuna.storages.BaseStorage:
    """A journal file (a path) or an RDB storage (a URL) with pre-ping, and with heartbeat
    and retry unless ``heartbeat_interval`` is None (a worker asks and tells through such
    a storage: Optuna means its heartbeat for ``Study.optimize``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if is_url(spec):
        return _rdb_storage(spec, heartbeat_interval, grace_period)
    return _journal_storage(Path(spec))


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

    backend_cls: Any
    try:
        from optuna.storages.journal import JournalFileBackend as backend_cls
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as backend_cls
    try:
        # absolute: the lock is a symlink to the journal, and Optuna frees a dead writer's
        # lock only if it resolves (a relative one would resolve in the lock's folder)
        return JournalStorage(backend_cls(str(path.absolute())))  # a foreign file fails here
    except OSError as e:
        raise OutputError(f"--storage: cannot open {path} for writing: {e.strerror or e}"
                          ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SearchError(f"--storage: {path} is not an Optuna journal file ({e})") from None


def _rdb_storage(spec: str, heartbeat_interval: int | None,
                 grace_period: int) -> optuna.storages.BaseStorage:
    if spec.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SearchError("PostgreSQL storage needs psycopg: pip install 'klayer[postgres]'"
                              ) from None
    try:
        with no_experimental_warnings():
            beats: dict[str, Any] = {} if heartbeat_interval is None else {
                "heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                RETRY_ARG: RETRY(max_retry=MAX_RETRY)}
            return optuna.storages.RDBStorage(spec, engine_kwargs={"pool_pre_ping": True},
                                              **beats)
    except Exception as e:  # sqlalchemy errors: bad URL, server down, no such database
        raise SearchError(f"--storage: cannot open {masked(spec)}: "
                          f"{str(e).replace(spec, masked(spec))}") from None


@contextmanager
def no_experimental_warnings() -> Iterator[None]:
    """No ExperimentalWarning for Optuna's heartbeat and retry features."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@contextmanager
def budget_lock(storage: optuna.storages.BaseStorage, spec: str, study: str) -> Iterator[None]:
    """Held while a worker counts a study's COMPLETE trials and tells one, so that two
    workers finishing at once never both complete the budget's last trial: a file lock
    beside a journal or SQLite file, a PostgreSQL advisory lock (released before its
    connection goes back to the pool), and none on other databases."""
    path = spec[len("sqlite:///"):].split("?")[0] if spec.startswith("sqlite:///") else (
        None if is_url(spec) else spec)
    if path is not None:
        from filelock import FileLock

        with FileLock(path + ".budget.lock"):
            yield
        return
    if not (spec.startswith("postgresql") and isinstance(storage, optuna.storages.RDBStorage)):
        yield
        return
    import hashlib

    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(study.encode()).digest()[:8], "big", signed=True)
    with storage.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


class StorageGone(Exception):
    """The storage stayed unreachable for longer than the worker's --storage-timeout."""


def storage_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable storage raises: Optuna's internal storage error and, where
    SQLAlchemy is installed (the postgres extra), its database errors."""
    errors: list[type[BaseException]] = [optuna.exceptions.StorageInternalError]
    try:
        from sqlalchemy.exc import DBAPIError
    except ImportError:  # pragma: no cover - journal-only installs
        return tuple(errors)
    return (*errors, DBAPIError)
