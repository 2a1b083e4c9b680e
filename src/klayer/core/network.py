"""The k-layer network: parameters, forward and backward passes, cost, running statistics.

Parameters live in one ordered dict with stable names W1, b1, gamma1, beta1, ..., Wk, bk
(gamma/beta only for hidden layers with batch norm). The gradient checker, the
optimizers and save/load all walk that same dict. Rows are examples: X is (n, d),
W_l is (m_{l-1}, m_l); see ``layers`` for the translation from the course's columns.

Batch-norm running statistics follow ``NetConfig.bn_convention`` (see ``bnstats``); they
change exactly once per training forward pass (unless the caller asks otherwise, as
PreciseBN does) and never in evaluation mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from klayer.core import kernels
from klayer.core.bnstats import population_stats, running_rule, update_running
from klayer.core.config import NetConfig
from klayer.core.layers import (
    Array,
    BNCache,
    LNCache,
    batchnorm_forward_eval,
    batchnorm_forward_train,
    bias_backward,
    dropout_mask,
    layernorm_forward,
    linear_backward,
    linear_forward,
    norm_backward,
    relu_backward,
    relu_forward,
)
from klayer.core.losses import Mix, accuracy, cross_entropy, l2_penalty, training_loss

Labels = npt.NDArray[np.integer]
EVAL_CHUNK = 1000  # rows per evaluation chunk (benchmarks/bench_load.py measures it)
Sink = list[tuple[int, Array, Array]]  # (layer, batch mean, biased batch variance), PreciseBN


class LayerCache(NamedTuple):
    """What one hidden layer's backward pass needs (None where the layer has no such part)."""

    x: Array  # (n, m_{l-1}) input of the linear map
    relu_out: Array | None  # (n, m_l) output of the ReLU (its mask is relu_out > 0)
    bn: BNCache | LNCache | None  # batch-norm (or layer-norm) cache
    mask: Array | None  # (n, m_l) dropout mask


class Metrics(NamedTuple):
    loss: float  # mean cross-entropy
    cost: float  # loss + lambda * sum ||W||^2
    accuracy: float  # fraction correct


class Network:
    """A k-layer fully-connected classifier with optional batch norm, dropout and skips.

    >>> net = Network(NetConfig(d=3072, hidden=(50, 50)), rng=np.random.default_rng(0))
    >>> loss, cost, grads = net.loss_and_grads(X, y, lam=0.005)   # training mode
    >>> net.evaluate(X_val, y_val).accuracy                        # evaluation mode
    """

    _fuse_bias = True  # the fused batch-norm kernel may add the linear map's bias

    def __init__(self, config: NetConfig, rng: np.random.Generator | int | None = 0) -> None:
        self.config = config
        self.dtype = np.dtype(config.dtype)
        self.params: dict[str, Array] = {}
        self.stats: dict[str, Array] = {}  # running mean/variance: mu1, var1, ...
        self.bn_updates = 0  # training forward passes that updated the running stats
        self._skips = config.skip_sources()
        self._init_params(np.random.default_rng(rng))

    # --- parameters ---------------------------------------------------------

    def _init_params(self, rng: np.random.Generator) -> None:
        cfg = self.config
        widths = cfg.widths
        for l in range(1, cfg.k + 1):
            fan_in, fan_out = widths[l - 1], widths[l]
            if cfg.init == "he":
                std = np.sqrt(2.0 / fan_in)
            elif cfg.init == "xavier":  # Glorot & Bengio's normal variant
                std = np.sqrt(2.0 / (fan_in + fan_out))
            else:
                std = cfg.init_sigma
            self.params[f"W{l}"] = (rng.standard_normal((fan_in, fan_out)) * std).astype(self.dtype)
            self.params[f"b{l}"] = np.zeros(fan_out, self.dtype)
            if l < cfg.k and (cfg.batch_norm or cfg.layer_norm):
                self.params[f"gamma{l}"] = np.ones(fan_out, self.dtype)
                self.params[f"beta{l}"] = np.zeros(fan_out, self.dtype)
            if l < cfg.k and cfg.batch_norm:
                # Running statistics start at 0 / 1 (as torch's); the assignment's
                # convention overwrites them with the first mini-batch's. Either way an
                # evaluation before any training step is finite and meaningful.
                self.stats[f"mu{l}"] = np.zeros(fan_out, self.dtype)
                self.stats[f"var{l}"] = np.ones(fan_out, self.dtype)

    @property
    def param_names(self) -> list[str]:
        return list(self.params)

    def weights(self) -> Iterator[Array]:
        """The weight matrices W1..Wk (the ones the L2 penalty covers)."""
        return (self.params[f"W{l}"] for l in range(1, self.config.k + 1))

    def pack(self) -> Array:
        """All parameters as one flat vector, in ``param_names`` order."""
        return np.concatenate([p.ravel() for p in self.params.values()])

    def unpack(self, theta: Array) -> None:
        """Set all parameters from a flat vector made by ``pack``."""
        sizes = [p.size for p in self.params.values()]
        if theta.shape != (sum(sizes),):
            raise ValueError(f"expected a vector of {sum(sizes)} values, got shape {theta.shape}")
        offset = 0
        for name, size in zip(list(self.params), sizes, strict=True):
            p = self.params[name]
            p[...] = theta[offset : offset + size].reshape(p.shape)
            offset += size

    @classmethod
    def from_arrays(cls, config: NetConfig, params: dict[str, Array], stats: dict[str, Array],
                    bn_updates: int = 0) -> Network:
        """A network holding these arrays (not copied), without drawing initial weights;
        the caller vouches that their names and shapes fit ``config``."""
        net = cls.__new__(cls)
        net.config, net.dtype = config, np.dtype(config.dtype)
        net.params, net.stats, net.bn_updates = params, stats, bn_updates
        net._skips = config.skip_sources()
        return net

    def astype(self, dtype: str) -> Network:
        """A copy of this network with parameters and statistics in another dtype."""
        from dataclasses import replace

        return Network.from_arrays(replace(self.config, dtype=dtype),
                                   {k: v.astype(dtype) for k, v in self.params.items()},
                                   {k: v.astype(dtype) for k, v in self.stats.items()},
                                   self.bn_updates)

    def copy(self) -> Network:
        return self.astype(self.config.dtype)

    # --- forward ------------------------------------------------------------

    def forward(self, X: Array, train: bool, rng: Any = None, update_stats: bool = True,
                stats_sink: Sink | None = None) -> tuple[Array, list[LayerCache]]:
        """Scores (n, K) and, in training mode, the per-layer caches for ``backward``.

        Training mode normalizes with batch statistics, applies dropout (``rng``, a
        Generator, or one per trial for a stack, draws the masks; required when
        dropout > 0) and updates the running averages once
        unless ``update_stats`` is false. ``stats_sink`` collects each batch-norm
        layer's (l, batch mean, biased batch variance), for PreciseBN.
        Evaluation mode uses the running statistics and keeps no caches.
        """
        cfg = self.config
        p = self.params
        caches: list[LayerCache] = []
        outs = [X]  # h_0 = X, h_1, ..., h_{k-1}: inputs of the linear maps
        h = X
        for l in range(1, cfg.k):
            # batch norm adds the bias itself (in the same C call), where no skip comes first
            bias_in_bn = self._fuse_bias and train and cfg.batch_norm and (
                cfg.bn_position == "before" and l not in self._skips)
            b = p[f"b{l}"]
            s = self._affine(l, h, bias=not bias_in_bn)  # (..., n, m_l)
            if l in self._skips:
                s += outs[self._skips[l]]  # residual: s_l += h_{l-2}
            bn: BNCache | LNCache | None = None
            if not (cfg.batch_norm or cfg.layer_norm):
                r = out = relu_forward(s)
            elif cfg.bn_position == "before":
                r, bn = self._batchnorm(s, l, train, update_stats, stats_sink, relu=True,
                                        bias=b if bias_in_bn else None)
                out = r
            else:
                r = relu_forward(s)
                out, bn = self._batchnorm(r, l, train, update_stats, stats_sink)
            mask = None
            if train and cfg.dropout > 0:
                if rng is None:
                    raise ValueError("dropout needs an rng in training mode")
                mask = self._dropout_mask(out.shape, rng)
                out = out * mask
            if train:
                caches.append(LayerCache(h, r, bn, mask))
            h = out
            outs.append(h)
        scores = self._affine(cfg.k, h, bias=True)  # (..., n, K)
        if train:
            caches.append(LayerCache(h, None, None, None))
            if update_stats and cfg.batch_norm:
                self.bn_updates += 1
        return scores, caches

    def _affine(self, l: int, h: Array, bias: bool) -> Array:
        """Layer l's linear map s = h W_l (+ b_l): (n, m_{l-1}) -> (n, m_l); without
        ``bias`` the fused batch-norm kernel adds b_l. ``Stack`` overrides the first
        layer, whose input all trials share."""
        W = self.params[f"W{l}"]
        return linear_forward(h, W, self.params[f"b{l}"]) if bias else kernels.matmul(h, W)

    def _affine_backward(self, l: int, ds: Array, x: Array) -> tuple[Array | None, Array]:
        """(dJ/dx, dJ/dW_l) of layer l's linear map (no dx for the first layer)."""
        return linear_backward(ds, x, self.params[f"W{l}"], need_dx=l > 1)

    def _dropout_mask(self, shape: tuple[int, ...], rng: np.random.Generator) -> Array:
        return dropout_mask(shape, self.config.dropout, rng, self.dtype)

    def _batchnorm(self, s: Array, l: int, train: bool, update_stats: bool, sink: Sink | None,
                   relu: bool = False, bias: Array | None = None,
                   ) -> tuple[Array, BNCache | LNCache | None]:
        """Batch norm (or layer norm) of layer l (then a ReLU when ``relu``): output, cache.

        ``bias``, the linear map's b when the caller left it out, is added to s first
        (in place). In training mode with float32 and the C kernels, that addition,
        batch norm, ReLU and the running averages' update are one call
        (``kernels.bn_relu_forward``), the same maths as the NumPy code.
        """
        gamma, beta = self.params[f"gamma{l}"], self.params[f"beta{l}"]
        eps, n = self.config.bn_eps, s.shape[-2]
        if self.config.layer_norm:  # the same in training and evaluation: no statistics
            y, ln = layernorm_forward(s, gamma, beta, eps)
            return (relu_forward(y) if relu else y), ln if train else None
        mu_av, var_av = self.stats[f"mu{l}"], self.stats[f"var{l}"]
        if not train:
            y = batchnorm_forward_eval(s, gamma, beta, mu_av, var_av, eps)
            return (relu_forward(y) if relu else y), None
        if relu and kernels.enabled(s, gamma, beta, mu_av, var_av,
                                    *(() if bias is None else (bias,))):
            rule = running_rule(self.config, n, first=self.bn_updates == 0)
            y, x_hat, inv_std, mu, var = kernels.bn_relu_forward(
                s, gamma, beta, eps, bias, (mu_av, var_av, *rule) if update_stats else None)
            cache = BNCache(x_hat, inv_std)
        else:
            if bias is not None:
                s += bias
            y, cache, mu, var = batchnorm_forward_train(s, gamma, beta, eps)
            y = relu_forward(y) if relu else y
            if update_stats:
                self._update_running(l, mu, var, n)
        if sink is not None:
            sink.append((l, mu, var))
        return y, cache

    def _update_running(self, l: int, mu: Array, var: Array, n: int) -> None:
        update_running(self.stats[f"mu{l}"], self.stats[f"var{l}"], mu, var, n,
                       self.config, first=self.bn_updates == 0)

    def set_population_stats(self, sink: Sink, sizes: list[int]) -> None:
        """Replace the running statistics by those of all samples together (PreciseBN):
        ``sink`` and ``sizes`` as ``bnstats.population_stats`` takes them."""
        for l, (mu, var) in population_stats(sink, sizes, self.config.bn_convention).items():
            self.stats[f"mu{l}"][...] = mu
            self.stats[f"var{l}"][...] = var

    # --- backward -----------------------------------------------------------

    def backward(self, dscores: Array, caches: list[LayerCache],
                 lam: float = 0.0) -> dict[str, Array]:
        """Gradients of J for every parameter, from dJ/dscores (n, K) and ``forward``'s caches.

        Returns a fresh dict (gradients never accumulate across calls) in
        ``param_names`` order, including the L2 term 2 lambda W on every W.
        """
        cfg = self.config
        p = self.params
        grads: dict[str, Array] = {}
        k = cfg.k
        dh, grads[f"W{k}"] = self._affine_backward(k, dscores, caches[-1].x)
        grads[f"b{k}"] = bias_backward(dscores)
        pending: dict[int, Array] = {}  # gradients reaching h_j through skip connections
        for l in range(k - 1, 0, -1):
            c = caches[l - 1]
            db: Array | None = None  # the bias gradient, when the fused kernel sums it
            assert dh is not None
            if l in pending:
                dh = dh + pending.pop(l)
            if c.mask is not None:
                dh = dh * c.mask
            assert c.relu_out is not None
            if c.bn is None:
                ds = relu_backward(dh, c.relu_out)
            elif cfg.bn_position == "before":
                ds, grads[f"gamma{l}"], grads[f"beta{l}"], db = _bn_relu_backward(
                    dh, c.relu_out, c.bn, p[f"gamma{l}"])
            else:
                dr, grads[f"gamma{l}"], grads[f"beta{l}"] = norm_backward(
                    dh, c.bn, p[f"gamma{l}"])
                ds = relu_backward(dr, c.relu_out)
            if l in self._skips:
                pending[self._skips[l]] = ds
            dh, grads[f"W{l}"] = self._affine_backward(l, ds, c.x)
            grads[f"b{l}"] = bias_backward(ds) if db is None else db
        if lam:
            for l in range(1, k + 1):
                kernels.add_scaled(grads[f"W{l}"], p[f"W{l}"], 2 * lam)
        return {name: grads[name] for name in self.params}

    # --- cost, gradients, evaluation ------------------------------------------

    def loss_and_grads(self, X: Array, y: Labels, lam: float = 0.0,
                       rng: np.random.Generator | None = None, label_smoothing: float = 0.0,
                       check: bool = True, grad_l2: bool = True, mix: Mix | None = None,
                       squares: float | None = None) -> tuple[float, float, dict[str, Array]]:
        """One training-mode pass: (loss, cost, gradients of the cost).

        With ``grad_l2=False`` the gradients leave out the L2 term 2 lambda W, for an
        optimizer that adds it itself (``Optimizer.step(..., l2=2 lambda)``). ``mix``:
        the second labels and weights of a mixed mini-batch (``losses.Mix``).
        ``squares``: sum_l ||W_l||^2 when already known (handed back by the previous
        update, ``Optimizer.step``), else None: computed here.
        """
        if check:
            X, y = self.check_inputs(X, y)
        scores, caches = self.forward(X, train=True, rng=rng)
        loss, dscores = training_loss(scores, y, label_smoothing, mix)
        cost = loss + (lam * squares if squares is not None and lam != 0
                       else l2_penalty(self.weights(), lam))
        return loss, cost, self.backward(dscores, caches, lam if grad_l2 else 0.0)

    def cost(self, X: Array, y: Labels, lam: float = 0.0, train: bool = False,
             rng: np.random.Generator | None = None, label_smoothing: float = 0.0) -> float:
        """J(X, y) in training or evaluation mode (training mode updates running stats)."""
        X, y = self.check_inputs(X, y)
        scores, _ = self.forward(X, train=train, rng=rng)
        return cross_entropy(scores, y, label_smoothing) + l2_penalty(self.weights(), lam)

    def scores(self, X: Array, check: bool = True) -> Array:
        """Evaluation-mode scores (n, K), computed in chunks of EVAL_CHUNK rows."""
        if check:
            X, _ = self.check_inputs(X)
        if len(X) <= EVAL_CHUNK:
            return self.forward(X, train=False)[0]
        return np.concatenate([self.forward(X[i : i + EVAL_CHUNK], train=False)[0]
                               for i in range(0, len(X), EVAL_CHUNK)])

    def predict(self, X: Array) -> npt.NDArray[np.intp]:
        """Most likely class per row (n,)."""
        return self.scores(X).argmax(axis=1)

    def evaluate(self, X: Array, y: Labels, lam: float = 0.0) -> Metrics:
        """Loss, cost and accuracy in evaluation mode."""
        X, y = self.check_inputs(X, y)
        s = self.scores(X, check=False)
        loss = cross_entropy(s, y)
        return Metrics(loss, loss + l2_penalty(self.weights(), lam), accuracy(s, y))

    # --- input validation ---------------------------------------------------

    def check_inputs(self, X: Array, y: Labels | None = None) -> tuple[Array, Labels]:
        """Validate X (n, d) and labels y (n,) in [0, K); return X in the network's dtype."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D array (n examples x d features), got shape "
                             f"{X.shape}")
        if X.shape[1] != self.config.d:
            raise ValueError(f"X has {X.shape[1]} features per row but the network expects "
                             f"d = {self.config.d}")
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
        X = X.astype(self.dtype, copy=False)
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values")
        if y is None:
            return X, np.empty(0, np.int64)
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        K = self.config.num_classes
        if y.size and (y.min() < 0 or y.max() >= K):
            raise ValueError(f"labels must lie in [0, {K}), found {y.min()}..{y.max()}")
        return X, y


def _bn_relu_backward(dh: Array, relu_out: Array, cache: BNCache | LNCache,
                      gamma: Array) -> tuple[Array, Array, Array, Array | None]:
    """Backward through ReLU then batch norm: (ds, dgamma, dbeta, db), fused in C where it
    can be, with db = sum_i ds_i, the bias gradient of the layer's linear map (None from
    the NumPy code: ``bias_backward`` sums it then)."""
    if isinstance(cache, BNCache) and kernels.enabled(dh, relu_out, cache.x_hat,
                                                      cache.inv_std, gamma):
        return kernels.bn_relu_backward(dh, relu_out, cache.x_hat, cache.inv_std, gamma,
                                        want_db=True)
    return (*norm_backward(relu_backward(dh, relu_out), cache, gamma), None)

