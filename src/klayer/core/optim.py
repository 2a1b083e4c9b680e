"""Optimizers that update a dict of parameter arrays in place, with PyTorch's conventions.

``opt.step(params, grads, lr)`` applies one update to every array in ``params`` (names
like W1, b1, gamma1, beta1, ...; a leading "W" marks a weight matrix) from the
same-named gradients. The learning rate is an argument, not state, so that a schedule
(a pure function of the step) drives it. The update rules are torch.optim's, term for
term, so results agree with SGD / SGD(momentum, nesterov) / Adam / AdamW to rounding.

State buffers are allocated lazily on the first step with each parameter's shape and
dtype (float32 stays float32), and every update is computed in place through a
per-parameter scratch buffer, so a step allocates nothing after the first.
``state_dict`` / ``load_state_dict`` save and restore the state bit-exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from klayer.core import kernels

Array = npt.NDArray[np.floating]
Params = dict[str, Array]
Rate = float | Array  # one value, or one per stacked trial (T,)
PerTrial = Callable[[str, Rate], Array]  # (parameter name, (T,) values) -> broadcastable


def _check(key: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """``value`` as a float if it lies in [lo, hi) (or (lo, hi)); else ValueError naming key."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not (lo < x if lo_open else lo <= x) or not x < hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g})"
        raise ValueError(f"{key} must be in {interval}, got {value!r}")
    return x


class Optimizer:
    """Base class: the step counter, per-parameter state slots and scratch buffers.

    ``t`` counts the steps taken (torch's "step" state); ``state[slot][name]`` holds
    the buffers named in ``slots`` (e.g. "m" and "v" for Adam).
    """

    slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.t = 0
        self.state: dict[str, dict[str, Array]] = {s: {} for s in self.slots}
        self._scratch: dict[str, Array] = {}
        self._per_trial: PerTrial | None = None

    def step(self, params: Params, grads: Params, lr: Rate, l2: Rate = 0.0,
             per_trial: PerTrial | None = None) -> float | None:
        """Update every array in ``params`` in place from ``grads`` with learning rate lr.

        ``l2`` > 0 first adds the L2 term l2 W to the gradient of every weight matrix W
        (names starting with "W"), as ``Network.backward`` does with l2 = 2 lambda: the
        trainer leaves the term to the optimizer, so plain SGD can fuse it into its
        update. The parameters come out the same either way, to the last bit; the
        gradient arrays may or may not hold the term afterwards.

        With ``per_trial`` (``Stack.per_trial``) the arrays hold T trials stacked and lr,
        l2 are (T,) arrays, one value per trial: the same update, trial by trial.

        Returns sum_l ||W_l||^2 of the updated weight matrices where the update computed
        it on the way (plain SGD with l2 > 0 through the C kernels: the next step's L2
        penalty then needs no pass of its own), else None.
        """
        self.t += 1
        self._per_trial = per_trial
        for name, p in params.items():
            if np.any(l2) and name.startswith("W"):
                self._update_l2(name, p, grads[name], lr, self._buffer(name, p), l2)
            else:
                self._update(name, p, grads[name], lr, self._buffer(name, p))
        return None

    def _at(self, name: str, x: Rate) -> Any:
        """x for parameter ``name``: per trial, shaped to broadcast against it; else a
        float (a NumPy float64 scalar would make float32 updates go via float64), or an
        array as given."""
        if self._per_trial is not None:
            return self._per_trial(name, x)
        return float(x) if np.ndim(x) == 0 else x

    def _update(self, name: str, p: Array, g: Array, lr: Rate, buf: Array) -> None:
        """Update parameter ``p`` in place; ``buf`` is scratch space shaped like p."""
        raise NotImplementedError

    def _update_l2(self, name: str, p: Array, g: Array, lr: Rate, buf: Array,
                   l2: Rate) -> None:
        """``_update`` with the L2 term l2 p added to g first (in place)."""
        kernels.add_scaled(g, p, self._at(name, l2))
        self._update(name, p, g, lr, buf)

    def _buffer(self, name: str, p: Array) -> Array:
        """The scratch buffer for ``name``, (re)allocated to match p."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = self._scratch[name] = np.empty_like(p)
        return buf

    def _slot(self, slot: str, name: str, p: Array, init: Array | None = None) -> Array:
        """State buffer ``slot`` of ``name``: on first use a copy of init, or zeros, like p."""
        bufs = self.state[slot]
        buf = bufs.get(name)
        if buf is None:
            buf = bufs[name] = np.zeros_like(p) if init is None else init.astype(p.dtype)
        elif buf.shape != p.shape:
            raise ValueError(f"optimizer state {slot}/{name} has shape {buf.shape}, "
                             f"parameter has {p.shape}")
        return buf

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat copy of the state: "t" (0-d int64) and "slot/name" buffers."""
        out: dict[str, np.ndarray] = {"t": np.array(self.t, dtype=np.int64)}
        for slot, bufs in self.state.items():
            out.update({f"{slot}/{name}": buf.copy() for name, buf in bufs.items()})
        return out

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        """Restore a ``state_dict`` (copying it), so training continues bit-identically."""
        if "t" not in d:
            raise ValueError("optimizer state has no step counter 't'")
        state: dict[str, dict[str, Array]] = {s: {} for s in self.slots}
        for key, value in d.items():
            if key == "t":
                continue
            slot, _, name = key.partition("/")
            if slot not in state or not name:
                raise ValueError(f"unexpected optimizer state {key!r} for "
                                 f"{type(self).__name__}; slots: {', '.join(self.slots)}")
            state[slot][name] = np.array(value, copy=True)
        self.t, self.state = int(d["t"]), state


# Sums of squares above this are left to losses.l2_penalty (float32 vdots), so that a
# run whose penalty overflows float32 diverges at the very step it did before.
NEAR_F32_MAX = 0.99 * float(np.finfo(np.float32).max)


def penalty_squares(sums: list[float]) -> float | None:
    """sum_l ||W_l||^2 from each weight matrix's sum of squares in double, rounded as
    ``losses.l2_penalty``'s float32 sum of float32 vdots; None near float32's largest
    value, where l2_penalty's own sum decides."""
    if not sum(sums) < NEAR_F32_MAX:
        return None
    return float(sum(np.float32(x) for x in sums))


class SGD(Optimizer):
    """Plain gradient descent: p <- p - lr g."""

    def step(self, params: Params, grads: Params, lr: Rate, l2: Rate = 0.0,
             per_trial: PerTrial | None = None) -> float | None:
        """``Optimizer.step``; for float32 with the C kernels, every parameter in one call
        that also sums the updated weights' squares (a stack of trials goes through
        ``Stack.sgd_step``, fused per trial)."""
        names = list(params)
        weight = [n.startswith("W") for n in names]
        sq = np.zeros(len(names))
        if per_trial is None and np.ndim(l2) == np.ndim(lr) == 0 and kernels.sgd_many(
                [params[n] for n in names], [grads[n] for n in names], float(lr),
                [float(l2) if w else 0.0 for w in weight], sq):
            self.t += 1
            return penalty_squares(sq[weight].tolist()) if l2 else None
        return super().step(params, grads, lr, l2, per_trial)

    def _update(self, name: str, p: Array, g: Array, lr: Rate, buf: Array) -> None:
        kernels.sgd_step(p, g, self._at(name, lr), buf)  # one C pass for float32

    def _update_l2(self, name: str, p: Array, g: Array, lr: Rate, buf: Array,
                   l2: Rate) -> None:
        # p -= lr (g + l2 p), g left as it was
        kernels.sgd_l2_step(p, g, self._at(name, lr), self._at(name, l2), buf)


class Momentum(Optimizer):
    """Heavy-ball momentum in torch's form (SGD(momentum=mu), no dampening).

    v <- mu v + g (v = g on the first step, as torch does), p <- p - lr v.
    The learning rate stays outside the velocity: v accumulates raw gradients, so a
    change of lr mid-run rescales the whole step at once. In the CS231n form
    v <- mu v - lr g, p <- p + v, the velocity carries the old learning rates, and
    the two forms agree only while lr is constant.
    """

    slots = ("v",)
    nesterov = False

    def __init__(self, mu: float = 0.9) -> None:
        super().__init__()
        self.mu = _check("mu", mu, 0.0, 1.0)
        self._squares: dict[str, float] = {}  # of the last step's fused updates

    def step(self, params: Params, grads: Params, lr: Rate, l2: Rate = 0.0,
             per_trial: PerTrial | None = None) -> float | None:
        """``Optimizer.step``; when every weight matrix took the one-pass C update with
        l2 > 0, it returns their sum of squares, which that pass computed on the way."""
        self._squares = {}
        super().step(params, grads, lr, l2, per_trial)
        sums = [self._squares.get(n) for n in params if n.startswith("W")]
        if not np.any(l2) or None in sums:
            return None
        return penalty_squares(cast(list[float], sums))

    def _fused(self, name: str, p: Array, g: Array, lr: Rate, l2: Rate) -> bool:
        """The whole update of ``name`` (L2 term, velocity, step) in one C pass, for
        float32 with scalar rates; False, with nothing done, where the NumPy code runs."""
        if self._per_trial is not None or np.ndim(lr) or np.ndim(l2) \
                or not kernels.enabled(p, g) or p.shape != g.shape:
            return False
        first = name not in self.state["v"]
        sq = kernels.momentum_step(p, g, self._slot("v", name, p), float(lr), self.mu,
                                   float(l2), self.nesterov, first)
        if sq is not None:
            self._squares[name] = sq
        return sq is not None

    def _update_l2(self, name: str, p: Array, g: Array, lr: Rate, buf: Array,
                   l2: Rate) -> None:
        if not self._fused(name, p, g, lr, l2):
            super()._update_l2(name, p, g, lr, buf, l2)

    def _velocity(self, name: str, p: Array, g: Array) -> Array:
        """Advance and return the velocity of ``name``."""
        first = name not in self.state["v"]
        v = self._slot("v", name, p, init=g)
        if not first:
            v *= self.mu
            v += g
        return v

    def _update(self, name: str, p: Array, g: Array, lr: Rate, buf: Array) -> None:
        if not self._fused(name, p, g, lr, 0.0):
            self._numpy_update(name, p, g, lr, buf)

    def _numpy_update(self, name: str, p: Array, g: Array, lr: Rate, buf: Array) -> None:
        """The update in NumPy (the reference the C pass is held to): p -= lr v."""
        np.multiply(self._velocity(name, p, g), self._at(name, lr), out=buf)
        p -= buf


class Nesterov(Momentum):
    """Nesterov momentum in torch's form (SGD(momentum=mu, nesterov=True)).

    v as in Momentum (v <- mu v + g), then p <- p - lr (g + mu v): the step looks
    ahead along the updated velocity. lr again stays outside the velocity.
    """

    nesterov = True

    def _numpy_update(self, name: str, p: Array, g: Array, lr: Rate, buf: Array) -> None:
        """p -= lr (g + mu v), in NumPy."""
        np.multiply(self._velocity(name, p, g), self.mu, out=buf)
        buf += g
        buf *= self._at(name, lr)
        p -= buf


class Adam(Optimizer):
    """Adam with bias correction (torch.optim.Adam); weight_decay > 0 makes it AdamW.

    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2  (both start at 0),
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps),  t = 1, 2, ...
    With weight_decay = wd > 0 the decay is decoupled, as torch.optim.AdamW:
    p <- p (1 - lr wd) before the Adam update, and here only for weight matrices
    (names starting with "W"), never biases or batch-norm gamma/beta. The L2 penalty
    lambda of the cost is separate and lives in the gradients, not here.
    """

    slots = ("m", "v")

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.beta1 = _check("beta1", beta1, 0.0, 1.0)
        self.beta2 = _check("beta2", beta2, 0.0, 1.0)
        self.eps = _check("eps", eps, 0.0, lo_open=True)
        self.weight_decay = _check("weight_decay", weight_decay, 0.0)

    def _update(self, name: str, p: Array, g: Array, lr: Rate, buf: Array) -> None:
        if self.weight_decay and name.startswith("W"):
            p *= self._at(name, 1 - lr * self.weight_decay)
        m, v = self._slot("m", name, p), self._slot("v", name, p)
        b1, b2 = self.beta1, self.beta2
        m *= b1
        np.multiply(g, 1 - b1, out=buf)
        m += buf  # m <- b1 m + (1 - b1) g
        v *= b2
        np.multiply(g, g, out=buf)
        buf *= 1 - b2
        v += buf  # v <- b2 v + (1 - b2) g^2
        np.sqrt(v, out=buf)
        buf /= (1 - b2**self.t) ** 0.5
        buf += self.eps
        np.divide(m, buf, out=buf)  # m / (sqrt(v / (1 - b2^t)) + eps)
        buf *= self._at(name, lr / (1 - b1**self.t))
        p -= buf


def adamw(beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Adam:
    """AdamW: Adam with decoupled weight decay on the weight matrices, default 1e-2."""
    return Adam(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adam": Adam,
    "adamw": adamw,
}


def optimizer_kwargs(name: str) -> list[str]:
    """The keyword arguments the optimizer ``name`` takes (from its signature)."""
    return list(inspect.signature(OPTIMIZERS[name]).parameters)


def make_optimizer(name: str, **kwargs: Any) -> Optimizer:
    """The optimizer ``name`` with validated settings.

    Raises ValueError for an unknown name (listing the valid ones), an unknown
    keyword (naming it and listing the valid ones) or an out-of-range value
    (naming the key): mu, beta1, beta2 in [0, 1), eps > 0, weight_decay >= 0.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    valid = optimizer_kwargs(name)
    if unknown := sorted(set(kwargs) - set(valid)):
        raise ValueError(f"optimizer {name!r} takes no {', '.join(unknown)}; "
                         f"valid: {', '.join(valid) or 'none'}")
    return OPTIMIZERS[name](**kwargs)


class WeightAverage:
    """An exponential moving average of the parameters (Polyak averaging with a decay).

    Every ``every`` steps, avg = f avg + (1 - f) params with f = decay^every: about the
    average a per-step update would keep, sampled every ``every`` steps, so that it costs
    a few passes over the weights per ``every`` steps, not per step (a pass over a wide
    net's 3.8M weights costs a sizeable part of a step). ``state_dict`` holds ``avg``.
    """

    def __init__(self, params: Params, decay: float, every: int = 10) -> None:
        self.decay = _check("ema", decay, 0.0, 1.0, lo_open=True)
        self.every = every
        self.avg = {k: v.copy() for k, v in params.items()}

    def update(self, params: Params, t: int, last: bool = False) -> None:
        """Fold in ``params`` after update t (1-based) when t is a multiple of ``every``,
        or, when ``last``, the steps since the previous fold (decay^(t mod every))."""
        since = t % self.every
        if (since == 0) == last:  # not a folding step; or, last, folded at t already
            return
        f = self.decay ** (since or self.every)
        for name, a in self.avg.items():
            a *= f
            a += (1 - f) * params[name]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.avg.items()}
