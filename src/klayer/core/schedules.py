"""Learning-rate schedules: pure functions of the update step t (0-based).

``lr(t)`` is the learning rate used for update t, i.e. after t updates have been done
(as nanoGPT's ``get_lr(it)``). Being pure, a schedule needs no state in a checkpoint:
resuming at step t just evaluates it at t. ``make_schedule`` binds a registered
schedule's settings (validated) and returns a function of t alone;
``resolve_total_steps`` turns a training length in cycles, epochs or steps into steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

Schedule = Callable[[int], float]


def constant(t: int, eta: float) -> float:
    """eta at every step."""
    return eta


def cyclic(t: int, eta_min: float, eta_max: float, n_s: int) -> float:
    """The assignment's triangular cyclical learning rate (Smith 2017), period 2 n_s.

    In cycle l, eta rises linearly from eta_min at t = 2 l n_s to eta_max at
    (2l + 1) n_s, then falls linearly back to eta_min at 2 (l + 1) n_s. Equals torch's
    CyclicLR(base_lr=eta_min, max_lr=eta_max, step_size_up=n_s, mode="triangular").
    """
    p = t % (2 * n_s)  # position within the current cycle l = t // (2 n_s)
    if p <= n_s:
        return eta_min + p / n_s * (eta_max - eta_min)
    return eta_max - (p - n_s) / n_s * (eta_max - eta_min)


def step_decay(t: int, eta: float, drop: float, every: int) -> float:
    """eta * drop ** floor(t / every): multiply by ``drop`` after every ``every`` steps."""
    return eta * drop ** (t // every)


def exponential(t: int, eta: float, gamma: float, every: int = 1) -> float:
    """eta * gamma ** (t / every): smooth decay by a factor gamma per ``every`` steps.

    Unlike ``step_decay`` the exponent is continuous, so the rate falls a little at
    every step; with every=1 it is torch's ExponentialLR.
    """
    return eta * gamma ** (t / every)


def one_cycle(
    t: int,
    eta_max: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """Cosine one-cycle (Smith & Topin), as torch's OneCycleLR(anneal_strategy="cos").

    Two phases, as torch with three_phase=False: a cosine rise from
    eta_max / div_factor at t = 0 to eta_max at t = pct_start * total_steps - 1 (a
    float), then a cosine fall to eta_max / (div_factor * final_div_factor) at
    t = total_steps - 1. If the first phase ends at or before t = 0 the run starts in
    the second. Beyond total_steps - 1 the rate stays at its final value (torch raises
    after total_steps and would turn back up); a first phase of zero length gives
    eta_max at t = 0 (torch divides by zero).
    """
    initial = eta_max / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * total_steps) - 1
    down_end = float(total_steps - 1)
    if t <= up_end:
        start, end, frac = initial, eta_max, t / up_end if up_end > 0 else 1.0
    else:
        start, end, frac = eta_max, final, (t - up_end) / (down_end - up_end)
    return end + (start - end) / 2.0 * (math.cos(math.pi * min(frac, 1.0)) + 1)


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "cyclic": cyclic,
    "step": step_decay,
    "exponential": exponential,
    "one_cycle": one_cycle,
}
_REQUIRED = {
    "constant": {"eta"},
    "cyclic": {"eta_min", "eta_max", "n_s"},
    "step": {"eta", "drop", "every"},
    "exponential": {"eta", "gamma"},
    "one_cycle": {"eta_max", "total_steps"},
}
_OPTIONAL = {"exponential": {"every"}, "one_cycle": {"pct_start", "div_factor", "final_div_factor"}}
_POSITIVE = {"eta", "eta_min", "eta_max", "drop", "gamma", "div_factor", "final_div_factor"}
_COUNTS = {"n_s", "every", "total_steps"}


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_value(key: str, value: Any) -> None:
    """Raise ValueError naming ``key`` if ``value`` is not valid for it."""
    if key in _COUNTS:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    elif not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    elif key in _POSITIVE and not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
    elif key == "pct_start" and not 0 < value < 1:
        raise ValueError(f"pct_start must be in (0, 1), got {value!r}")


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """The schedule ``name`` with its settings bound: a function of the step t alone.

    Raises ValueError for an unknown name (listing the valid ones), for missing or
    unknown settings (naming them) and for invalid values (naming the key).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    required, allowed = _REQUIRED[name], _REQUIRED[name] | _OPTIONAL.get(name, set())
    if missing := sorted(required - set(kwargs)):
        raise ValueError(f"schedule {name!r} needs {', '.join(missing)}")
    if unknown := sorted(set(kwargs) - allowed):
        raise ValueError(f"schedule {name!r} takes no {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(allowed))}")
    for key, value in kwargs.items():
        _check_value(key, value)
    if name == "cyclic" and kwargs["eta_min"] > kwargs["eta_max"]:
        raise ValueError(f"eta_min ({kwargs['eta_min']}) must not exceed "
                         f"eta_max ({kwargs['eta_max']})")
    fn, bound = SCHEDULES[name], dict(kwargs)

    def lr(t: int) -> float:
        return float(fn(t, **bound))

    return lr


def _ceil(x: float) -> int:
    """ceil, forgiving float noise: 0.1 * 30 = 3.0000000000000004 counts as 3."""
    return math.ceil(round(x, 9))


def resolve_total_steps(
    schedule: str,
    *,
    steps_per_epoch: int,
    n_s: int | None = None,
    cycles: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
) -> int:
    """Training length in update steps from exactly one of cycles, epochs or steps.

    epochs -> ceil(epochs * steps_per_epoch); cycles (cyclic only, which needs n_s) ->
    round(cycles * 2 n_s); steps as given. The length asked for is the length that runs:
    a cyclic run that ends mid-cycle simply stops where its rate is then.
    """
    given = {k: v for k, v in (("cycles", cycles), ("epochs", epochs), ("steps", steps))
             if v is not None}
    if len(given) != 1:
        got = ", ".join(sorted(given)) or "none"
        raise ValueError(f"give exactly one of cycles, epochs, steps (got {got})")
    key, value = next(iter(given.items()))
    if not _is_real(value) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    if key == "steps" and not isinstance(value, numbers.Integral):
        raise ValueError(f"steps must be an integer, got {value!r}")
    if not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    if schedule != "cyclic":
        if key == "cycles":
            raise ValueError(f"cycles only applies to the cyclic schedule, not {schedule!r}")
        return int(steps) if steps is not None else _ceil(value * steps_per_epoch)
    if n_s is None or not isinstance(n_s, numbers.Integral) or n_s < 1:
        raise ValueError(f"the cyclic schedule needs n_s, an integer >= 1, got {n_s!r}")
    if key == "cycles":
        return max(1, round(value * 2 * int(n_s)))
    return int(steps) if steps is not None else _ceil(value * steps_per_epoch)
