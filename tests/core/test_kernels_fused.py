"""What the batch-norm kernels do besides their main pass, so that a hidden layer costs
one call from Python each way: the bias and the running statistics in the forward call,
the bias gradient in the backward call.

Each is checked against the NumPy code it stands for (``layers``, ``bnstats``); like
tests/test_kernels.py, a missing build fails here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from klayer.core import kernels
from klayer.core.bnstats import running_rule, update_running
from klayer.core.config import NetConfig
from klayer.core.network import Network

F32 = np.float32


@pytest.fixture(autouse=True)
def built() -> None:
    if os.environ.get("KLAYER_KERNELS", "").strip().lower() == "numpy":
        pytest.skip("KLAYER_KERNELS=numpy: the C kernels are switched off")
    assert kernels.BACKEND == "c", "klayer._kernels is not built; reinstall with pip install -e ."


def layer(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, ...]:
    """Pre-activations s, bias b, gamma and beta for a (..., n, m) layer (a stack: T first)."""
    rng = np.random.default_rng(seed)
    *T, n, m = shape
    s = (rng.standard_normal(shape) * rng.uniform(0.1, 10, m) + rng.normal(0, 3, m)).astype(F32)
    b, beta = (rng.normal(0, 2, (*T, m)).astype(F32) for _ in range(2))
    gamma = rng.uniform(0.5, 2, (*T, m)).astype(F32)
    return s, b, gamma, beta


@pytest.mark.parametrize("shape", [(100, 50), (3, 40, 9)])
def test_the_bias_added_in_the_call_is_numpys_addition(shape: tuple[int, ...]) -> None:
    s, b, gamma, beta = layer(shape)
    expected = s + (b[:, None, :] if s.ndim == 3 else b)  # NumPy's float32 s + b
    fused = kernels.bn_relu_forward(s, gamma, beta, 1e-5, b=b)
    np.testing.assert_array_equal(s, expected)  # s now holds s + b, as linear_forward's
    for got, want in zip(fused, kernels.bn_relu_forward(expected.copy(), gamma, beta, 1e-5),
                         strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("convention", ["assignment", "pytorch"])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("shape", [(100, 50), (3, 40, 9), (1, 7)])
def test_the_running_statistics_updated_in_the_call_are_update_runnings(
        convention: str, first: bool, shape: tuple[int, ...]) -> None:
    """Bit for bit, both conventions, the first batch or a later one, one layer or a stack
    (and one row, where torch's unbiased variance has nothing to divide by)."""
    s, _, gamma, beta = layer(shape, seed=1)
    cfg = NetConfig(d=4, hidden=(8,), bn_convention=convention, bn_alpha=0.83)
    n, stat_shape = shape[-2], (*shape[:-2], shape[-1])
    rng = np.random.default_rng(2)
    mu_av, var_av = rng.normal(0, 1, stat_shape).astype(F32), rng.uniform(0.1, 3, stat_shape)
    var_av = var_av.astype(F32)
    ref_mu, ref_var = mu_av.copy(), var_av.copy()
    rule = running_rule(cfg, n, first)
    _, _, _, mu, var = kernels.bn_relu_forward(s, gamma, beta, 1e-5,
                                               running=(mu_av, var_av, *rule))
    update_running(ref_mu, ref_var, mu, var, n, cfg, first)
    np.testing.assert_array_equal(mu_av, ref_mu)
    np.testing.assert_array_equal(var_av, ref_var)
    assert not np.array_equal(mu_av, mu) or (first and convention == "assignment")


def test_bad_extras_raise_before_anything_is_written() -> None:
    s, b, gamma, beta = layer((10, 4))
    keep = s.copy()
    mu_av, var_av = np.zeros(4, F32), np.ones(4, F32)
    rule = running_rule(NetConfig(d=4, hidden=(4,)), 10, False)
    with pytest.raises(ValueError, match="mu_av: expected 16 bytes"):
        kernels.bn_relu_forward(s, gamma, beta, 1e-5, b=b, running=(mu_av[:3], var_av, *rule))
    with pytest.raises(ValueError, match="b: expected 16 bytes"):
        kernels.bn_relu_forward(s, gamma, beta, 1e-5, b=b[:2])
    for bad in (b.astype(np.float64), np.zeros(8, F32)[::2], np.zeros(4, np.int32)):
        with pytest.raises(TypeError, match="b must be a C-contiguous float32"):
            kernels.bn_relu_forward(s, gamma, beta, 1e-5, b=bad)
    with pytest.raises(TypeError, match="var_av must be a C-contiguous float32"):
        kernels.bn_relu_forward(s, gamma, beta, 1e-5, running=(mu_av, np.ones(4), *rule))
    C, out = kernels._C, [np.empty_like(s), np.empty_like(s)] + [np.empty(4, F32)] * 3
    with pytest.raises(TypeError, match="running must be a tuple"):
        C.bn_relu_forward(s, 1, 10, 4, gamma, beta, 1e-5, *out, None, [mu_av, var_av, *rule])
    with pytest.raises(TypeError):  # too short a tuple
        C.bn_relu_forward(s, 1, 10, 4, gamma, beta, 1e-5, *out, None, (mu_av, var_av))
    var_av.flags.writeable = False
    with pytest.raises(TypeError, match="read-write"):
        C.bn_relu_forward(s, 1, 10, 4, gamma, beta, 1e-5, *out, b, (mu_av, var_av, *rule))
    var_av.flags.writeable = True
    np.testing.assert_array_equal(s, keep)
    np.testing.assert_array_equal(mu_av, 0)
    np.testing.assert_array_equal(var_av, 1)
    # s is written only when a bias is to be added: a read-only s is fine without one
    s.flags.writeable = False
    kernels.bn_relu_forward(s, gamma, beta, 1e-5)
    with pytest.raises(ValueError, match="read-only"):
        kernels.bn_relu_forward(s, gamma, beta, 1e-5, b=b)
    np.testing.assert_array_equal(s, keep)


@pytest.mark.parametrize("shape", [(100, 50), (3, 40, 9), (257, 2), (100, 1), (2, 30, 1),
                                   (1, 5)])
def test_the_backward_call_sums_the_bias_gradient(shape: tuple[int, ...]) -> None:
    s, _, gamma, beta = layer(shape, seed=3)
    y, x_hat, inv_std, _, _ = kernels.bn_relu_forward(s, gamma, beta, 1e-5)
    dh = np.random.default_rng(4).standard_normal(shape).astype(F32)
    ds, dgamma, dbeta, db = kernels.bn_relu_backward(dh, y, x_hat, inv_std, gamma, want_db=True)
    plain = kernels.bn_relu_backward(dh, y, x_hat, inv_std, gamma)
    assert plain[3] is None and db is not None and db.dtype == F32
    for got, want in zip((ds, dgamma, dbeta), plain[:3], strict=True):
        np.testing.assert_array_equal(got, want)  # the extra sum changes nothing else
    # NumPy's float32 sum over the rows, bit for bit (so training keeps its trajectory)
    np.testing.assert_array_equal(db.view(np.int32), ds.sum(axis=-2).view(np.int32))
    assert np.abs(db).max() <= 1e-4 * np.abs(ds).sum(axis=-2).max()  # ~0 under batch norm
    if ds.ndim == 3:  # a stack: each layer's own sums
        for t in range(len(ds)):
            one = kernels.bn_relu_backward(dh[t], y[t], x_hat[t], inv_std[t], gamma[t],
                                           want_db=True)
            for got, want in zip((ds, dgamma, dbeta, db), one, strict=True):
                assert want is not None
                np.testing.assert_array_equal(got[t], want)


def biased_net(convention: str = "assignment") -> Network:
    """A float32 net whose biases are not zero (a fresh net's are, hiding a lost bias)."""
    net = Network(NetConfig(d=30, hidden=(20, 20), dtype="float32", bn_convention=convention),
                  rng=0)
    rng = np.random.default_rng(8)
    for name, p in net.params.items():
        if name.startswith("b"):
            p[...] = rng.normal(0, 3, p.shape)
    return net


@pytest.mark.parametrize("convention", ["assignment", "pytorch"])
def test_a_network_with_the_fused_calls_computes_what_numpy_does(
        convention: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three training passes and a PreciseBN pass through a float32 net with non-zero
    biases, with the kernels and without: running averages, the PreciseBN sink, the
    evaluation scores and the gradients agree to float32 rounding (the kernels' batch
    statistics are double sums)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((64, 30)).astype(F32) * 3 + 1
    y = rng.integers(0, 10, 64)
    runs = []
    for use_c in (True, False):
        with monkeypatch.context() as m:
            if not use_c:
                m.setattr(kernels, "_C", None)
            net = biased_net(convention)
            for _ in range(3):
                net.forward(X, train=True)
            sink: list[tuple[int, np.ndarray, np.ndarray]] = []
            net.forward(X[:40], train=True, update_stats=False, stats_sink=sink)
            _, _, grads = net.loss_and_grads(X, y, lam=0.01)
            runs.append((dict(net.stats), sink, net.scores(X), grads))
    (stats, sink, scores, grads), (ref_stats, ref_sink, ref_scores, ref_grads) = runs
    for name, value in stats.items():
        np.testing.assert_allclose(value, ref_stats[name], rtol=1e-5, atol=1e-6)
    for (l, mu, var), (l_ref, mu_ref, var_ref) in zip(sink, ref_sink, strict=True):
        assert l == l_ref
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    top = max(np.abs(g).max() for g in ref_grads.values())
    for name, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[name], rtol=0, atol=1e-4 * top)


def test_a_bias_the_kernel_cannot_take_goes_through_numpy() -> None:
    """A float32 net whose bias was replaced by another dtype or a strided view trains
    as the NumPy code would, instead of failing or reading the bias's bits as floats."""
    X = np.random.default_rng(9).standard_normal((32, 30)).astype(F32)
    ref = biased_net()
    ref.forward(X, train=True)
    for bias in (lambda b: b.astype(np.float64), lambda b: np.repeat(b, 2)[::2],
                 lambda b: np.rint(b).astype(np.int32)):
        net = biased_net()
        net.params["b1"] = bias(net.params["b1"])
        want = biased_net()
        want.params["b1"] = net.params["b1"].astype(F32)  # the same values, as float32
        net.forward(X, train=True)
        want.forward(X, train=True)
        for name, value in net.stats.items():
            np.testing.assert_allclose(value, want.stats[name], rtol=1e-5, atol=1e-6)
