"""Numerical gradient checking: centered finite differences against the analytic backward pass.

The course's ComputeGradsNumSlow, for every element (or a random sample of elements)
of every parameter tensor:

    g_n = (J(theta + h e_i) - J(theta - h e_i)) / (2 h)

compared with the analytic g_a by the relative error |g_a - g_n| / max(floor, |g_a| + |g_n|)
and the absolute error |g_a - g_n|. Checks always run in float64 on a copy of the
network, in training mode (batch statistics, a fixed dropout mask), and never touch
the original's running statistics.

The analytic gradients are computed in float64; J for the differences is evaluated in
extended precision (``np.longdouble``, 64-bit mantissa on x86). In float64 the
difference quotient carries round-off of about eps |J| / h ~ 5e-11, as large as many
true gradient elements of a 9-layer net, and exactly-zero gradients (the bias of a
layer followed by batch norm) would look like large relative errors. Extended
precision lowers that floor ~2000x, so h can shrink to 2e-6 and truncation error
(~h^2) drops with it. Where longdouble is plain float64 (Windows, Apple silicon) the
check falls back to h = 1e-5 and float64 accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from klayer.core.config import NetConfig
from klayer.core.layers import Array
from klayer.core.losses import Mix, log_softmax
from klayer.core.network import Labels, Network


def default_step() -> float:
    """h balancing truncation (~h^2) against round-off (~eps |J| / h) in NUMERIC_DTYPE."""
    return 2e-6 if np.finfo(np.longdouble).eps < 1e-18 else 1e-5


# Below this magnitude |g_a| + |g_n| is treated as zero when dividing. Float64 central
# differences with h = 1e-5 carry round-off near eps * |J| / h ~ 1e-11, so a floor well
# above it keeps exactly-zero gradients (e.g. a bias followed by batch norm) from
# reporting pure noise as error, while every real gradient is still measured relatively.
REL_FLOOR = 1e-6
NUMERIC_DTYPE = "longdouble"


def default_tol() -> float:
    """The max relative error that still passes: a margin above what correct code measures.

    With extended precision, correct gradients of 2- to 9-layer nets (d = 20, n = 10,
    with and without batch norm, dropout, skips) measure at most ~2.2e-7: a bias feeding
    batch norm, whose exactly-zero gradient is measured against REL_FLOOR; a backward-pass
    bug of 0.1 % measures 5e-4 to 1e-3. In the float64 fallback round-off alone gives
    ~9e-5 on those biases, and deep batch-norm nets can exceed any bound that still
    catches bugs (see the README).
    """
    return 1e-6 if np.finfo(np.longdouble).eps < 1e-18 else 1e-3


def rel_error(a: Array, b: Array, floor: float = REL_FLOOR) -> float:
    """max |a - b| / max(floor, |a| + |b|) over all elements."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float((np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), floor)).max())


@dataclass(frozen=True)
class GradCheckRow:
    """The result for one parameter tensor."""

    name: str
    shape: tuple[int, ...]
    checked: int  # elements compared
    max_rel_error: float
    max_abs_error: float
    max_abs_grad: float  # largest analytic |g| among the checked elements, for scale

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def check_gradients(net: Network, X: Array, y: Labels, lam: float = 0.0,
                    h: float | None = None, sample: int | None = None, seed: int = 0,
                    label_smoothing: float = 0.0, mix: Mix | None = None) -> list[GradCheckRow]:
    """Compare analytic and numerical gradients of J for every parameter tensor of ``net``.

    ``sample`` limits each tensor to that many randomly chosen elements (the sampled
    variant for large nets); None checks every element. ``seed`` fixes the element
    sample and the dropout mask (the same mask for every evaluation of J). ``h`` is
    the finite-difference step (default: ``default_step()``).
    """
    h = default_step() if h is None else h
    net = net.astype("float64")
    X, y = net.check_inputs(X, y)
    hi = net.astype(NUMERIC_DTYPE)  # J evaluated in extended precision, see module doc
    X_hi = X.astype(NUMERIC_DTYPE)

    def J() -> np.floating:  # training-mode cost, fixed dropout mask, stats untouched
        scores, _ = hi.forward(X_hi, train=True, rng=np.random.default_rng(seed),
                               update_stats=False)
        logp = log_softmax(scores)  # kept in extended precision: no float() round trip

        def nll(labels: Labels) -> Array:  # (n,)
            out = -logp[np.arange(len(labels)), labels]
            if label_smoothing:
                out = (1 - label_smoothing) * out - label_smoothing * logp.mean(axis=1)
            return out

        loss = nll(y)
        if mix is not None:  # the mixed target's cross-entropy: w CE(y) + (1 - w) CE(y2)
            w = mix[1].astype(NUMERIC_DTYPE)
            loss = w * loss + (1 - w) * nll(mix[0])
        return loss.mean() + lam * sum((W * W).sum() for W in hi.weights())

    _, _, grads = net.loss_and_grads(X, y, lam, rng=np.random.default_rng(seed),
                                     label_smoothing=label_smoothing, check=False, mix=mix)
    pick = np.random.default_rng([seed, 1])
    rows = []
    for name, param in hi.params.items():
        flat = param.reshape(-1)  # a view: writing flat[i] perturbs the parameter
        idx = np.arange(flat.size)
        if sample is not None and sample < flat.size:
            idx = np.sort(pick.choice(flat.size, size=sample, replace=False))
        g_num = _central_differences(J, flat, idx, h)
        g_an = grads[name].reshape(-1)[idx]
        rows.append(GradCheckRow(name, tuple(param.shape), len(idx), rel_error(g_an, g_num),
                                 float(np.abs(g_an - g_num).max()), float(np.abs(g_an).max())))
    return rows


def _central_differences(J: Callable[[], np.floating], flat: Array, idx: np.ndarray,
                         h: float) -> Array:
    """(J(theta + h e_i) - J(theta - h e_i)) / 2h for each i in idx, perturbing ``flat``
    (a view of one parameter) in place and restoring it."""
    g_num = np.empty(len(idx), NUMERIC_DTYPE)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        j_plus = J()
        flat[i] = old - h
        j_minus = J()
        flat[i] = old
        g_num[j] = (j_plus - j_minus) / (2 * h)
    return g_num


def make_check_problem(config: NetConfig, n: int = 10,
                       seed: int = 0) -> tuple[Network, Array, Labels]:
    """A float64 network with non-default b, gamma, beta and random data (n, d) to check.

    Zero biases, unit gamma and zero beta could hide a backward-pass bug (a term that
    vanishes at the defaults), so all three are drawn at random.
    """
    rng = np.random.default_rng(seed)
    net = Network(replace(config, dtype="float64"), rng=rng)
    for name, p in net.params.items():
        if name.startswith("gamma"):
            p[...] = rng.uniform(0.5, 1.5, p.shape)
        elif name.startswith(("b", "beta")):
            p[...] = rng.normal(0.0, 0.1, p.shape)
    X = rng.standard_normal((n, config.d))
    y = rng.integers(0, config.num_classes, size=n)
    return net, X, y


def format_table(rows: list[GradCheckRow]) -> str:
    """One line per parameter tensor."""
    head = f"{'param':<8} {'shape':>10} {'checked':>8} {'max rel err':>12} {'max abs err':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<8} {shape:>10} {r.checked:>8} "
                     f"{r.max_rel_error:>12.3e} {r.max_abs_error:>12.3e}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    """Whether every tensor's max relative error is within ``tol``, and the worst tensor."""

    passed: bool
    worst: str  # name of the tensor with the largest max relative error
    max_rel_error: float
    tol: float

    def line(self) -> str:
        """The final ``PASS`` / ``FAIL`` line of ``klayer gradcheck``."""
        word, cmp = ("PASS", "<=") if self.passed else ("FAIL", ">")
        return (f"{word}: max relative error {self.max_rel_error:.3e} ({self.worst}) "
                f"{cmp} tol {self.tol:g}")


def judge(rows: list[GradCheckRow], tol: float) -> Verdict:
    """PASS when every tensor's max relative error is <= ``tol``; a NaN error fails."""
    worst = max(rows, key=lambda r: np.inf if np.isnan(r.max_rel_error) else r.max_rel_error)
    return Verdict(passed=all(r.max_rel_error <= tol for r in rows), worst=worst.name,
                   max_rel_error=worst.max_rel_error, tol=tol)
