"""Search spaces: parsed from TOML tables or ``--param`` flags, asked of Optuna trials.

A space maps a training key (``lambda``, ``hidden``, ...) or ``depth`` / ``width`` to a
range or to choices, stored as a study attribute in ``normalize_space``'s JSON-ready
form. ``SearchError``, the error of every search module, lives here, the lowest of them.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial

from klayer.core.config import TrainConfig, key_name

# Keys no search space may vary: they define the data or the trial's identity.
FIXED_KEYS = ("seed", "dataset", "data_dir", "split", "val_size", "strict_checksums", "name")
PSEUDO_KEYS = ("depth", "width")  # hidden = [width] * depth


class SearchError(Exception):
    """A study cannot be created, joined or read as asked (a usage error)."""


# key -> {"low", "high", "int"[, "log", "step", "points"]} or {"choices": [...]}
Space = dict[str, dict[str, Any]]


def _scalar(text: str) -> Any:
    """A flag value: true/false, an int, a float, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_param(text: str) -> tuple[str, dict[str, Any]]:
    """One ``--param`` flag: KEY=LOW..HIGH[:log][:step=S][:points=N] or KEY=A|B|C.

    >>> parse_param("lambda=1e-5..1e-1:log")
    ('lambda', {'low': 1e-05, 'high': 0.1, 'log': True})
    >>> parse_param("hidden=50,50|100,50")
    ('hidden', {'choices': [[50, 50], [100, 50]]})
    """
    key, sep, rest = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not rest:
        raise SearchError(f"--param {text!r}: expected KEY=LOW..HIGH[:log] or KEY=A|B|C")
    if ".." in rest and "|" not in rest:
        head, *opts = rest.split(":")
        lo, _, hi = head.partition("..")
        spec: dict[str, Any] = {"low": _scalar(lo), "high": _scalar(hi)}
        for opt in opts:
            name, _, value = opt.partition("=")
            if name == "log" and not value:
                spec["log"] = True
            elif name in ("step", "points") and value:
                spec[name] = _scalar(value)
            else:
                raise SearchError(f"--param {text!r}: unknown option {opt!r} "
                                  "(valid: log, step=S, points=N)")
        return key, spec
    choices: list[Any] = []
    for part in rest.split("|"):
        if key == "hidden":
            try:
                choices.append([int(w) for w in part.split(",") if w.strip()])
            except ValueError:
                raise SearchError(f"--param {text!r}: hidden choices are widths like "
                                  "50,50|100,50") from None
        else:
            choices.append(_scalar(part))
    return key, {"choices": choices}


def normalize_space(raw: dict[str, Any], base: TrainConfig) -> Space:
    """A validated, JSON-ready space from a TOML table or ``--param`` flags.

    Each key maps to a range (``low``, ``high``, optional ``log``, ``step``, ``points``
    for the grid sampler) or to ``choices`` (a bare list is taken as choices). Every
    endpoint and choice must make a valid configuration.
    """
    kinds = {key_name(f): str(f.type).replace(" | None", "") for f in fields(TrainConfig)}
    kinds.update(dict.fromkeys(PSEUDO_KEYS, "int"))
    if not raw:
        raise SearchError("the search space is empty: give --space FILE.toml or --param flags")
    if "hidden" in raw and any(k in raw for k in PSEUDO_KEYS):
        raise SearchError("search either hidden or depth/width, not both")
    space: Space = {}
    for key, value in raw.items():
        if key not in kinds:
            raise SearchError(f"unknown search key {key!r}; valid: "
                              f"{', '.join(sorted(k for k in kinds if k not in FIXED_KEYS))}")
        if key in FIXED_KEYS:
            raise SearchError(f"{key} cannot be searched (it defines the data or the trial)")
        if isinstance(value, list):
            value = {"choices": value}
        if not isinstance(value, dict):
            raise SearchError(f"{key}: expected a table with low/high or choices, got {value!r}")
        space[key] = _normalize_one(key, value, kinds[key])
    for key, spec in space.items():  # every endpoint / choice gives a valid configuration
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for v in values:
            try:
                config_for(base, {key: encode(v)}, seed=base.seed)
            except (ValueError, TypeError) as e:
                raise SearchError(f"search space {key} = {v!r}: {e}") from None
    return space


def _normalize_one(key: str, spec: dict[str, Any], kind: str) -> dict[str, Any]:
    spec = {k: v for k, v in spec.items() if k != "int"}  # normalized spaces carry it
    unknown = set(spec) - {"low", "high", "log", "step", "points", "choices"}
    if unknown:
        raise SearchError(f"{key}: unknown field(s) {sorted(unknown)} "
                          "(valid: low, high, log, step, points, choices)")
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise SearchError(f"{key}: give either choices or low/high, not both")
        return _normalize_choices(key, list(spec["choices"]), kind)
    return _normalize_range(key, spec, kind)


def _normalize_choices(key: str, choices: list[Any], kind: str) -> dict[str, Any]:
    """{"choices": [...]}: widths lists for tuple keys, scalars otherwise, no repeats."""
    if not choices:
        raise SearchError(f"{key}: choices is empty")
    if kind.startswith("tuple"):
        if not all(isinstance(c, list) and all(isinstance(w, int) for w in c)
                   for c in choices):
            raise SearchError(f"{key}: each choice must be a list of widths, got {choices}")
    elif any(isinstance(c, (list, dict)) for c in choices):
        raise SearchError(f"{key}: choices must be numbers, strings or booleans")
    if len({json.dumps(c) for c in choices}) != len(choices):
        raise SearchError(f"{key}: choices repeat a value")
    return {"choices": choices}


def _normalize_range(key: str, spec: dict[str, Any], kind: str) -> dict[str, Any]:
    """{"low", "high", "int"[, "log", "step", "points"]} of a numeric key, checked."""
    if "low" not in spec or "high" not in spec:
        raise SearchError(f"{key}: a range needs low and high (or give choices)")
    if kind not in ("int", "float"):
        raise SearchError(f"{key} is not numeric: give choices")
    lo, hi = spec["low"], spec["high"]
    ok = int if kind == "int" else (int, float)
    for name, v in (("low", lo), ("high", hi)):
        if isinstance(v, bool) or not isinstance(v, ok):
            what = "an integer" if kind == "int" else "a number"
            raise SearchError(f"{key}: {name} must be {what}, got {v!r}")
    if not lo < hi:
        raise SearchError(f"{key}: low ({lo}) must be below high ({hi})")
    conv = int if kind == "int" else float
    out: dict[str, Any] = {"low": conv(lo), "high": conv(hi), "int": kind == "int"}
    if spec.get("log"):
        if lo <= 0:
            raise SearchError(f"{key}: a log range needs low > 0, got {lo}")
        out["log"] = True
    if "step" in spec:
        if kind != "int" or not isinstance(spec["step"], int) or spec["step"] < 1 or \
                spec.get("log"):
            raise SearchError(f"{key}: step must be a positive integer, for linear int ranges")
        out["step"] = spec["step"]
    if "points" in spec:
        if not isinstance(spec["points"], int) or spec["points"] < 2:
            raise SearchError(f"{key}: points must be an integer >= 2")
        out["points"] = spec["points"]
    return out


def describe_space(space: Space) -> str:
    """The space in one line, e.g. ``lambda log-uniform [1e-05, 0.1]; n_batch in {50, 100}``."""
    parts = []
    for key, s in space.items():
        if "choices" in s:
            parts.append(f"{key} in {{{', '.join(json.dumps(c) for c in s['choices'])}}}")
        else:
            kind = "log-uniform" if s.get("log") else "uniform"
            parts.append(f"{key} {kind}{' int' if s['int'] else ''} [{s['low']:g}, {s['high']:g}]")
    return "; ".join(parts)


def encode(value: Any) -> Any:
    """A choice as Optuna stores it: widths lists become "50,50" strings."""
    return ",".join(str(w) for w in value) if isinstance(value, (list, tuple)) else value


def suggest(trial: Trial, space: Space) -> dict[str, Any]:
    """Ask the trial for every parameter of the space; returns the Optuna values."""
    out = {}
    for key, s in space.items():
        if "choices" in s:
            out[key] = trial.suggest_categorical(key, [encode(c) for c in s["choices"]])
        elif s["int"]:
            out[key] = trial.suggest_int(key, s["low"], s["high"], step=s.get("step", 1),
                                         log=bool(s.get("log")))
        else:
            out[key] = trial.suggest_float(key, s["low"], s["high"], log=bool(s.get("log")))
    return out


def grid(space: Space, points: int = 5) -> dict[str, list[Any]]:
    """The grid sampler's values: ranges as ``points`` (log-)evenly spaced values."""
    out: dict[str, list[Any]] = {}
    for key, s in space.items():
        if "choices" in s:
            out[key] = [encode(c) for c in s["choices"]]
            continue
        n = s.get("points", points)
        lo, hi = s["low"], s["high"]
        if s["int"] and "step" in s and (hi - lo) // s["step"] + 1 <= max(n, 32):
            out[key] = list(range(lo, hi + 1, s["step"]))
            continue
        v = np.geomspace(lo, hi, n) if s.get("log") else np.linspace(lo, hi, n)
        out[key] = sorted({int(round(x)) for x in v}) if s["int"] else [float(x) for x in v]
    return out


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every point of the grid sampler's grid (the product of ``grid``'s values)."""
    values = grid(space)
    return [dict(zip(values, combo, strict=True))
            for combo in itertools.product(*values.values())]


def config_for(base: TrainConfig, params: dict[str, Any], seed: int) -> TrainConfig:
    """The base configuration with a trial's parameters (Optuna values) and seed."""
    values = base.to_dict()
    for key, value in params.items():
        if key == "hidden":
            values["hidden"] = [int(w) for w in str(value).split(",") if w] if isinstance(
                value, str) else list(value)
        elif key not in PSEUDO_KEYS:
            values[key] = value
    if any(k in params for k in PSEUDO_KEYS):
        old = list(values["hidden"])
        depth = int(params.get("depth", len(old)))
        width = int(params.get("width", old[0] if old else 50))
        values["hidden"] = [width] * depth
    values["seed"] = seed
    return TrainConfig.from_dict(values)


def child_space(parent_space: Space, top: Sequence[FrozenTrial], margin: float = 0.25) -> Space:
    """Coarse to fine: each range narrowed to the span of the top trials' values.

    A range becomes [min, max] of the top trials' values (on the log scale for log
    ranges), widened by ``margin`` of that span on each side (by ``margin`` of a tenth
    of the old range if the span is zero) and clipped to the parent range; choices
    shrink to those the top trials took.
    """
    space: Space = {}
    for key, s in parent_space.items():
        values = [t.params[key] for t in top if key in t.params]
        if not values:
            space[key] = dict(s)
        elif "choices" in s:
            taken = set(values)
            space[key] = {"choices": [c for c in s["choices"] if encode(c) in taken]}
        else:
            space[key] = _narrow(s, values, margin)
    return space


def _narrow(s: dict[str, Any], values: Sequence[float], margin: float) -> dict[str, Any]:
    """Range ``s`` narrowed to ``values`` widened by ``margin`` (see ``child_space``)."""
    f: Callable[[float], float] = math.log10 if s.get("log") else float
    inv: Callable[[float], float] = (lambda x: 10.0**x) if s.get("log") else float
    lo, hi = min(f(v) for v in values), max(f(v) for v in values)
    span = hi - lo or (f(s["high"]) - f(s["low"])) / 10
    lo = max(lo - margin * span, f(s["low"]))
    hi = min(hi + margin * span, f(s["high"]))
    new = dict(s)
    if s["int"]:
        step = s.get("step", 1)
        a = s["low"] + step * math.floor((inv(lo) - s["low"]) / step + 1e-9)
        b = s["low"] + step * math.ceil((inv(hi) - s["low"]) / step - 1e-9)
        new["low"], new["high"] = max(a, s["low"]), min(b, s["high"])
        if new["low"] >= new["high"]:
            new["low"], new["high"] = s["low"], s["high"]
    else:
        new["low"], new["high"] = inv(lo), inv(hi)
        if not new["low"] < new["high"]:
            new["low"], new["high"] = s["low"], s["high"]
    return new


def fmt_value(v: Any) -> str:
    """A parameter value for tables: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_params(params: dict[str, Any]) -> str:
    """A trial's parameters as ``key=value`` pairs."""
    return " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())


def make_sampler(name: str, space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    """A worker's sampler. A grid study's workers sample nothing (they claim its queued
    points); its GridSampler only refuses a trial queued by hand without every parameter."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
