"""T same-shaped networks as one stack: the network's own forward and backward, batched.

``Stack`` is a ``Network`` whose parameters carry a leading trial axis: every weight is
(T, m_{l-1}, m_l) and every vector (T, m_l), and the layer functions (``layers``,
``losses``) broadcast over it, so a stack runs exactly the lone network's arithmetic,
operation for operation, and each trial's results equal a lone network's to rounding.
The one difference is the first layer, whose input all trials share: ``W1`` is kept as
one (d, T m_1) matrix (trial i's block is columns i m_1 ... (i + 1) m_1), so a shared
input X (n, d) goes through all first layers in one wide product
X @ [W1_1 | ... | W1_T] and back through X^T [dS_1 | ... | dS_T].
``training.batched.BatchedTrainer`` trains a stack; ``training.evaluation.evaluate_many``
evaluates one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from klayer.core import kernels
from klayer.core.layers import Array, dropout_mask, linear_backward
from klayer.core.network import Network


class Stack(Network):
    """The parameters and batch-norm statistics of T same-shaped networks, stacked."""

    _fuse_bias = False  # the first layer's wide product adds its biases itself

    def __init__(self, nets: Sequence[Network]) -> None:  # (no Network.__init__: no draws)
        if not nets:
            raise ValueError("no networks to stack")
        self.config = cfg = nets[0].config
        if any(net.config != cfg for net in nets[1:]):
            raise ValueError("stacked networks must share one architecture")
        self.T, self.dtype = len(nets), nets[0].dtype
        self.widths, self._skips = cfg.widths, cfg.skip_sources()
        self.params = {name: (np.concatenate([n.params[name] for n in nets], axis=1)
                              if name == "W1" else np.stack([n.params[name] for n in nets]))
                       for name in nets[0].params}
        self.stats = {name: np.stack([n.stats[name] for n in nets]) for name in nets[0].stats}
        self.bn_updates = nets[0].bn_updates
        self._scratch: dict[str, Array] = {}

    # --- the shared first layer ----------------------------------------------------------

    def _affine(self, l: int, h: Array, bias: bool) -> Array:
        """As ``Network._affine``; for l = 1, X (n, d) through every trial's first layer
        in one wide product: (T, n, m_1)."""
        if l > 1:
            return super()._affine(l, h, bias)
        n = h.shape[0]
        s = kernels.matmul(h, self.params["W1"])  # (n, T m_1): the one wide product
        s += self.params["b1"].reshape(-1)
        return np.ascontiguousarray(s.reshape(n, self.T, -1).transpose(1, 0, 2))

    def _affine_backward(self, l: int, ds: Array, x: Array) -> tuple[Array | None, Array]:
        """As ``Network._affine_backward``; for l = 1, dW1 = X^T [dS_1 | ... | dS_T] in
        one wide product, into a buffer reused every step."""
        if l > 1:
            return linear_backward(ds, x, self.params[f"W{l}"])
        ds_wide = ds.transpose(1, 0, 2).reshape(ds.shape[1], -1)  # (n, T m_1)
        return None, kernels.matmul(x, ds_wide, trans_a=True, out=self.scratch("W1", "grad/"))

    def _dropout_mask(self, shape: tuple[int, ...], rng: Any) -> Array:
        """One mask per trial (T, n, m), each from that trial's own generator in ``rng``."""
        return np.stack([dropout_mask(shape[1:], self.config.dropout, g, self.dtype)
                         for g in rng])

    # --- trials ---------------------------------------------------------------------------

    def per_trial(self, name: str, values: Any, dtype: Any = None) -> Array:
        """values (T,) shaped to broadcast against parameter ``name``."""
        v = np.asarray(values, dtype=dtype or self.dtype)
        if name == "W1":
            return np.repeat(v, self.widths[1])  # (T m_1,): one value per column
        return v.reshape((self.T,) + (1,) * (self.params[name].ndim - 1))

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the trials ``rows`` (indices into the current stack)."""
        self.params = {name: self.trials_of(name, p, rows) for name, p in self.params.items()}
        self.stats = {k: v[rows] for k, v in self.stats.items()}
        self.T = len(rows)
        self._scratch.clear()

    def trials_of(self, name: str, values: Array, rows: np.ndarray) -> Array:
        """The trials ``rows`` of an array stacked like parameter ``name``."""
        if name != "W1":
            return values[rows]
        d, m1 = self.widths[0], self.widths[1]
        T = values.shape[1] // m1
        return np.ascontiguousarray(
            values.reshape(d, T, m1)[:, rows, :].reshape(d, len(rows) * m1))

    def networks(self) -> list[Network]:
        """The T networks, as separate ``Network`` objects (copies)."""
        d, m1 = self.widths[0], self.widths[1]
        return [Network.from_arrays(
                    self.config,
                    {name: np.array(p.reshape(d, self.T, m1)[:, i, :] if name == "W1" else p[i])
                     for name, p in self.params.items()},
                    {k: np.array(v[i]) for k, v in self.stats.items()}, self.bn_updates)
                for i in range(self.T)]

    def scratch(self, name: str, slot: str = "") -> Array:
        """A reusable buffer shaped like parameter ``name`` (no allocation per step)."""
        key = slot + name
        p = self.params[name]
        buf = self._scratch.get(key)
        if buf is None or buf.shape != p.shape:
            buf = self._scratch[key] = np.empty_like(p)
        return buf

    def penalty(self) -> Array:
        """sum_l ||W_l||^2 per trial, (T,)."""
        W1 = self.params["W1"]
        total = np.einsum("ij,ij->j", W1, W1).reshape(self.T, -1).sum(axis=1, dtype=np.float64)
        for l in range(2, self.config.k + 1):
            W = self.params[f"W{l}"]
            total += np.einsum("tij,tij->t", W, W)
        return total

    def sgd_step(self, grads: dict[str, Array], lr: Array, l2: Array) -> Array:
        """Plain SGD on every trial, p -= lr[t] (g + l2[t] p) for weight matrices and
        p -= lr[t] g for the rest, fused per trial (``kernels.sgd_l2_steps``); returns
        each trial's sum_l ||W_l||^2 after the update, the next step's penalty (T,)."""
        # Summed in the parameters' dtype, as a lone network's l2_penalty (float32 vdots):
        # past float32's largest value the penalty is inf, and the trial diverges at the
        # same step as it would alone.
        penalty = np.zeros(self.T, self.dtype)
        no_l2 = np.zeros(self.T)
        for name, p in self.params.items():
            block = self.widths[1] if name == "W1" else p.size // self.T
            weight = name.startswith("W")
            sq = kernels.sgd_l2_steps(p, grads[name], lr, l2 if weight else no_l2, block,
                                      buf=self.scratch(name))
            if weight:
                with np.errstate(over="ignore"):
                    penalty += sq.astype(self.dtype)
        return penalty
