"""Looking at a study: the trial table, the best trial, stuck trials, and reaping them.

``status_text`` (``klayer search status``) shows test accuracies only with ``show_test``:
seeing them invites choosing on the test set. On a journal file nothing fails the trials
of a worker that vanished on another machine: ``reap`` (``klayer search reap``) fails
those RUNNING for longer than a given time and queues them again.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from klayer.search.backend import masked
from klayer.search.faults import fail_trial
from klayer.search.space import SearchError, describe_space, fmt_params, fmt_value
from klayer.search.storage import DONE, GRID_STATES, Store, StudyInfo, grid_progress, top_trials

TEST_KEYS = ("test_accuracy", "test_loss")  # trial user attributes shown with show_test


def reap(study: optuna.Study, store: Store, older_than: float,
         retry: bool = True) -> list[FrozenTrial]:
    """Fail the trials RUNNING for longer than ``older_than`` seconds (and queue retries)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t for t, age in _running_for(running, older_than, datetime.now()) if fail_trial(
        study, store, t.number, f"reaped: RUNNING for {fmt_duration(age)} "
        f"({t.user_attrs.get('worker', 'unknown worker')} gone?)", retry)]


def _running_for(trials: Sequence[FrozenTrial], seconds: float,
                 now: datetime) -> list[tuple[FrozenTrial, float]]:
    """The RUNNING trials started at least ``seconds`` ago, with their ages in seconds."""
    return [(t, age) for t in trials if t.state == TrialState.RUNNING and t.datetime_start
            and (age := (now - t.datetime_start).total_seconds()) >= seconds]


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1d', '1h30m' or plain seconds -> seconds."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
        if not parts or "".join(a + b for a, b in parts) != re.sub(r"\s+", "", text):
            raise SearchError(f"duration {text!r}: use e.g. 90s, 30m, 2h, 1d or 1h30m") from None
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        seconds = sum(float(a) * unit[b] for a, b in parts)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise SearchError(f"duration {text!r} must be a finite number of seconds >= 0")
    return seconds


def fmt_duration(seconds: float) -> str:
    """Seconds as '42s', '5m07s', '3h12m' or '2d04h'."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def stuck_after(trials: Sequence[FrozenTrial]) -> float:
    """Seconds after which a RUNNING trial looks abandoned: 3x the median COMPLETE trial."""
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
            if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete]
    return max(3 * statistics.median(took), 300.0) if took else 3600.0


def status_text(study: optuna.Study, info: StudyInfo, stuck: float | None = None,
                show_test: bool = False) -> str:
    """A grid study's points, the trial table, the best trial and a warning about trials
    stuck in RUNNING; test accuracies only with ``show_test``."""
    trials = study.get_trials(deepcopy=False)
    now = datetime.now()
    counts = Counter(t.state for t in trials)
    lines = [f"study {info.name} ({masked(info.storage)}), sampler {info.sampler}, "
             f"klayer {info.version}"]
    if info.parent:
        lines.append(f"child of {info.parent.get('study')} (top {info.parent.get('top_k')} "
                     f"trials {info.parent.get('trials')})")
    done = sum(counts[s] for s in DONE)
    lines += [f"space: {describe_space(info.space)}",
              f"pruner: {info.pruner.describe()}",
              f"{done}/{info.n_trials} done: {counts[TrialState.COMPLETE]} COMPLETE, "
              f"{counts[TrialState.PRUNED]} PRUNED; {counts[TrialState.RUNNING]} RUNNING, "
              f"{counts[TrialState.WAITING]} WAITING, {counts[TrialState.FAIL]} FAIL"]
    if info.grid is not None:
        lines += ["", *_grid_lines(info.grid, trials, show_test,
                                   "grid" if info.sampler == "grid" else "queued")]
    lines += ["", *_trial_table(trials, list(info.space), now, show_test), "",
              _best_line(study, show_test)]
    limit = stuck if stuck is not None else stuck_after(trials)
    late = _running_for(trials, limit, now)
    if late:  # their workers may be gone
        who = ", ".join(f"#{t.number} ({t.user_attrs.get('worker', '?')}, {fmt_duration(age)})"
                        for t, age in late)
        lines.append(f"warning: {len(late)} trial(s) RUNNING for more than "
                     f"{fmt_duration(limit)}: {who}; if their workers are gone, klayer search "
                     f"reap --study {info.name} --older-than {fmt_duration(limit)} marks them "
                     "FAIL and queues them again")
    return "\n".join(lines)


def _grid_lines(points: list[dict[str, Any]], trials: Sequence[FrozenTrial],
                show_test: bool, what: str = "grid") -> list[str]:
    """A grid study's points: how many are in each state, then one line per point with
    its state and trials (the COMPLETE one with its accuracy)."""
    progress = grid_progress(points, list(trials))
    counts = ", ".join(f"{sum(s == name for _, s, _ in progress)} {name}"
                       for name in GRID_STATES.values())
    rows = []
    for point, state, ts in progress:
        done = [t for t in ts if t.state == TrialState.COMPLETE]
        result = f"val {done[0].value:.2%}" if done and done[0].value is not None else ""
        if result and show_test:
            result += _test_text(done[0])
        rows.append([fmt_params(point), state, " ".join(f"#{t.number}" for t in ts), result])
    return [f"{what}: {len(points)} points: {counts}", *_columns(rows, indent="  ")]


def _test_text(t: FrozenTrial) -> str:
    """'  test 41.20%' for a trial that recorded its test accuracy, else ''."""
    test = t.user_attrs.get("test_accuracy")
    return f"  test {test:.2%}" if isinstance(test, float) else ""


def _trial_table(trials: Sequence[FrozenTrial], keys: list[str], now: datetime,
                 show_test: bool = False) -> list[str]:
    """One line per trial under a header, columns padded to their widest cell; the test
    accuracy column only with ``show_test``."""
    header = ["#", "state", "val acc", *(["test acc"] if show_test else []), *keys,
              "worker", "age", "note"]
    rows = []
    for t in trials:
        age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
        test = t.user_attrs.get("test_accuracy")
        note = t.user_attrs.get("fail_reason", "")
        if t.state == TrialState.PRUNED:
            note = f"pruned at step {t.user_attrs.get('pruned_step', t.last_step)}" + (
                f" of {t.user_attrs['steps']}" if "steps" in t.user_attrs else "")
        if t.state == TrialState.FAIL and not note:  # klayer records a reason for all others
            note = "no heartbeat: its worker died or hung (failed by Optuna)"
        if "failed_trial" in t.system_attrs:
            note = (note + " " if note else "") + f"retry of #{t.system_attrs['failed_trial']}"
        rows.append([str(t.number), t.state.name,
                     f"{t.value:.2%}" if t.value is not None else "",
                     *([f"{test:.2%}" if isinstance(test, float) else ""] if show_test else []),
                     *[fmt_value(t.params[k]) if k in t.params else "" for k in keys],
                     str(t.user_attrs.get("worker", "")),
                     fmt_duration(age) if t.datetime_start else "", note[:60]])
    return _columns([header, *rows])


def _columns(rows: list[list[str]], indent: str = "") -> list[str]:
    """Rows of cells as lines, each column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _best_line(study: optuna.Study, show_test: bool = False) -> str:
    """The best trial by validation accuracy (its test accuracy with ``show_test``)."""
    best = top_trials(study, 1)
    if not best:
        return "best: none yet (no COMPLETE trial)"
    b = best[0]
    return (f"best: #{b.number}  val {b.value:.2%}" + (_test_text(b) if show_test else "")
            + f"  {fmt_params(b.params)}")


def trials_json(study: optuna.Study, show_test: bool = False) -> list[dict[str, Any]]:
    """Every trial as a JSON-ready dict (``klayer search status --json``); the test
    accuracy and loss only with ``show_test``."""
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "user_attrs": {k: v for k, v in t.user_attrs.items()
                            if show_test or k not in TEST_KEYS},
             "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
             "datetime_complete": (t.datetime_complete.isoformat()
                                   if t.datetime_complete else None),
             "retry_of": t.system_attrs.get("failed_trial")}
            for t in study.get_trials(deepcopy=False)]


def created_text(info: StudyInfo, asked: int | None, top_k: int, parent: str | None,
                 storage_given: bool) -> str:
    """What ``search init`` made, with a note when a grid overrides --trials, and the
    worker command to run next (never with a password: a pasted masked URL would fail)."""
    where = masked(info.storage)
    lines = [f"created study {info.name} in {where}"]
    if info.grid is not None:
        lines.append(f"  {len(info.grid)} points, each queued once, sampler {info.sampler}")
        if asked is not None and asked != len(info.grid):
            lines.append(f"  note: grid has {len(info.grid)} points: the study runs "
                         f"{len(info.grid)} trials, not the {asked} asked")
    else:
        lines.append(f"  {info.n_trials} trials (COMPLETE or PRUNED) wanted, sampler "
                     f"{info.sampler}")
    lines.append(f"  pruner: {info.pruner.describe()}")
    lines.append(f"  space: {describe_space(info.space)}")
    if info.parent is not None:
        lines.append(f"  from the top {top_k} trials of {parent}: {info.parent['trials']}")
    lines.append(f"  data {info.fingerprint[:23]}..., klayer {info.version}")
    secret = where != info.storage
    hint = (' --storage "$KLAYER_STORAGE"' if secret else f" --storage {where}"
            ) if storage_given else ""
    lines.append(f"next: klayer search worker --study {info.name}{hint} --jobs 2")
    if storage_given and secret:
        lines.append("  (export KLAYER_STORAGE=<the URL> first, or use a password-less URL "
                     "with PGPASSWORD or ~/.pgpass: `ps` shows command lines to every user)")
    return "\n".join(lines)


def finished_in_order(trials: Sequence[FrozenTrial]) -> list[tuple[float, FrozenTrial]]:
    """The COMPLETE and PRUNED trials in the order they ended, each with the seconds from
    the study's first trial start to its end."""
    ended = sorted(((t.datetime_complete, t) for t in trials
                    if t.datetime_complete and t.state in DONE),
                   key=lambda e: (e[0], e[1].number))
    starts = [t.datetime_start for t in trials if t.datetime_start]
    if not ended or not starts:
        return []
    first = min(starts)
    return [((end - first).total_seconds(), t) for end, t in ended]


def save_progress_plot(study: optuna.Study, info: StudyInfo, path: Path) -> Path:
    """``search status --plot``: best-so-far validation accuracy against wall time and
    against trials ended, the pruned trials marked (where a search stops paying off)."""
    from klayer.report.plots import plot_best_so_far, save_panels  # matplotlib: only here
    ended = finished_in_order(study.get_trials(deepcopy=False))
    if not ended:
        raise SearchError(f"study {info.name!r} has no COMPLETE or PRUNED trial to plot yet")
    values = [t.value for _, t in ended]
    pruned = [t.state == TrialState.PRUNED for _, t in ended]
    minutes = [s / 60 for s, _ in ended]
    count = list(range(1, len(ended) + 1))
    return save_panels(path, [
        (f"{info.name}: against wall time", lambda ax: plot_best_so_far(
            ax, minutes, values, pruned, "minutes since the first trial started")),
        (f"pruner {info.pruner.pruner}: against trials", lambda ax: plot_best_so_far(
            ax, count, values, pruned, "trials ended"))])
