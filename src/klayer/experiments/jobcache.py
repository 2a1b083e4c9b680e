"""An experiment's finished trainings, kept so that a stopped experiment loses only the
trainings that were running.

Each training of ``klayer experiment`` (a label, its configuration values, an optional
post-evaluation, quick or not) is written, as soon as it ends, to
``OUT/trainings/<label>-seed<S>-<key>.json``: the job that made it and its ``Outcome``
(summary, metrics rows, extra values). ``key`` hashes the job and its ``identity``:
the data files it read (resolved folder, names, sizes, modification times), klayer's
own source files, NumPy's version and the kernels in use. So the same command run
again with the same ``--out`` reads those trainings back instead of training them
again, and a job with any other setting, other data or other code never matches.
Trainings are seeded, so a training read back is the one a new run would produce. A
file that cannot be read back is reported and trained again; one of another format
than ``FORMAT`` is refused (FormatError).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
FORMAT = "klayer-training-1"  # the kept file's "format"
Job = tuple[str, dict[str, Any], "str | None", bool]  # label, config values, post, quick


def identity(data_folder: Path | None) -> dict[str, Any]:
    """What besides its settings decides a training's result: the CIFAR-10 batch files in
    ``data_folder`` (None: data made from the settings alone, as synthetic and digits
    are), klayer's source (a hash of its .py, .c and .toml files), NumPy and kernels."""
    package = Path(__file__).resolve().parents[1]  # the whole klayer package
    code = hashlib.sha256()
    sources = (p for p in package.rglob("*") if p.suffix in (".py", ".c", ".toml")
               and not p.name.startswith(".") and p.is_file())  # not an editor's lock link
    for path in sorted(sources):
        code.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    data = None
    if data_folder is not None:  # the batch files (not the decoded cache klayer adds)
        folder = Path(data_folder).resolve()
        names = [*REQUIRED, "batches.meta"]
        data = {"folder": str(folder), "files": [
            [n, p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [n, None, None]
            for n, p in ((n, folder / n) for n in names)]}
    return {"data": data, "code": code.hexdigest(), "numpy": np.__version__,
            "kernels": kernels.BACKEND}


def describe(job: Job, ident: dict[str, Any]) -> dict[str, Any]:
    """What identifies a training, as plain JSON values: its settings but those that leave
    the result unchanged (the identity's resolved folder says where the data was found,
    however --data-dir spelled it)."""
    label, values, post, quick = job
    values = {k: v for k, v in values.items() if k not in RESULT_NEUTRAL}
    plain = json.loads(json.dumps({"label": label, "config": values, "post": post,
                                   "quick": quick, "identity": ident},
                                  sort_keys=True, default=str))
    assert isinstance(plain, dict)
    return plain


def key(job: Job, ident: dict[str, Any]) -> str:
    """16 hex digits unique to the job: a hash of its description."""
    described = describe(job, ident)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def stem(job: Job) -> str:
    """``<label>-seed<S>``, the label reduced to letters, digits, dots and hyphens."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", job[0]).strip("-") or "training"
    return f"{slug}-seed{job[1].get('seed', 0)}"


def path_for(folder: Path, job: Job, ident: dict[str, Any]) -> Path:
    """``folder/<label>-seed<S>-<key>.json``: readable, and unique to the job."""
    return folder / f"{stem(job)}-{key(job, ident)}.json"


def save(folder: Path, job: Job, ident: dict[str, Any], outcome: Outcome) -> Path:
    """Write one finished training (atomically; OutputError if it cannot be)."""
    path = path_for(folder, job, ident)
    write_text(path, json.dumps({"format": FORMAT, "job": describe(job, ident),
                                 "outcome": asdict(outcome)}, default=str) + "\n")
    return path


def load(folder: Path, job: Job, ident: dict[str, Any],
         warn: Callable[[str], None]) -> Outcome | None:
    """The training of ``job`` finished by an earlier run, or None (never kept, or a
    file that cannot be used: ``warn`` says why, and it will be trained again).
    FormatError if the file is of another format than ``FORMAT``."""
    path = path_for(folder, job, ident)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        if isinstance(payload, dict):
            check_format(path, payload.get("format"), FORMAT)
        if payload["job"] != describe(job, ident):
            raise ValueError("it was made by another training")
        o = payload["outcome"]
        fields = (o["label"], o["seed"], o["config"], o["summary"], o["rows"], o["extra"])
        kinds = (str, int, dict, dict, list, dict)
        if not all(isinstance(v, k) for v, k in zip(fields, kinds, strict=True)) or not all(
                isinstance(r, dict) for r in o["rows"]):
            raise ValueError("its outcome has the wrong shape")
        return Outcome(*fields)
    except FormatError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        warn(f"{path} cannot be read back ({e}); training it again")
        return None
