"""Compare a student's gradients (and forward values) with the exact ones; say what is wrong.

The error of one array is the assignment's relative error, max |a - e| / max(floor,
|a| + |e|), with ``floor`` = FLOOR times the largest exact entry of its kind, so that
a gradient that is analytically zero (the bias of a layer before batch norm) compared
with rounding noise is not flagged. An array passes at TOL. When something does not
pass, ``compare`` looks for the explanation in this order: the first wrong forward value
(a forward bug explains every gradient error after it), another batch-norm epsilon (a
convention, not a bug), then the bug models of ``bugs`` (one, else two) whose gradients
reproduce the student's to TOL; else the pattern of wrong parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klayer.check import bugs
from klayer.check.course import Array, Case, Forward, backward, forward, never
from klayer.check.layout import forward_names, to_columns
from klayer.core import gradcheck

TOL = 1e-6
FLOOR = 1e-5
EPS_GRID = (0.0, *(10.0**-p for p in range(1, 17)))


def rel_error(a: Array, exact: Array, floor: float) -> float:
    """``gradcheck.rel_error`` (the assignment's), inf when the shapes differ."""
    return gradcheck.rel_error(a, exact, floor) if a.shape == exact.shape else float("inf")


def _errors(mine: dict[str, Array], exact: dict[str, Array]) -> dict[str, float]:
    """Each of the student's gradients' error, layer 1 first (W, b, gamma, beta)."""
    scale = max((float(np.abs(e).max()) for e in exact.values() if e.size), default=1.0)
    return {name: rel_error(mine[name], exact[name], FLOOR * scale) if name in exact
            else float("inf") for name in sorted(mine, key=_by_layer)}


def _by_layer(name: str) -> tuple[int, int]:
    """W2 -> (2, 0): a gradient's layer, then W, b, gamma, beta."""
    group = name.rstrip("0123456789")
    return int(name[len(group):]), ("W", "b", "gamma", "beta").index(group)


@dataclass
class Report:
    """What ``compare`` found; ``ok`` when the gradients agree (maybe at another epsilon)."""

    ok: bool
    layout: str
    params: dict[str, float]  # name -> max relative error
    forward: dict[str, float] = field(default_factory=dict)
    first_wrong_forward: str | None = None
    eps_case: float = 0.0
    eps_found: float | None = None  # the epsilon the gradients are exact for, if another
    diagnosis: list[str] = field(default_factory=list)  # reproducing bug models, described
    pattern: str = ""  # when no model reproduces the gradients
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "layout": self.layout,
                "params": {n: {"max_rel_err": e, "ok": e <= TOL} for n, e in self.params.items()},
                "forward": {n: {"max_rel_err": e, "ok": e <= TOL}
                            for n, e in self.forward.items()},
                "first_wrong_forward": self.first_wrong_forward,
                "diagnosis": self.diagnosis, "pattern": self.pattern or None,
                "eps": {"case": self.eps_case, "found": self.eps_found}, "notes": self.notes}

    def text(self) -> str:
        lines = [f"layout: {self.layout}", f"{'name':<10}{'max rel err':>14}  verdict"]
        for group in (self.forward, self.params):
            lines += [f"{n:<10}{e:>14.3e}  {'ok' if e <= TOL else 'WRONG'}"
                      for n, e in group.items()]
        lines += self.notes
        if self.first_wrong_forward:
            lines.append(f"first wrong forward value: {self.first_wrong_forward} (a forward "
                         "bug: every gradient after it is wrong too)")
        if self.eps_found is not None:
            lines.append(f"correct for eps = {self.eps_found:g}; the case uses "
                         f"{self.eps_case:g}: a convention, not a bug")
        if self.diagnosis:
            lines.append("diagnosis: these mistakes reproduce your gradients:")
            lines += [f"  - {d}" for d in self.diagnosis]
        elif self.pattern:
            lines.append(self.pattern)
        lines.append(("PASS" if self.ok else "FAIL") + f" (tolerance {TOL:g})")
        return "\n".join(lines)


@dataclass
class _Run:
    """One variant of the course's computation on the case: forward values and gradients."""

    f: Forward
    grads: dict[str, Array]


def _run(case: Case, eps: float, on: Callable[[str, int], bool] = never) -> _Run:
    f = forward(case, eps, on)
    return _Run(f, backward(case, f, eps, on))


def compare(case: Case, mine: dict[str, np.ndarray], layout: str = "auto",
            eps: float | None = None) -> Report:
    """Compare the student's arrays (gradients by name, forward values optional) with the
    exact ones on ``case`` (at ``eps`` if given) and diagnose what differs."""
    eps = case.eps if eps is None else eps
    grads, values, taken, notes = to_columns(case, mine, layout)
    if not grads:
        raise ValueError("no gradients found (expected grad_W1, grad_b1, ... or W1, b1, ...)")
    exact = _run(case, eps)
    report = Report(ok=False, layout=taken, params=_errors(grads, exact.grads),
                    forward=_forward_errors(values, exact.f), eps_case=eps, notes=notes)
    report.first_wrong_forward = next((n for n, e in report.forward.items() if e > TOL), None)
    if all(e <= TOL for e in report.params.values()):
        report.ok = report.first_wrong_forward is None
        if not report.ok:
            report.diagnosis = _cost_diagnosis(case, eps, values, report)
        return report
    if case.batch_norm:
        report.eps_found = _other_eps(case, eps, grads, values)
        report.ok = report.eps_found is not None
    if not report.ok:
        report.diagnosis, partly = diagnose(case, eps, grads, values, exact)
        if not report.diagnosis:
            report.pattern = _pattern(report.params, case.k, partly)
    return report


def _forward_errors(values: dict[str, Array], f: Forward) -> dict[str, float]:
    """Errors of the forward values given, in the order they are computed."""
    exact = forward_values(f)
    order = [n for n in exact if n in values]
    return {n: rel_error(values[n], exact[n], FLOOR * max(float(np.abs(exact[n]).max()), 1e-300))
            for n in order}


def forward_values(f: Forward) -> dict[str, Array]:
    """The forward pass's values by the names students give them, in computation order."""
    out: dict[str, Array] = {}
    for l in range(1, len(f.S)):
        for name, seq in (("S", f.S), ("mu", f.mu), ("v", f.v), ("S_hat", f.S_hat),
                          ("S_tilde", f.S_tilde), ("X", f.X[1:])):
            if l - 1 < len(seq):
                out[f"{name}{l}"] = seq[l - 1]
    out[f"S{len(f.S)}"] = f.S[-1]
    assert f.P is not None
    out["P"], out["J"] = f.P, np.array(f.J)
    assert set(out) <= set(forward_names(len(f.S)))
    return out


def _agrees(run: _Run, grads: dict[str, Array], values: dict[str, Array]) -> bool:
    if any(e > TOL for e in _errors(grads, run.grads).values()):
        return False
    return all(e <= TOL for e in _forward_errors(values, run.f).values())


def _other_eps(case: Case, eps: float, grads: dict[str, Array],
               values: dict[str, Array]) -> float | None:
    """Another epsilon at which the student's arrays are exact, if one of EPS_GRID is."""
    for other in EPS_GRID:
        if other != eps and _agrees(_run(case, other), grads, values):
            return other
    return None


def diagnose(case: Case, eps: float, grads: dict[str, Array], values: dict[str, Array],
             exact: _Run) -> tuple[list[str], list[str]]:
    """(the bug models, single, else pairs, that reproduce the student's arrays; those
    that explain part of what is wrong, with the gradients they reproduce).

    A pair is tried when one of its two mistakes alone already explains part of what
    is wrong (reproduces some wrong gradient): the other mistake's gradients are
    untouched by it, as for two mistakes in different places.
    """
    wrong = {n for n, e in _errors(grads, exact.grads).items() if e > TOL}
    singles = bugs.candidates(case)
    relevant: dict[bugs.Candidate, list[str]] = {}  # -> the wrong gradients it reproduces
    found: list[bugs.Candidate] = []
    for cand in singles:
        run = _run(case, eps, bugs.switch(cand, case))
        errors = _errors(grads, run.grads)
        if _agrees(run, grads, values):
            found.append(cand)
        elif fixed := [n for n, e in errors.items() if n in wrong and e <= TOL]:
            relevant[cand] = fixed
    if not found:
        for a, b in itertools.product(relevant, singles):
            if _pairable(a, b, relevant) and _agrees(
                    _run(case, eps, bugs.switch(a + b, case)), grads, values):
                found.append(a + b)
    partly = sorted(relevant.items(), key=lambda kv: -len(kv[1]))[:3] if not found else []
    return ([bugs.describe(c, case.k).replace("\n", "; and ") for c in _simplest(found)],
            [f"{bugs.describe(c, case.k)} (reproduces {', '.join(fixed)})"
             for c, fixed in partly])


def _pairable(a: bugs.Candidate, b: bugs.Candidate, relevant: dict[bugs.Candidate, Any]) -> bool:
    """Whether to try a + b: two different switches, each pair once, and not a mistake
    'in every layer' with the same mistake in one layer."""
    (name_a, at_a), (name_b, at_b) = a[0], b[0]
    if a == b or (b in relevant and b < a):
        return False
    return name_a != name_b or (at_a != 0 and at_b != 0)


def _simplest(found: list[bugs.Candidate]) -> list[bugs.Candidate]:
    """Drop a per-layer candidate when the same mistake 'in every layer' is found too,
    keeping the shortest description of one explanation."""
    every = {c[0][0] for c in found if len(c) == 1 and c[0][1] == 0}
    return [c for c in found if not (len(c) == 1 and c[0][1] != 0 and c[0][0] in every)]


def _cost_diagnosis(case: Case, eps: float, values: dict[str, Array],
                    report: Report) -> list[str]:
    """Gradients right, a forward value wrong: the cost models that reproduce it."""
    found = [c for c in bugs.candidates(case, bugs.COST_MODELS)
             if all(e <= TOL for e in _forward_errors(
                 values, forward(case, eps, bugs.switch(c, case))).values())]
    return [bugs.describe(c, case.k) for c in found]


def _pattern(params: dict[str, float], k: int, partly: list[str]) -> str:
    """Which parameters are wrong, the first wrong layer from the top, and the mistakes
    that explain part of it."""
    wrong = [n for n, e in params.items() if e > TOL]
    top = max(_by_layer(n)[0] for n in wrong)
    text = (f"no bug model reproduces your gradients. Wrong: {', '.join(wrong)}; the first "
            f"wrong layer from the top (layer {k}) is layer {top}: look there first, and at "
            "the forward values that feed it")
    return text + "".join(f"\n  partly explained by: {p}" for p in partly)
