"""Reading a training checkpoint's state back, checking every array before anything is used.

A checkpoint is a dict of plain arrays (``Trainer.state_dict``). These helpers pull
typed values out of it and raise CheckpointError naming what is missing or does not
fit the run, so a damaged or foreign file is refused rather than half-applied.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from klayer.core.config import RESULT_NEUTRAL
from klayer.core.layers import Array
from klayer.training.checkpoint import CheckpointError
from klayer.training.runfolder import METRIC_FIELDS


def config_differences(recorded: Any, mine: dict[str, Any]) -> list[str]:
    """The keys whose values differ between a checkpoint's config and this run's, but
    for the settings that leave the result unchanged (``RESULT_NEUTRAL``)."""
    if not isinstance(recorded, dict):
        raise CheckpointError("'config' is not a JSON object")
    return sorted(k for k in set(recorded) | set(mine)
                  if k not in RESULT_NEUTRAL and recorded.get(k) != mine.get(k))


def scalars(d: dict[str, np.ndarray]) -> tuple[bool, float]:
    """The ``finished`` flag and the ``elapsed`` seconds."""
    finished, elapsed = d.get("finished"), d.get("elapsed")
    if finished is None or finished.shape != () or finished.dtype != np.bool_:
        raise CheckpointError("missing or invalid 'finished'")
    if (elapsed is None or elapsed.shape != () or elapsed.dtype != np.float64
            or not 0 <= float(elapsed) < math.inf):
        raise CheckpointError("missing or invalid 'elapsed'")
    return bool(finished), float(elapsed)


def optimizer_state(d: dict[str, np.ndarray], params: dict[str, Array]) -> dict[str, Array]:
    """The ``opt/...`` arrays; each buffer must have its parameter's shape and dtype."""
    state = {k[4:]: v for k, v in d.items() if k.startswith("opt/")}
    for key, buf in state.items():
        if key == "t":
            continue
        p = params.get(key.partition("/")[2])
        if p is None or buf.shape != p.shape or buf.dtype != p.dtype:
            raise CheckpointError(f"optimizer state {key} does not fit the parameters")
    return state


def epoch_order(d: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The current epoch's example order: a permutation of range(n)."""
    order = d.get("order")
    if (order is None or order.shape != (n,) or order.dtype != np.int64
            or not np.array_equal(np.sort(order), np.arange(n))):
        raise CheckpointError("'order' is not a permutation of the training set")
    return order.copy()


def generators(d: dict[str, np.ndarray], count: int) -> list[np.random.Generator]:
    """The random generators, restored from their JSON bit-generator states."""
    states = d.get("rng")
    if states is None or states.shape != (count,) or states.dtype.kind != "U":
        raise CheckpointError("missing or invalid random-generator states 'rng'")
    rngs = []
    for s in states:
        g = np.random.Generator(np.random.PCG64())
        try:
            g.bit_generator.state = json.loads(str(s))
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise CheckpointError(f"invalid random-generator state ({e})") from None
        rngs.append(g)
    return rngs


def metric_rows(d: dict[str, np.ndarray], t: int, total: int) -> list[dict[str, float]]:
    fields_ = d.get("metric_fields")
    m = d.get("metrics")
    if fields_ is None or tuple(str(f) for f in fields_) != METRIC_FIELDS:
        raise CheckpointError(f"'metric_fields' is not {METRIC_FIELDS}")
    if m is None or m.ndim != 2 or m.shape[1] != len(METRIC_FIELDS) or m.dtype != np.float64:
        raise CheckpointError("missing or invalid 'metrics'")
    steps = m[:, 0]
    if len(steps) and (np.any(np.diff(steps) <= 0) or steps[-1] > t or steps[0] < 0
                       or np.any(steps != np.round(steps))):
        raise CheckpointError("metrics rows are not in increasing step order up to the step")
    rows = []
    for r in m:
        row: dict[str, float] = dict(zip(METRIC_FIELDS, (float(v) for v in r), strict=True))
        row["step"] = int(r[0])
        rows.append(row)
    return rows

