"""Learning-rate schedules: closed forms, torch's schedulers as oracles, validation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klayer.core.schedules import (
    SCHEDULES,
    constant,
    cyclic,
    exponential,
    make_schedule,
    one_cycle,
    resolve_total_steps,
    step_decay,
)

ETA_MIN, ETA_MAX, N_S = 1e-5, 1e-1, 500


def assignment_cyclic(t: int, eta_min: float, eta_max: float, n_s: int) -> float:
    """The assignment's two-branch formula, written out with the cycle index l."""
    l = t // (2 * n_s)
    if 2 * l * n_s <= t <= (2 * l + 1) * n_s:
        return eta_min + (t - 2 * l * n_s) / n_s * (eta_max - eta_min)
    return eta_max - (t - (2 * l + 1) * n_s) / n_s * (eta_max - eta_min)


def test_cyclic_corners_and_interior() -> None:
    for k in range(7):  # t = k n_s: eta_min at even k, eta_max at odd k
        expected = ETA_MAX if k % 2 else ETA_MIN
        assert cyclic(k * N_S, ETA_MIN, ETA_MAX, N_S) == pytest.approx(expected, rel=1e-12)
    span = ETA_MAX - ETA_MIN
    assert cyclic(125, ETA_MIN, ETA_MAX, N_S) == pytest.approx(ETA_MIN + 0.25 * span, rel=1e-12)
    assert cyclic(750, ETA_MIN, ETA_MAX, N_S) == pytest.approx(ETA_MIN + 0.5 * span, rel=1e-12)
    assert cyclic(2400, ETA_MIN, ETA_MAX, N_S) == pytest.approx(ETA_MIN + 0.8 * span, rel=1e-12)
    assert cyclic(2900, ETA_MIN, ETA_MAX, N_S) == pytest.approx(ETA_MIN + 0.2 * span, rel=1e-12)
    for t in (1, 17, 499, 501, 999, 1001, 1234, 2222, 4999):
        ref = assignment_cyclic(t, ETA_MIN, ETA_MAX, N_S)
        assert cyclic(t, ETA_MIN, ETA_MAX, N_S) == pytest.approx(ref, rel=1e-12)


@given(t=st.integers(0, 10**6), n_s=st.integers(1, 5000))
def test_cyclic_bounds_and_period(t: int, n_s: int) -> None:
    lr = cyclic(t, ETA_MIN, ETA_MAX, n_s)
    assert ETA_MIN - 1e-15 <= lr <= ETA_MAX + 1e-15
    assert lr == pytest.approx(cyclic(t + 2 * n_s, ETA_MIN, ETA_MAX, n_s), rel=1e-12)
    assert lr == pytest.approx(assignment_cyclic(t, ETA_MIN, ETA_MAX, n_s), rel=1e-12)


def test_step_exponential_constant_closed_forms() -> None:
    assert constant(12345, 0.01) == 0.01
    assert step_decay(0, 0.1, 0.5, 100) == 0.1
    assert step_decay(99, 0.1, 0.5, 100) == 0.1
    assert step_decay(100, 0.1, 0.5, 100) == pytest.approx(0.05, rel=1e-15)
    assert step_decay(350, 0.1, 0.5, 100) == pytest.approx(0.0125, rel=1e-15)
    assert exponential(0, 0.1, 0.9) == 0.1
    assert exponential(3, 0.1, 0.9) == pytest.approx(0.1 * 0.729, rel=1e-14)
    assert exponential(50, 0.1, 0.5, every=100) == pytest.approx(0.1 / math.sqrt(2), rel=1e-14)
    assert exponential(200, 0.1, 0.5, every=100) == pytest.approx(0.025, rel=1e-14)


def test_one_cycle_phase_ends() -> None:
    total, eta_max = 1000, 0.2
    assert one_cycle(0, eta_max, total) == pytest.approx(eta_max / 25, rel=1e-12)
    assert one_cycle(299, eta_max, total) == pytest.approx(eta_max, rel=1e-12)
    assert one_cycle(999, eta_max, total) == pytest.approx(eta_max / 25 / 1e4, rel=1e-12)
    assert one_cycle(5000, eta_max, total) == pytest.approx(eta_max / 25 / 1e4, rel=1e-12)
    mid_up = one_cycle(125, eta_max, 1004, pct_start=0.25, div_factor=10.0)  # up ends at 250
    assert mid_up == pytest.approx((eta_max + eta_max / 10) / 2, rel=1e-12)
    # A warm-up ending at t = 0 (torch divides by zero there) starts at eta_max.
    assert one_cycle(0, eta_max, 10, pct_start=0.1) == eta_max


def test_make_schedule_binds_settings() -> None:
    lr = make_schedule("cyclic", eta_min=ETA_MIN, eta_max=ETA_MAX, n_s=N_S)
    assert [lr(t) for t in (0, N_S, 2 * N_S)] == [cyclic(t, ETA_MIN, ETA_MAX, N_S)
                                                  for t in (0, N_S, 2 * N_S)]
    assert make_schedule("step", eta=0.1, drop=0.1, every=10)(25) == pytest.approx(1e-3)
    assert make_schedule("exponential", eta=0.1, gamma=0.5)(1) == pytest.approx(0.05)
    assert make_schedule("constant", eta=0.3)(7) == 0.3
    assert isinstance(make_schedule("one_cycle", eta_max=0.1, total_steps=10)(3), float)
    assert set(SCHEDULES) == {"constant", "cyclic", "step", "exponential", "one_cycle"}


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("triangle", {}, r"unknown schedule 'triangle'; valid: constant, cyclic, step"),
        ("cyclic", {"eta_min": 1e-5, "eta_max": 0.1}, r"needs n_s"),
        ("constant", {"eta": 0.1, "lr": 0.2}, r"takes no lr; valid: eta"),
        ("exponential", {"eta": 0.1, "gamma": 0.9, "evry": 2}, r"takes no evry"),
        ("constant", {"eta": 0.0}, r"eta must be > 0"),
        ("constant", {"eta": "0.1"}, r"eta must be a finite number"),
        ("constant", {"eta": math.nan}, r"eta must be a finite number"),
        ("cyclic", {"eta_min": 0.2, "eta_max": 0.1, "n_s": 5}, r"eta_min .* eta_max"),
        ("cyclic", {"eta_min": 0.01, "eta_max": 0.1, "n_s": 0}, r"n_s must be an integer >= 1"),
        ("cyclic", {"eta_min": 0.01, "eta_max": 0.1, "n_s": 2.5}, r"n_s must be an integer"),
        ("step", {"eta": 0.1, "drop": -0.5, "every": 3}, r"drop must be > 0"),
        ("step", {"eta": 0.1, "drop": 0.5, "every": 0}, r"every must be an integer"),
        ("one_cycle", {"eta_max": 0.1, "total_steps": 10, "pct_start": 1.0}, r"pct_start"),
        ("one_cycle", {"eta_max": 0.1, "total_steps": True}, r"total_steps"),
    ],
)
def test_make_schedule_errors(name: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_schedule(name, **kwargs)


def test_resolve_total_steps_cyclic_runs_the_length_asked() -> None:
    # Issue 20: a length is never rounded up to whole cycles (3 epochs ran 4 before).
    assert resolve_total_steps("cyclic", steps_per_epoch=450, n_s=500, epochs=3) == 1350
    assert resolve_total_steps("cyclic", steps_per_epoch=450, n_s=500, cycles=2) == 2000
    assert resolve_total_steps("cyclic", steps_per_epoch=450, n_s=500, cycles=1.5) == 1500
    assert resolve_total_steps("cyclic", steps_per_epoch=450, n_s=500, steps=1000) == 1000
    assert resolve_total_steps("cyclic", steps_per_epoch=450, n_s=500, steps=10) == 10
    assert resolve_total_steps("cyclic", steps_per_epoch=450, n_s=500, steps=1001) == 1001
    assert resolve_total_steps("cyclic", steps_per_epoch=100, n_s=50, epochs=1) == 100
    lr = make_schedule("cyclic", eta_min=ETA_MIN, eta_max=ETA_MAX, n_s=500)
    assert lr(2000) == pytest.approx(ETA_MIN, rel=1e-12)  # whole cycles end at eta_min


def test_resolve_total_steps_other_schedules() -> None:
    assert resolve_total_steps("constant", steps_per_epoch=450, epochs=2.5) == 1125
    assert resolve_total_steps("one_cycle", steps_per_epoch=450, epochs=0.001) == 1
    assert resolve_total_steps("step", steps_per_epoch=30, epochs=0.1) == 3  # not 4: float noise
    assert resolve_total_steps("exponential", steps_per_epoch=30, steps=77) == 77


@pytest.mark.parametrize(
    ("schedule", "kwargs", "match"),
    [
        ("cyclic", {"n_s": 5}, r"exactly one of cycles, epochs, steps \(got none\)"),
        ("cyclic", {"n_s": 5, "epochs": 1, "steps": 10}, r"exactly one .*got epochs, steps"),
        ("constant", {"cycles": 2}, r"cycles only applies to the cyclic schedule"),
        ("cyclic", {"epochs": 2}, r"needs n_s"),
        ("constant", {"epochs": 0}, r"epochs must be"),
        ("constant", {"steps": 2.5}, r"steps must be an integer"),
    ],
)
def test_resolve_total_steps_errors(schedule: str, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_total_steps(schedule, steps_per_epoch=10, **kwargs)


# --- torch's schedulers as oracles -------------------------------------------------------


def torch_lrs(make_scheduler: Callable[[Any], Any], lr0: float, n: int) -> list[float]:
    """The learning rates torch's scheduler gives for steps 0 .. n-1."""
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr0)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("eta_min", "eta_max", "n_s"), [(1e-5, 1e-1, 7), (0.01, 0.5, 45)])
def test_cyclic_matches_torch_cycliclr(eta_min: float, eta_max: float, n_s: int) -> None:
    torch = pytest.importorskip("torch")
    n = 5 * 2 * n_s + 3
    ref = torch_lrs(lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=eta_min, max_lr=eta_max, step_size_up=n_s, mode="triangular",
        cycle_momentum=False), eta_min, n)
    lr = make_schedule("cyclic", eta_min=eta_min, eta_max=eta_max, n_s=n_s)
    for t in range(n):
        assert lr(t) == pytest.approx(ref[t], rel=1e-12, abs=1e-12), t


@pytest.mark.parametrize(
    ("total", "pct_start", "div", "final_div"),
    [(1000, 0.3, 25.0, 1e4), (97, 0.25, 10.0, 100.0), (10, 0.15, 25.0, 1e4),
     (7, 0.05, 25.0, 1e4), (2, 0.3, 25.0, 1e4), (1, 0.3, 25.0, 1e4)],
)
def test_one_cycle_matches_torch(total: int, pct_start: float, div: float,
                                 final_div: float) -> None:
    torch = pytest.importorskip("torch")
    eta_max = 0.4
    ref = torch_lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=eta_max, total_steps=total, pct_start=pct_start, anneal_strategy="cos",
        three_phase=False, cycle_momentum=False, div_factor=div,
        final_div_factor=final_div), eta_max, total)
    lr = make_schedule("one_cycle", eta_max=eta_max, total_steps=total, pct_start=pct_start,
                       div_factor=div, final_div_factor=final_div)
    for t in range(total):
        assert lr(t) == pytest.approx(ref[t], rel=1e-10), t
