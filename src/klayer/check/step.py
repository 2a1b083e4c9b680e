"""Two more checks: a student's update step, and a student's gradient function.

``check_step`` catches what no gradient shows: a parameter updated with another one's
gradient (gamma with beta's), the wrong sign, a missing learning rate, no update at all.
``check_function`` calls a student's ``compute_gradients(X, Y, W, b, gamma, beta, lam)``
on a case and compares what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from klayer.check.course import Array, Case, backward, forward
from klayer.check.diagnose import TOL, Report, compare, rel_error
from klayer.check.layout import column_shapes


def check_step(case: Case, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
               eta: float) -> list[str]:
    """One line per parameter: whether ``after`` = ``before`` - eta * its gradient.

    The gradients are the student's (``grad_*`` arrays in ``before``) where given, else
    the exact ones at ``before``'s parameters. A wrong update is explained where it can
    be: another parameter's gradient, the wrong sign, no learning rate, no update.
    """
    shapes, _ = column_shapes(case)
    params = {n: _shaped(before[n], s) for n, s in shapes.items() if n in before}
    stepped = _with_params(case, params)
    exact = backward(stepped, forward(stepped))
    grads = {n: _shaped(before.get("grad_" + n, exact[n]), s) for n, s in shapes.items()}
    lines = []
    for name, p in params.items():
        if name not in after:
            lines.append(f"{name}: missing in the file after the step")
            continue
        got = _shaped(after[name], shapes[name])
        guesses = {f"updated with {o}'s gradient": p - eta * grads[o]
                   for o in grads if o != name and grads[o].shape == p.shape}
        guesses.update({"updated in the wrong direction (+ eta grad)": p + eta * grads[name],
                        "updated without the learning rate": p - grads[name],
                        "not updated": p})
        verdict = "ok" if _close(got, p - eta * grads[name]) else next(
            (f"WRONG: {g}" for g, v in guesses.items() if _close(got, v)), "WRONG")
        lines.append(f"{name}: {verdict}  [course: {name} <- {name} - eta grad {name}]")
    return lines


def _close(a: Array, b: Array) -> bool:
    return a.shape == b.shape and rel_error(a, b, 1e-12) <= TOL


def _shaped(a: Any, shape: tuple[int, ...]) -> Array:
    a = np.asarray(a, np.float64)
    return a.reshape(shape) if a.size == int(np.prod(shape)) else a


def _with_params(case: Case, params: dict[str, Array]) -> Case:
    k = case.k
    pick = [[params.get(f"{g}{l}", getattr(case, g)[l - 1]) for l in range(1, m + 1)]
            for g, m in (("W", k), ("b", k), ("gamma", len(case.gamma)),
                         ("beta", len(case.beta)))]
    W, b, gamma, beta = pick
    return Case(case.X, case.Y, W, b, gamma, beta, case.lam, case.eps)


def check_function(compute_gradients: Callable[..., Any], case: Case,
                   layout: str = "auto") -> Report:
    """Call ``compute_gradients(X, Y, W, b, gamma, beta, lam)`` (lists of the case's
    arrays, columns) and compare what it returns: a dict of named gradients, or the
    lists (grad_W, grad_b) or (grad_W, grad_b, grad_gamma, grad_beta)."""
    copy = [[a.copy() for a in getattr(case, g)] for g in ("W", "b", "gamma", "beta")]
    out = compute_gradients(case.X.copy(), case.Y.copy(), *copy, case.lam)
    if isinstance(out, dict):
        return compare(case, out, layout)
    mine = {f"grad_{g}{l}": a for g, arrays in zip(("W", "b", "gamma", "beta"), out, strict=False)
            for l, a in enumerate(arrays, 1)}
    return compare(case, mine, layout)
