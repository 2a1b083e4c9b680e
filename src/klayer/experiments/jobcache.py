"""An experiment's finished trainings, kept so that a stopped experiment loses only the
trainings that were running.

Each training of ``klayer experiment`` is written, as soon as it ends, to
``OUT/trainings/<label>-seed<S>-<key>.json`` with its ``Outcome``. ``key`` hashes what
decides the result: the job (label, configuration with its seed, post-evaluation, quick)
and ``identity`` (the data files, the versions of klayer and NumPy, the kernels). So the
same command run again with the same ``--out`` reads those trainings back (they are
seeded: the ones a new run would make), and any other setting, data or klayer version
never matches. A file that cannot be read back is reported and trained again; one of
another format than ``FORMAT`` is refused (FormatError).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klayer import __version__
from klayer.core import kernels
from klayer.core.config import RESULT_NEUTRAL
from klayer.data.fetch import REQUIRED
from klayer.data.files import FormatError, check_format
from klayer.training.runfolder import write_text


@dataclass
class Outcome:
    """What one (spec, seed) training produced."""

    label: str
    seed: int
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, float]]
    extra: dict[str, float] = field(default_factory=dict)


FOLDER = "trainings"
FORMAT = "klayer-training-2"  # the kept file's "format"
PostEvaluation = Callable[[Any], dict[str, float]]  # of a training's Result
Job = tuple[str, dict[str, Any], "PostEvaluation | None", bool]  # label, values, post, quick


def identity(data_folder: Path | None) -> dict[str, Any]:
    """What besides its settings decides a training's result: the CIFAR-10 batch files in
    ``data_folder`` (resolved folder, sizes and modification times; None: data made from
    the settings, as synthetic and digits are), klayer's and NumPy's versions, kernels and
    who runs the matrix products."""
    data: dict[str, Any] | None = None
    if data_folder is not None:
        folder = Path(data_folder).resolve()
        data = {"folder": str(folder)}
        for p in (folder / n for n in (*REQUIRED, "batches.meta")):  # not the decoded cache
            data[p.name] = [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None
    return {"data": data, "klayer": __version__, "numpy": np.__version__,
            "kernels": kernels.BACKEND, "matmul": kernels.matmul_isa()}


def key(job: Job, ident: dict[str, Any]) -> str:
    """16 hex digits of a hash of the job and ``ident``, but the settings that leave the
    result unchanged (the identity's resolved folder says where the data is, however
    --data-dir spelled it)."""
    label, values, post, quick = job
    values = {k: v for k, v in values.items() if k not in RESULT_NEUTRAL}
    text = json.dumps([label, values, post and post_name(post), quick, ident], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def post_name(post: Any) -> str:
    """A post-evaluation's module and name, with its bound arguments when it is a
    ``functools.partial`` (they change what it computes)."""
    if isinstance(post, functools.partial):
        return f"{post_name(post.func)}{post.args!r}{sorted(post.keywords.items())!r}"
    return f"{post.__module__}.{post.__qualname__}"


def stem(job: Job) -> str:
    """``<label>-seed<S>``, the label reduced to letters, digits, dots and hyphens."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", job[0]).strip("-") or "training"
    return f"{slug}-seed{job[1].get('seed', 0)}"


def path_for(folder: Path, job: Job, ident: dict[str, Any]) -> Path:
    return folder / f"{stem(job)}-{key(job, ident)}.json"


def save(folder: Path, job: Job, ident: dict[str, Any], outcome: Outcome) -> Path:
    """Write one finished training (atomically; OutputError if it cannot be)."""
    path = path_for(folder, job, ident)
    write_text(path, json.dumps({"format": FORMAT, "key": key(job, ident),
                                 "outcome": asdict(outcome)}, default=str) + "\n")
    return path


def load(folder: Path, job: Job, ident: dict[str, Any],
         warn: Callable[[str], None]) -> Outcome | None:
    """The training of ``job`` kept by an earlier run, or None (none kept, or a file that
    cannot be used: ``warn`` says why). FormatError if its format is not ``FORMAT``."""
    path = path_for(folder, job, ident)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        check_format(path, payload.get("format"), FORMAT)
        if payload["key"] != key(job, ident):
            raise ValueError("it was made by another training")
        return Outcome(**payload["outcome"])
    except FormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"{path} cannot be read back ({e}); training it again")
        return None
