"""T same-shaped networks as one stack: forward, backward and evaluation in shared passes.

``Stack`` holds the parameters and batch-norm statistics of T networks of one
architecture. A shared input X (n, d) goes through all first layers in one wide matrix
product  X @ [W1_1 | W1_2 | ... | W1_T]  (n x d times d x T m_1), and back through
X^T [dS_1 | ... | dS_T]; the later (narrow) layers run as stacked products on
(T, n, m) arrays with ``np.matmul``. Each network's arithmetic is ``network``'s,
operation for operation, so its results equal a lone network's to rounding.
``batched.BatchedTrainer`` trains such a stack; ``evaluate_many`` evaluates one.

This module is core: NumPy and the core modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from klayer.core import kernels
from klayer.core.bnstats import running_rule, update_running
from klayer.core.layers import Array, dropout_mask
from klayer.core.network import Metrics, Network
from klayer.data.datasets import Data
from klayer.training.evaluation import EVAL_CHUNK, model_inputs


class _Cache(NamedTuple):
    x: Array  # (T, n, m_{l-1}) input of the linear map (the shared (n, d) X for layer 1)
    relu_out: Array | None
    bn: tuple[Array, Array] | None  # x_hat (T, n, m), inv_std (T, m)
    mask: Array | None


class Stack:
    """The parameters and batch-norm statistics of T same-shaped networks, stacked.

    ``W1`` is kept as one (d, T m_1) matrix (trial i's block is columns i m_1 ...
    (i + 1) m_1); every other weight is (T, m_{l-1}, m_l) and every vector (T, m_l).
    """

    def __init__(self, nets: Sequence[Network]) -> None:
        if not nets:
            raise ValueError("no networks to stack")
        self.config = cfg = nets[0].config
        for net in nets[1:]:
            if net.config != cfg:
                raise ValueError("stacked networks must share one architecture")
        self.T = len(nets)
        self.dtype = nets[0].dtype
        self.widths = cfg.widths
        self.skips = cfg.skip_sources()
        self.params: dict[str, Array] = {}
        for name in nets[0].params:
            if name == "W1":
                self.params[name] = np.concatenate([n.params[name] for n in nets], axis=1)
            else:
                self.params[name] = np.stack([n.params[name] for n in nets])
        self.stats = {name: np.stack([n.stats[name] for n in nets]) for name in nets[0].stats}
        self.bn_updates = nets[0].bn_updates
        self._scratch: dict[str, Array] = {}

    # --- shapes -------------------------------------------------------------

    def per_trial(self, name: str, values: Array, dtype: Any = None) -> Array:
        """values (T,) shaped to broadcast against parameter ``name``."""
        v = np.asarray(values, dtype=dtype or self.dtype)
        if name == "W1":
            return np.repeat(v, self.widths[1])  # (T m_1,): one value per column
        p = self.params[name]
        return v.reshape((self.T,) + (1,) * (p.ndim - 1))

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the trials ``rows`` (indices into the current stack)."""
        d, m1 = self.widths[0], self.widths[1]
        for name, p in self.params.items():
            if name == "W1":
                self.params[name] = np.ascontiguousarray(
                    p.reshape(d, self.T, m1)[:, rows, :].reshape(d, len(rows) * m1))
            else:
                self.params[name] = p[rows]
        self.stats = {k: v[rows] for k, v in self.stats.items()}
        self.T = len(rows)
        self._scratch.clear()

    def networks(self) -> list[Network]:
        """The T networks, as separate ``Network`` objects (copies)."""
        d, m1 = self.widths[0], self.widths[1]
        return [Network.from_arrays(
                    self.config,
                    {name: np.array(p.reshape(d, self.T, m1)[:, i, :] if name == "W1" else p[i])
                     for name, p in self.params.items()},
                    {k: np.array(v[i]) for k, v in self.stats.items()}, self.bn_updates)
                for i in range(self.T)]

    # --- forward ------------------------------------------------------------

    def _first(self, X: Array) -> Array:
        """X (n, d) through the first linear map of every trial: (T, n, m_1)."""
        n = X.shape[0]
        s = X @ self.params["W1"]  # (n, T m_1): the one wide product
        s += self.params["b1"].reshape(-1)
        return np.ascontiguousarray(s.reshape(n, self.T, -1).transpose(1, 0, 2))

    def forward(self, X: Array, train: bool,
                rngs: Sequence[np.random.Generator] | None = None,
                ) -> tuple[Array, list[_Cache]]:
        """Scores (T, n, K) of the shared input X (n, d); caches in training mode."""
        cfg, p = self.config, self.params
        caches: list[_Cache] = []
        outs: list[Array] = []  # h_1, ..., h_{k-1}
        h: Array = X
        for l in range(1, cfg.k):
            if l == 1:
                s = self._first(X)
            else:
                s = np.matmul(h, p[f"W{l}"])
                s += p[f"b{l}"][:, None, :]
            if l in self.skips:
                s += outs[self.skips[l] - 1]
            out, r, bn, mask = self._activate(s, l, train, rngs)
            if train:
                caches.append(_Cache(h, r, bn, mask))
            h = out
            outs.append(h)
        if cfg.k == 1:
            scores = self._first(X)
        else:
            scores = np.matmul(h, p[f"W{cfg.k}"])
            scores += p[f"b{cfg.k}"][:, None, :]
        if train:
            caches.append(_Cache(h, None, None, None))
            if cfg.batch_norm:
                self.bn_updates += 1
        return scores, caches

    def _activate(self, s: Array, l: int, train: bool,
                  rngs: Sequence[np.random.Generator] | None,
                  ) -> tuple[Array, Array, tuple[Array, Array] | None, Array | None]:
        """ReLU and batch norm (in the configured order), then dropout, of layer l's
        scores s (T, n, m): the output, the ReLU's output, the BN cache, the mask."""
        cfg = self.config
        bn = None
        if not cfg.batch_norm:
            r = out = np.maximum(s, 0)
        elif cfg.bn_position == "before":
            r, bn = self._batchnorm(s, l, train, relu=True)
            out = r
        else:
            r = np.maximum(s, 0)
            out, bn = self._batchnorm(r, l, train)
        mask = None
        if train and cfg.dropout > 0:
            if rngs is None:
                raise ValueError("dropout needs an rng per trial in training mode")
            shape = out.shape[1:]
            mask = np.stack([dropout_mask(shape, cfg.dropout, g, self.dtype) for g in rngs])
            out = out * mask
        return out, r, bn, mask

    def _batchnorm(self, s: Array, l: int, train: bool,
                   relu: bool = False) -> tuple[Array, tuple[Array, Array] | None]:
        """Batch norm of layer l in every trial (then a ReLU when ``relu``), and its cache;
        fused in C for training in float32, as ``Network._batchnorm``."""
        gamma, beta = self.params[f"gamma{l}"][:, None, :], self.params[f"beta{l}"][:, None, :]
        eps = self.config.bn_eps
        if not train:
            mu, var = self.stats[f"mu{l}"], self.stats[f"var{l}"]
            scale = self.params[f"gamma{l}"] / np.sqrt(var + eps)  # (T, m)
            y = s * scale[:, None, :]
            y += (self.params[f"beta{l}"] - mu * scale)[:, None, :]
            return (np.maximum(y, 0) if relu else y), None
        n = s.shape[1]
        mu_av, var_av = self.stats[f"mu{l}"], self.stats[f"var{l}"]
        if relu and kernels.enabled(s, self.params[f"gamma{l}"], self.params[f"beta{l}"],
                                    mu_av, var_av):
            rule = running_rule(self.config, n, first=self.bn_updates == 0)
            y, x_hat, inv_std, _, _ = kernels.bn_relu_forward(  # (updates the running stats)
                s, self.params[f"gamma{l}"], self.params[f"beta{l}"], eps,
                running=(mu_av, var_av, *rule))
            return y, (x_hat, inv_std)
        mu = s.mean(axis=1)  # (T, m)
        xc = s - mu[:, None, :]
        var = np.einsum("tij,tij->tj", xc, xc) / n  # biased
        inv_std = 1.0 / np.sqrt(var + eps)
        x_hat = xc
        x_hat *= inv_std[:, None, :]
        y = x_hat * gamma
        y += beta
        self._update_running(l, mu, var, n)
        return (np.maximum(y, 0) if relu else y), (x_hat, inv_std)

    def _update_running(self, l: int, mu: Array, var: Array, n: int) -> None:
        update_running(self.stats[f"mu{l}"], self.stats[f"var{l}"], mu, var, n,
                       self.config, first=self.bn_updates == 0)

    # --- backward -----------------------------------------------------------

    def backward(self, dscores: Array, caches: list[_Cache], X: Array) -> dict[str, Array]:
        """Gradients of every trial's loss (stacked like the parameters), without the L2
        term 2 lambda W: the optimizer adds it (``batched._Optimizer.step``)."""
        cfg, p = self.config, self.params
        k = cfg.k
        grads: dict[str, Array] = {}
        pending: dict[int, Array] = {}
        dh = self._linear_backward(dscores, caches[-1].x, k, X, grads)
        for l in range(k - 1, 0, -1):
            c = caches[l - 1]
            db: Array | None = None  # the bias gradient, when the fused kernel sums it
            assert dh is not None and c.relu_out is not None
            if l in pending:
                dh = dh + pending.pop(l)
            if c.mask is not None:
                dh = dh * c.mask
            if not cfg.batch_norm:
                ds = dh * (c.relu_out > 0)
            elif cfg.bn_position == "before":
                assert c.bn is not None
                ds, db = self._bn_relu_backward(dh, c.relu_out, c.bn, l, grads)
            else:
                assert c.bn is not None
                ds = self._bn_backward(dh, c.bn, l, grads) * (c.relu_out > 0)
            if l in self.skips:
                pending[self.skips[l]] = ds
            dh = self._linear_backward(ds, c.x, l, X, grads, db)
        return {name: grads[name] for name in p}

    def scratch(self, name: str, slot: str = "") -> Array:
        """A reusable buffer shaped like parameter ``name`` (no allocation per step)."""
        key = slot + name
        p = self.params[name]
        buf = self._scratch.get(key)
        if buf is None or buf.shape != p.shape:
            buf = self._scratch[key] = np.empty_like(p)
        return buf

    def _linear_backward(self, ds: Array, x: Array, l: int, X: Array,
                         grads: dict[str, Array], db: Array | None = None) -> Array | None:
        """Gradients of layer l's linear map into ``grads`` (db: the bias gradient when
        the caller has it already); returns dJ/dx (None for the first layer)."""
        if l == 1:
            n = ds.shape[1]
            ds_wide = ds.transpose(1, 0, 2).reshape(n, -1)  # (n, T m_1)
            # the one wide product, (d, T m_1), into a buffer reused every step
            grads["W1"] = np.matmul(X.T, ds_wide, out=self.scratch("W1", "grad/"))
        else:
            grads[f"W{l}"] = np.matmul(x.transpose(0, 2, 1), ds)
        grads[f"b{l}"] = ds.sum(axis=1) if db is None else db
        return None if l == 1 else np.matmul(ds, self.params[f"W{l}"].transpose(0, 2, 1))

    def _bn_relu_backward(self, dh: Array, relu_out: Array, cache: tuple[Array, Array],
                          l: int, grads: dict[str, Array]) -> tuple[Array, Array | None]:
        """Backward through ReLU then batch norm of layer l: ds and, from the fused C
        kernel, the bias gradient of the linear map before (None from the NumPy code)."""
        gamma = self.params[f"gamma{l}"]
        if kernels.enabled(dh, relu_out, *cache, gamma):
            ds, grads[f"gamma{l}"], grads[f"beta{l}"], db = kernels.bn_relu_backward(
                dh, relu_out, *cache, gamma, want_db=True)
            return ds, db
        return self._bn_backward(dh * (relu_out > 0), cache, l, grads), None

    def _bn_backward(self, dy: Array, cache: tuple[Array, Array], l: int,
                     grads: dict[str, Array]) -> Array:
        x_hat, inv_std = cache
        gamma = self.params[f"gamma{l}"]
        n = dy.shape[1]
        dbeta = dy.sum(axis=1)
        dgamma = np.einsum("tij,tij->tj", dy, x_hat)
        ds = dy * n
        ds -= dbeta[:, None, :]
        ds -= x_hat * dgamma[:, None, :]
        ds *= (gamma * inv_std / n)[:, None, :]
        grads[f"gamma{l}"], grads[f"beta{l}"] = dgamma, dbeta
        return ds

    def penalty(self) -> Array:
        """sum_l ||W_l||^2 per trial, (T,)."""
        m1 = self.widths[1]
        W1 = self.params["W1"]
        total = np.einsum("ij,ij->j", W1, W1).reshape(self.T, m1).sum(axis=1, dtype=np.float64)
        for l in range(2, self.config.k + 1):
            W = self.params[f"W{l}"]
            total += np.einsum("tij,tij->t", W, W)
        return total


def softmax_cross_entropy(scores: Array, y: Array,
                          label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Per-trial mean cross-entropy (T,) and its gradient (T, n, K); as losses' version
    (and, in C for float32, as a lone network's ``softmax_cross_entropy``)."""
    if not label_smoothing and kernels.enabled(scores):
        return kernels.softmax_cross_entropy_stack(scores, y)
    _, n, k = scores.shape
    logp = scores - scores.max(axis=2, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=2, keepdims=True))
    rows = np.arange(n)
    nll = -logp[:, rows, y]  # (T, n)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=2)
    dscores = np.exp(logp)
    if label_smoothing:
        dscores -= label_smoothing / k
        dscores[:, rows, y] -= 1 - label_smoothing
    else:
        dscores[:, rows, y] -= 1
    dscores /= n
    return nll.mean(axis=1), dscores


def evaluate_many(nets: Sequence[Network], data: Data, X: Array, y: Array,
                  lams: Sequence[float] | None = None) -> list[Metrics]:
    """Evaluation-mode loss, cost and accuracy of same-shaped networks on (X, y).

    Every chunk of X goes in raw (the standardization folded into each first layer, as
    ``evaluation.evaluate`` does, when it can) through all first layers in one wide
    product; as ``evaluation.evaluate`` (no test-time flips) per network.
    """
    models, chunks = model_inputs(nets, data, X, nets[0].dtype)
    stack = Stack(models)
    lam = np.zeros(len(nets)) if lams is None else np.asarray(lams, np.float64)
    nll = np.zeros(len(nets))
    correct = np.zeros(len(nets), np.int64)
    for i, chunk in zip(range(0, len(X), EVAL_CHUNK), chunks, strict=True):
        yc = y[i : i + len(chunk)]
        scores, _ = stack.forward(chunk, train=False)
        logp = scores - scores.max(axis=2, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=2, keepdims=True))
        nll -= logp[:, np.arange(len(yc)), yc].sum(axis=1)
        correct += (logp.argmax(axis=2) == yc).sum(axis=1)
    out = []
    for j, net in enumerate(nets):
        loss = float(nll[j]) / len(y)
        penalty = float(lam[j]) * float(sum(np.vdot(W, W) for W in net.weights()))
        out.append(Metrics(loss, loss + penalty, int(correct[j]) / len(y)))
    return out
