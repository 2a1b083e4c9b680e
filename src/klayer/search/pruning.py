"""Pruning: stop hopeless trials early, the same way on every worker of a study.

A study's pruner is set once, at ``klayer search init``, and stored as the study user
attribute ``pruner`` (``PrunerSettings.to_attr``); every worker, on every machine, builds
the same Optuna pruner from it (``make_pruner``). The resource is training steps: a trial
reports its validation accuracy at every evaluation (``--evals-per-cycle`` per cycle) with
its step number, and the pruner may stop it at any of those reports.

- ``sha``: Optuna's ``SuccessiveHalvingPruner`` (asynchronous successive halving, ASHA):
  rungs at ``min_resource * reduction_factor**k`` steps; a trial reaching a rung goes on
  only if it is in the top ``1 / reduction_factor`` of the trials that reached it so far.
- ``hyperband``: Optuna's ``HyperbandPruner``: several such brackets, each with its own
  minimum resource, up to the training's length.
- ``median``: Optuna's ``MedianPruner``: stop a trial below the median of the others at
  the same step, after ``min_resource`` steps and 5 finished trials.
- ``none``: every trial trains to its end.

The defaults, chosen by ``benchmarks/pruning_replay.py`` over nine full-budget runs of
the assignment's lambda search (README, "Pruning"): one rung, at half of the base
configuration's training (with 2 cycles: the end of the first, where the cyclical rate
is lowest), past which the best quarter of the trials go on. Earlier rungs fall where
the rate is high and the accuracies say little about the end: there the pruner stops
the eventual best trial too often.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from klayer.search.space import SearchError

PRUNERS = ("none", "median", "sha", "hyperband")
DEFAULT_PRUNER = "sha"  # measured: benchmarks/search_pruning.py (README, "Pruning")
DEFAULT_REDUCTION = 4  # with min = total / 2 (README, "Pruning")
MEDIAN_STARTUP = 5  # finished trials before the median pruner prunes anything
KEYS = ("pruner", "min_resource", "reduction_factor")  # flags and TOML keys of search init


@dataclass(frozen=True)
class PrunerSettings:
    """A study's pruner: its kind, and its resources in training steps."""

    pruner: str = "none"
    min_resource: int = 1
    reduction_factor: int = DEFAULT_REDUCTION
    max_resource: int = 1  # the base configuration's training length

    def to_attr(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attr(cls, attr: dict[str, Any] | None) -> PrunerSettings:
        """The stored settings; a study made before pruners: none."""
        return cls() if not attr else cls(**{k: attr[k] for k in asdict(cls()) if k in attr})

    def describe(self) -> str:
        """One line, e.g. 'sha (min 1000 steps, reduction factor 3, of 9000)'."""
        if self.pruner == "none":
            return "none (every trial trains to its end)"
        if self.pruner == "median":
            return (f"median (after {self.min_resource} steps and {MEDIAN_STARTUP} finished "
                    f"trials, of {self.max_resource})")
        return (f"{self.pruner} (min {self.min_resource} steps, reduction factor "
                f"{self.reduction_factor}, of {self.max_resource})")


def pruner_settings(pruner: str | None, min_resource: int | None,
                    reduction_factor: int | None, total_steps: int) -> PrunerSettings:
    """Checked settings for a study whose base configuration trains ``total_steps`` steps
    (None: the defaults); SearchError naming the flag otherwise."""
    name = DEFAULT_PRUNER if pruner is None else pruner
    if name not in PRUNERS:
        raise SearchError(f"--pruner {name!r}: valid: {', '.join(PRUNERS)}")
    rf = DEFAULT_REDUCTION if reduction_factor is None else reduction_factor
    if isinstance(rf, bool) or not isinstance(rf, int) or rf < 2:
        raise SearchError(f"--reduction-factor must be an integer >= 2, got {rf!r}")
    low = max(total_steps // 2, 1) if min_resource is None else min_resource
    if isinstance(low, bool) or not isinstance(low, int) or not 1 <= low < total_steps:
        raise SearchError(f"--min-resource must be an integer number of training steps in "
                          f"[1, {total_steps}) (the base configuration trains {total_steps} "
                          f"steps), got {low!r}")
    if name == "none":
        return PrunerSettings("none", max_resource=total_steps)
    return PrunerSettings(name, low, rf, total_steps)


def make_pruner(settings: PrunerSettings) -> optuna.pruners.BasePruner:
    """The Optuna pruner of these settings (``NopPruner`` for none)."""
    s = settings
    if s.pruner == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=s.min_resource, reduction_factor=s.reduction_factor)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=s.min_resource, max_resource=s.max_resource,
            reduction_factor=s.reduction_factor)
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP,
                                           n_warmup_steps=s.min_resource)
    return optuna.pruners.NopPruner()
