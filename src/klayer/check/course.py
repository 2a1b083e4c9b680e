"""The course's forward and backward pass, in its column convention, with mistakes to switch on.

This is the assignment's own algorithm, line by line (X is d x n, W_l is m_l x m_{l-1},
b, gamma, beta are m_l x 1), in float64. With no mistake switched on it computes the
exact gradients (tests/check/ proves them equal to ``core.network.Network``'s); each
``bugs.BugModel`` switches one mistake on at one layer (``on(name, l)``), so that the
checker can find which mistake reproduces a student's gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
On = Callable[[str, int], bool]  # is mistake ``name`` switched on at layer l?


def never(name: str, l: int) -> bool:
    return False


@dataclass
class Case:
    """A small problem in the course's convention: data, parameters, lambda and epsilon."""

    X: Array  # (d, n)
    Y: Array  # (K, n) one-hot
    W: list[Array]  # W[l-1]: (m_l, m_{l-1}), l = 1..k
    b: list[Array]  # (m_l, 1)
    gamma: list[Array] = field(default_factory=list)  # (m_l, 1), hidden layers; [] without BN
    beta: list[Array] = field(default_factory=list)
    lam: float = 0.0
    eps: float = 1e-12

    @property
    def k(self) -> int:
        return len(self.W)

    @property
    def batch_norm(self) -> bool:
        return bool(self.gamma)

    @property
    def n(self) -> int:
        return self.X.shape[1]


@dataclass
class Forward:
    """Every intermediate value of the forward pass, by the course's names (l = 1..k-1)."""

    S: list[Array] = field(default_factory=list)  # scores W_l X_{l-1} + b_l (layer k too)
    mu: list[Array] = field(default_factory=list)  # batch means (m_l, 1)
    v: list[Array] = field(default_factory=list)  # batch variances (m_l, 1)
    S_hat: list[Array] = field(default_factory=list)  # normalized scores
    S_tilde: list[Array] = field(default_factory=list)  # gamma * S_hat + beta
    X: list[Array] = field(default_factory=list)  # X_0 = the input, X_l = ReLU(...)
    P: Array | None = None  # (K, n) softmax probabilities
    J: float = float("nan")  # the cost, L2 term included


def softmax(S: Array) -> Array:
    e = np.exp(S - S.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def forward(case: Case, eps: float | None = None, on: On = never) -> Forward:
    """The course's forward pass (ε = the case's unless given) and the cost J."""
    eps = case.eps if eps is None else eps
    f, n, k = Forward(X=[case.X]), case.n, case.k
    for l in range(1, k):
        S = case.W[l - 1] @ f.X[-1] + case.b[l - 1]  # s_l = W_l x_{l-1} + b_l   (m_l, n)
        f.S.append(S)
        H = S
        if case.batch_norm:
            H = _batch_norm(f, S, l, case, eps, on)
        X = S if on("scores_passed_on", l) else H if on("no_relu", l) else np.maximum(H, 0)
        f.X.append(X)  # x_l = max(0, s~_l)
    S = case.W[-1] @ f.X[-1] + case.b[-1]  # (K, n)
    f.S.append(S)
    f.P = softmax(softmax(S)) if on("softmax_twice", k) else softmax(S)
    loss = -np.log((case.Y * f.P).sum(axis=0))  # (n,)
    squares = [(W * W).sum() for W in case.W]
    if on("cost_not_squared", k):
        squares = [np.abs(W).sum() for W in case.W]
    l2 = case.lam * sum(squares) / (n if on("cost_l2_over_n", k) else 1)
    f.J = float(loss.mean() + (0.0 if on("cost_no_l2", k) else l2))
    return f


def _batch_norm(f: Forward, S: Array, l: int, case: Case, eps: float, on: On) -> Array:
    """mu, v, S_hat and S_tilde of layer l (recorded in f); returns S_tilde."""
    n = S.shape[1]
    mu = S.mean(axis=1, keepdims=True)  # mu_l = 1/n sum_i s_i             (m_l, 1)
    v = ((S - mu) ** 2).mean(axis=1, keepdims=True)  # v_l = 1/n sum_i (s_i - mu_l)^2
    if on("var_unbiased", l):
        v = v * n / (n - 1)
    elif on("var_rescaled", l):
        v = v * (n - 1) / n
    elif on("std_as_var", l):
        v = np.sqrt(v)
    f.mu.append(mu)
    f.v.append(v)
    if on("eps_outside_sqrt", l):
        inv = 1 / (np.sqrt(v) + eps)
    else:
        inv = (v + eps) ** -0.5  # diag(v_l + eps)^(-1/2)
    if on("sigma_first_unit", l) or on("sigma_first_unit_both", l):
        inv = np.full_like(inv, inv[0, 0])  # np.diag of an m x 1 column: one unit's sigma
    S_hat = inv * (S - mu)  # s^_l                                         (m_l, n)
    shift = case.b[l - 1] if on("b_for_beta", l) else case.beta[l - 1]
    S_tilde = case.gamma[l - 1] * S_hat + shift  # s~_l = gamma_l . s^_l + beta_l
    f.S_hat.append(S_hat)
    f.S_tilde.append(S_tilde)
    return S_tilde


def backward(case: Case, f: Forward, eps: float | None = None,
             on: On = never) -> dict[str, Array]:
    """The course's backward pass: the gradients of J, by name (W1, b1, gamma1, ...)."""
    eps = case.eps if eps is None else eps
    n, k, lam = case.n, case.k, case.lam
    assert f.P is not None
    G = -(case.Y - f.P)  # G_batch = -(Y - P)                                    (K, n)
    if on("double_1_over_n", k):
        G = G / n
    grads: dict[str, Array] = {}
    for l in range(k, 0, -1):
        if l < k:
            G = _hidden_backward(grads, G, f, case, l, eps, on)
        _linear_grads(grads, G, f.X[l - 1], case.W[l - 1], l, lam, on)
        if l > 1:
            W = case.W[l - 1]
            G = W @ G if on("W_not_transposed", l) else W.T @ G  # G = W_l^T G
            mask = f.S[l - 2] if on("relu_mask_on_scores", l - 1) else f.X[l - 1]
            G = G * (mask > 0)  # G = G . Ind(x_{l-1} > 0)
    return grads


def _linear_grads(grads: dict[str, Array], G: Array, X: Array, W: Array, l: int,
                  lam: float, on: On) -> None:
    """grad W_l = 1/n G X_{l-1}^T + 2 lambda W_l and grad b_l = 1/n G 1_n."""
    n = G.shape[1]
    scale = 1.0 if on("no_1_over_n", l) else 1 / n
    data = scale * G @ X.T
    if on("grad_W_transposed", l):
        data = data.T
    reg = (data if on("l2_from_gradient", l) else W) * (lam if on("l2_lambda", l) else 2 * lam)
    grads[f"W{l}"] = data + reg
    grads[f"b{l}"] = scale * G.sum(axis=1, keepdims=True)


def _hidden_backward(grads: dict[str, Array], G: Array, f: Forward, case: Case, l: int,
                     eps: float, on: On) -> Array:
    """Back through layer l's batch norm (if any): the gamma, beta gradients and G."""
    if not case.batch_norm:
        return G
    n = G.shape[1]
    scale = 1.0 if on("gamma_beta_no_1_over_n", l) else 1 / n
    dgamma = scale * (G * f.S_hat[l - 1]).sum(axis=1, keepdims=True)  # 1/n (G . s^) 1_n
    dbeta = scale * G.sum(axis=1, keepdims=True)  # 1/n G 1_n
    if on("gamma_beta_scalar", l):
        dgamma, dbeta = np.full_like(dgamma, dgamma.sum()), np.full_like(dbeta, dbeta.sum())
    grads[f"gamma{l}"], grads[f"beta{l}"] = dgamma, dbeta
    G = G * case.gamma[l - 1]  # G = G . (gamma_l 1_n^T)
    if on("no_bn_backward", l):
        return G
    return _bn_backward(G, f.S[l - 1], f.mu[l - 1], f.v[l - 1], l, eps, on)


def _bn_backward(G: Array, S: Array, mu: Array, v: Array, l: int, eps: float,
                 on: On) -> Array:
    """The course's BatchNormBackPass, step by step."""
    n = G.shape[1]
    sigma1 = (v + eps) ** -0.5  # sigma_1 = (v + eps)^(-1/2)                     (m, 1)
    sigma2 = (v + eps) ** -1.5  # sigma_2 = (v + eps)^(-3/2)
    if on("sigma_first_unit_both", l):
        sigma1, sigma2 = np.full_like(sigma1, sigma1[0, 0]), np.full_like(sigma2, sigma2[0, 0])
    G1 = G * sigma1  # G_1 = G . (sigma_1 1_n^T)                                  (m, n)
    G2 = G * (sigma1 if on("sigma1_for_sigma2", l) else sigma2)  # G_2 = G . (sigma_2 1^T)
    D = S - mu  # D = s_l - mu_l 1_n^T
    c = G2 * D if on("c_not_summed", l) else (G2 * D).sum(axis=1, keepdims=True)  # (G_2.D) 1
    mean_term = 0.0 if on("bn_no_mean_term", l) else G1.sum(axis=1, keepdims=True) / n
    var_term = 0.0 if on("bn_no_var_term", l) else D * c / n
    return G1 - mean_term - var_term  # G_1 - 1/n (G_1 1) 1^T - 1/n D . (c 1^T)
