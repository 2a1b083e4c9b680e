"""The run folder's files: config.toml, metrics.csv, summary.json and model.npz.

Every file is replaced atomically (a temporary file, fsync, rename), so an interrupted
or failed write leaves the previous version intact, never a part of a file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from klayer.core.config import TrainConfig, to_toml
from klayer.core.network import Network
from klayer.data.datasets import Data
from klayer.data.files import atomic_write
from klayer.training import modelfile

# what a finished run leaves (a diverged or stopped one may leave config.toml and
# metrics.csv, which a new run in the same folder may replace)
FINISHED_FILES = ("model.npz", "summary.json")
METRIC_FIELDS = ("step", "epoch", "lr", "train_loss", "train_cost", "train_accuracy",
                 "val_loss", "val_cost", "val_accuracy", "seconds")


@dataclass
class Result:
    """A finished training: its network, metrics rows, summary, settings and data."""

    net: Network
    rows: list[dict[str, float]]
    summary: dict[str, Any]
    config: TrainConfig
    data: Data = field(repr=False)


class OutputError(Exception):
    """A file of the run folder could not be written (disk full, read-only, ...)."""


def cannot_write(path: Path, e: OSError) -> str:
    return (f"cannot write {path}: {e.strerror or e}; the files already in "
            f"{path.parent} are intact")


def save_run(result: Result, out: Path) -> None:
    """config.toml, metrics.csv, model.npz and, last, summary.json in ``out`` (created if
    needed): a summary.json marks a run whose files are all there.

    Each file is replaced atomically; OutputError (naming the file) if one cannot be.
    """
    data = result.data
    meta = {"dataset": data.name, "seed": result.config.seed,
            "image_shape": list(data.image_shape) if data.image_shape else None}
    path = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, text in ((out / "config.toml", to_toml(result.config.to_dict())),
                           (out / "metrics.csv", csv_text(result.rows))):
            write_text(path, text)
        path = out / "model.npz"
        modelfile.save(result.net, path, metadata=meta,
                       extras=data.transform_arrays())
        path = out / "summary.json"
        write_text(path, json.dumps(result.summary, indent=2) + "\n")
    except OSError as e:
        raise OutputError(cannot_write(path, e)) from None


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (old file or complete new one, never a part), its
    folder created if needed; OutputError naming the file if it cannot be written."""
    data = text.encode()

    def write(f: IO[bytes]) -> None:
        f.write(data)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as e:
        raise OutputError(cannot_write(path, e)) from None


def csv_text(rows: list[dict[str, float]]) -> str:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return text.getvalue()


# the columns the curves are drawn from; a metrics file must have them (others are optional)
PLOTTED = ("step", *(f"{split}_{m}" for m in ("loss", "cost", "accuracy")
                     for split in ("train", "val")))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv back as a list of rows of floats; ValueError, saying what is wrong, for
    a file that is not one (empty, cut short, edited by hand)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    missing = [k for k in PLOTTED if k not in (header or ())]
    if missing:
        raise ValueError(f"no header with the columns {', '.join(missing)}")
    if not rows:
        raise ValueError("no rows")
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            out.append({k: float(v) for k, v in row.items()})
        except (TypeError, ValueError):  # a missing field (None), extra fields (a list), text
            raise ValueError(f"line {line} is not a row of numbers under the header") from None
    return out

