"""The C kernels against the NumPy code they replace (the reference), kernel by kernel and
for a whole training step.

The kernels are built by the README's install (``pip install -e .``); a missing build is
a failure here, not a skip, unless KLAYER_KERNELS=numpy asks for the NumPy code only.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from klayer.core import kernels
from klayer.core.config import NetConfig, TrainConfig
from klayer.core.layers import (
    BNCache,
    batchnorm_backward,
    batchnorm_forward_train,
    relu_backward,
    relu_forward,
)
from klayer.core.losses import l2_penalty, softmax_cross_entropy
from klayer.core.network import Network
from klayer.core.optim import OPTIMIZERS, SGD, make_optimizer
from klayer.data.datasets import Data, Split, make_synthetic
from klayer.training.batched import BatchedTrainer
from klayer.training.evaluation import evaluate
from klayer.training.plan import make_plan
from klayer.training.trainer import Trainer

F32 = np.float32


@pytest.fixture(autouse=True)
def built() -> None:
    if os.environ.get("KLAYER_KERNELS", "").strip().lower() == "numpy":
        pytest.skip("KLAYER_KERNELS=numpy: the C kernels are switched off")
    assert kernels.BACKEND == "c", (
        "klayer._kernels is not built (no C compiler at install?); "
        "reinstall with `pip install -e .`, or set KLAYER_KERNELS=numpy to test NumPy only")


@pytest.fixture(params=["c", "numpy"])
def numpy_or_c(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test with the C kernels, then with the NumPy code."""
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "_C", None)


@pytest.fixture
def numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the NumPy reference code everywhere while the test runs."""
    monkeypatch.setattr(kernels, "_C", None)


def layer_input(n: int = 100, m: int = 50, seed: int = 0) -> np.ndarray:
    """Pre-activations with per-feature offsets and scales, as a linear layer's are."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, m)) * rng.uniform(0.05, 20, m) + rng.normal(0, 5, m)
    return s.astype(F32)


# --- kernel by kernel -------------------------------------------------------------------


def test_gather_standardize_is_bit_identical_to_numpy() -> None:
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (500, 37), dtype=np.uint8)
    data = Data(train=Split(X, rng.integers(0, 3, 500)), val=Split(X[:5], np.zeros(5, int)),
                test=Split(X[:5], np.zeros(5, int)), num_classes=3)
    idx = np.concatenate([rng.permutation(500)[:64], [0, 499, 7, 7]])  # repeats and ends
    fused = data.train_rows(idx)
    assert fused.dtype == F32 and fused.shape == (68, 37)
    np.testing.assert_array_equal(fused, data.standardize(X[idx]))
    np.testing.assert_array_equal(data.train_rows(idx, dtype=np.float64),
                                  data.standardize(X[idx], dtype=np.float64))
    # a training loop's buffer is reused when it fits, and left alone when it does not
    buf = np.empty((68, 37), F32)
    assert data.train_rows(idx, out=buf) is buf
    np.testing.assert_array_equal(buf, fused)
    small = np.zeros((4, 37), F32)
    again = data.train_rows(idx, out=small)
    assert again is not small and not small.any()
    np.testing.assert_array_equal(again, fused)
    frozen = np.zeros((68, 37), F32)
    frozen.flags.writeable = False
    assert data.train_rows(idx, out=frozen) is not frozen and not frozen.any()


def test_gather_standardize_rejects_bad_rows_and_sizes() -> None:
    X = np.zeros((10, 4), np.uint8)
    shift, scale = np.zeros(4, F32), np.ones(4, F32)
    with pytest.raises(IndexError, match="row 10 is out of range for 10 rows"):
        kernels.gather_standardize(X, np.array([3, 10]), shift, scale)
    with pytest.raises(IndexError, match="row -1"):
        kernels.gather_standardize(X, np.array([-1]), shift, scale)
    with pytest.raises(ValueError, match="shift: expected 16 bytes, got 12"):
        kernels.gather_standardize(X, np.array([1]), np.zeros(3, F32), scale)


def test_the_extension_refuses_sizes_that_do_not_fit_its_buffers() -> None:
    """Called directly with hostile sizes, the C functions raise instead of overrunning."""
    C, f = kernels._C, (lambda k: np.zeros(k, F32))
    huge = 2**62 + 1  # n * K * 4 would wrap around to a small number
    with pytest.raises(ValueError, match="sizes too large"):
        C.softmax_xent(f(1), np.zeros(1, np.int64), 1, huge, f(1))
    with pytest.raises(ValueError, match="sizes too large"):
        C.gather_standardize(np.zeros(4, np.uint8), 4, huge, np.array([1]), f(1), f(1), f(1))
    with pytest.raises(ValueError, match="sizes too large"):
        C.bn_relu_backward(f(1), f(1), f(1), f(1), f(1), 1, huge, 1, f(1), f(1), f(1), None)
    with pytest.raises(ValueError, match="must not be negative"):
        C.bn_relu_forward(f(1), -1, 1, -1, f(1), f(1), 1e-5, f(1), f(1), f(1), f(1), f(1), None,
                           None)
    with pytest.raises(ValueError, match="y: expected 2 labels, got 1"):
        C.softmax_xent(f(2), np.zeros(1, np.int64), 2, 1, f(2))
    with pytest.raises(ValueError, match="not a whole number of int64s"):
        C.gather_standardize(np.zeros(4, np.uint8), 2, 2, np.zeros(3, np.uint8), f(2), f(2), f(2))
    with pytest.raises(ValueError, match="not a whole number of float32s"):
        C.add_scaled(np.zeros(5, np.uint8), np.zeros(5, np.uint8), 0.1)
    with pytest.raises(TypeError, match="idx must be a 1-d array of row numbers"):
        kernels.gather_standardize(np.zeros((4, 2), np.uint8), np.ones(4, bool), f(2), f(2))


def test_update_wrappers_fall_back_to_numpy_for_other_arrays() -> None:
    p, g = np.ones(4), np.full(4, 0.5)  # float64: NumPy's arithmetic, not the C loop's
    kernels.sgd_step(p, g, 0.1)
    np.testing.assert_array_equal(p, 1 - 0.1 * 0.5)
    kernels.sgd_l2_step(p, g, 0.1, 0.2)
    np.testing.assert_array_equal(g, 0.5)


@pytest.mark.parametrize("n", [1, 2, 100, 257])
def test_bn_relu_forward_matches_numpy(n: int) -> None:
    s = layer_input(n=n, m=13)
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2, 13).astype(F32), rng.normal(0, 1, 13).astype(F32)
    y, x_hat, inv_std, mu, var = kernels.bn_relu_forward(s, gamma, beta, 1e-5)
    # the float64 reference: the kernel's statistics are at least float32-accurate
    y64, c64, mu64, var64 = batchnorm_forward_train(s.astype(np.float64), gamma, beta, 1e-5)
    np.testing.assert_allclose(mu, mu64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, var64, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(inv_std, c64.inv_std, rtol=1e-6)
    np.testing.assert_allclose(x_hat, c64.x_hat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, relu_forward(y64), rtol=1e-4, atol=1e-4)
    # and the float32 NumPy code agrees with it as closely
    y32, c32, _, _ = batchnorm_forward_train(s, gamma, beta, 1e-5)
    np.testing.assert_allclose(y, relu_forward(y32), rtol=1e-4, atol=1e-4)
    assert y.dtype == x_hat.dtype == mu.dtype == F32 and (y >= 0).all()


def test_bn_relu_backward_matches_numpy() -> None:
    s = layer_input()
    rng = np.random.default_rng(2)
    gamma, beta = rng.uniform(0.5, 2, 50).astype(F32), rng.normal(0, 1, 50).astype(F32)
    dh = (rng.standard_normal((100, 50)) * 1e-2).astype(F32)
    y, x_hat, inv_std, _, _ = kernels.bn_relu_forward(s, gamma, beta, 1e-5)
    ds, dgamma, dbeta, _ = kernels.bn_relu_backward(dh, y, x_hat, inv_std, gamma)
    c64 = BNCache(x_hat.astype(np.float64), inv_std.astype(np.float64))
    ref = batchnorm_backward(relu_backward(dh.astype(np.float64), y), c64, gamma)
    scale = np.abs(ref[0]).max()
    np.testing.assert_allclose(ds, ref[0], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(dgamma, ref[1], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dbeta, ref[2], rtol=1e-5, atol=1e-8)
    # batch norm's gradient has zero mean over the batch, per feature
    np.testing.assert_allclose(ds.mean(axis=0), 0, atol=1e-6 * scale)


def test_softmax_cross_entropy_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    scores = (rng.standard_normal((100, 10)) * 4).astype(F32)
    scores[0] += 1e4  # large logits stay finite (the row's maximum is subtracted first)
    y = rng.integers(0, 10, 100)
    loss, dscores = kernels.softmax_cross_entropy(scores, y)
    ref_loss, ref = softmax_cross_entropy(scores.astype(np.float64), y)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(dscores, ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(dscores.sum(axis=1), 0, atol=1e-8)
    with pytest.raises(IndexError, match="label 10 is out of range for 10 classes"):
        kernels.softmax_cross_entropy(scores, np.full(100, 10))


def test_stacked_softmax_cross_entropy_is_each_networks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from klayer.core.losses import training_loss as stacked

    rng = np.random.default_rng(5)
    scores = rng.normal(0, 3, (4, 50, 10)).astype(F32)
    y = rng.integers(0, 10, 50)
    losses, dscores = stacked(scores, y)  # the C path
    for t in range(4):
        loss, ds = kernels.softmax_cross_entropy(scores[t], y)
        assert losses[t] == loss
        np.testing.assert_array_equal(dscores[t], ds)
    monkeypatch.setattr(kernels, "_C", None)
    ref_losses, ref_ds = stacked(scores, y)  # NumPy's arithmetic
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(dscores, ref_ds, atol=1e-8)


def test_update_kernels_are_bit_identical_to_numpy() -> None:
    rng = np.random.default_rng(4)
    W = rng.standard_normal((300, 50)).astype(F32)
    g = rng.standard_normal((300, 50)).astype(F32)
    ref = g + (2 * 0.0037) * W
    kernels.add_scaled(g, W, 2 * 0.0037)
    np.testing.assert_array_equal(g, ref)
    ref = W - np.multiply(g, 0.0731)
    kernels.sgd_step(W, g, 0.0731)
    np.testing.assert_array_equal(W, ref)
    with pytest.raises(ValueError, match="expected"):
        kernels._C.add_scaled(W, g[:10], 0.1)
    fused, ref = W.copy(), W.copy()
    kernels.sgd_l2_step(fused, g, 0.0731, 0.0074)
    kernels.add_scaled(g, ref, 0.0074)
    kernels.sgd_step(ref, g, 0.0731)
    np.testing.assert_array_equal(fused, ref)


@pytest.mark.parametrize("backend", ["c", "numpy"])
@pytest.mark.parametrize("shape, block", [((40, 3 * 7), 7), ((3, 11, 5), 55), ((3, 4), 4)])
def test_stacked_updates_equal_each_trials_lone_update(
        backend: str, shape: tuple[int, ...], block: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """sgd_l2_steps on T = 3 stacked trials (a wide (d, T m) first layer, a (T, ...) stack
    or (T, m) vectors) is each trial's sgd_l2_step (or, with l2 = 0, sgd_step) bit for
    bit, and its sums of squares are the updated trials' to float64 rounding."""
    if backend == "numpy":
        monkeypatch.setattr(kernels, "_C", None)
    rng = np.random.default_rng(7)
    p = rng.standard_normal(shape).astype(F32)
    g = rng.standard_normal(shape).astype(F32)
    lr, l2 = np.array([0.0731, 0.01, 0.3]), np.array([0.0074, 0.0, 2e-5])
    trials = [p.reshape(-1, 3, block)[:, t].copy() for t in range(3)]  # each trial's values
    grads = [g.reshape(-1, 3, block)[:, t].copy() for t in range(3)]
    sq = kernels.sgd_l2_steps(p, g, lr, l2, block)
    for t, (q, gt) in enumerate(zip(trials, grads, strict=True)):
        if l2[t]:
            kernels.sgd_l2_step(q, gt, float(lr[t]), float(l2[t]))
        else:
            kernels.sgd_step(q, gt, float(lr[t]))
        np.testing.assert_array_equal(p.reshape(-1, 3, block)[:, t], q)
        assert sq[t] == pytest.approx(np.sum(q.astype(np.float64) ** 2), rel=1e-6)
    with pytest.raises(ValueError, match="whole rows of 3 blocks"):
        kernels.sgd_l2_steps(p, g, lr, l2, 2 * block + 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.sgd_l2_steps(p.T, g.T, lr, l2, block)


def test_the_update_takes_any_real_scalar(numpy_or_c: None) -> None:
    """An int or float32 lr / l2 (e.g. lam = 1 in a config) means what it says."""
    for lr, l2 in [(1, 0), (np.float32(0.5), np.float32(0.25)), (np.int64(1), 2)]:
        p, g = np.ones(6, F32), np.full(6, 0.5, F32)
        kernels.sgd_l2_step(p, g, lr, l2)
        np.testing.assert_array_equal(p, np.float32(1) - np.float32(lr) * (
            np.float32(0.5) + np.float32(l2) * np.float32(1)))


def test_the_update_of_many_parameters_is_each_ones() -> None:
    """sgd_many (one C call for a network) is sgd_l2_step / sgd_step per parameter, bit for
    bit; a bad pair anywhere raises before anything is written."""
    rng = np.random.default_rng(8)
    shapes = [(30, 8), (8,), (8, 4), (4,)]
    ps = [rng.standard_normal(s).astype(F32) for s in shapes]
    gs = [rng.standard_normal(s).astype(F32) for s in shapes]
    l2s = [0.01, 0.0, 0.02, 0.0]
    refs = [p.copy() for p in ps]
    assert kernels.sgd_many(ps, gs, 0.05, l2s)
    for ref, g, l2 in zip(refs, gs, l2s, strict=True):
        if l2:
            kernels.sgd_l2_step(ref, g, 0.05, l2)
        else:
            kernels.sgd_step(ref, g, 0.05)
    for p, ref in zip(ps, refs, strict=True):
        np.testing.assert_array_equal(p, ref)
    before = [p.copy() for p in ps]
    with pytest.raises(ValueError, match="expected 16 bytes"):
        kernels._C.sgd_many(ps, [*gs[:3], gs[3][:2]], 0.05, np.zeros(4))
    with pytest.raises(ValueError, match="4 parameters, 3 gradients"):
        kernels._C.sgd_many(ps, gs[:3], 0.05, np.zeros(4))
    with pytest.raises(ValueError, match="not C-contiguous"):
        kernels._C.sgd_many([*ps[:3], ps[3][::2]], gs, 0.05, np.zeros(4))
    for p, b in zip(ps, before, strict=True):
        np.testing.assert_array_equal(p, b)
    # not float32 C-contiguous throughout: the wrapper declines, the caller goes one by one
    assert not kernels.sgd_many([ps[0].astype(np.float64)], [gs[0]], 0.05, [0.0])
    assert not kernels.sgd_many([ps[0]], [gs[0].T.copy()], 0.05, [0.0])
    # SGD.step takes whatever Optimizer.step takes: an l2 array goes one by one
    params = {"W1": ps[0].copy(), "b1": ps[1].copy()}
    ref = {k: v.copy() for k, v in params.items()}
    SGD().step(params, {"W1": gs[0], "b1": gs[1]}, 0.05, l2=np.array([0.01]))
    SGD().step(ref, {"W1": gs[0], "b1": gs[1]}, 0.05, l2=0.01)
    for name in params:
        np.testing.assert_array_equal(params[name], ref[name])
    empty = np.zeros((0, 3), F32)  # an empty matrix: nothing to do, either way
    kernels.sgd_l2_step(empty, empty, 0.1, 0.01)
    assert kernels.sgd_many([empty], [empty], 0.1, [0.01])


def test_the_update_of_many_parameters_sums_the_weights_squares() -> None:
    """With ``sq``, sgd_many writes each updated weight's sum of squares (the next step's
    L2 penalty) from the same pass, and the parameters come out bit for bit as without;
    SGD.step hands that penalty back, rounded as l2_penalty's float32 vdots."""
    rng = np.random.default_rng(9)
    shapes = [(37, 19), (19,), (19, 3), (3,)]  # lengths that leave a tail after 16s
    ps = [rng.standard_normal(s).astype(F32) for s in shapes]
    gs = [rng.standard_normal(s).astype(F32) for s in shapes]
    l2s = [0.01, 0.0, 0.02, 0.0]
    refs = [p.copy() for p in ps]
    sq = np.full(4, np.nan)
    assert kernels.sgd_many(ps, gs, 0.05, l2s, sq)
    assert kernels.sgd_many(refs, gs, 0.05, l2s)
    for p, ref in zip(ps, refs, strict=True):
        np.testing.assert_array_equal(p, ref)
    want = [float(np.sum(p.astype(np.float64) ** 2)) if l2 else 0.0
            for p, l2 in zip(ps, l2s, strict=True)]
    np.testing.assert_allclose(sq, want, rtol=1e-13)
    with pytest.raises(ValueError, match="24 bytes of sq"):
        kernels._C.sgd_many(ps, gs, 0.05, np.array(l2s), np.zeros(3))
    np.testing.assert_array_equal(ps[0], refs[0])  # refused before any write
    params = {"W1": ps[0], "b1": ps[1], "W2": ps[2], "b2": ps[3]}
    grads = {"W1": gs[0], "b1": gs[1], "W2": gs[2], "b2": gs[3]}
    squares = SGD().step(params, grads, 0.05, l2=0.02)
    assert squares == pytest.approx(l2_penalty([params["W1"], params["W2"]], 1.0), rel=1e-6)
    assert SGD().step(params, grads, 0.05) is None  # no L2 term: nothing to sum
    # near float32's largest value the trainer's own l2_penalty pass decides, as before
    huge = {"W1": np.full((4, 4), 1e19, F32)}
    assert SGD().step(huge, {"W1": np.zeros((4, 4), F32)}, 0.0, l2=0.01) is None
    assert l2_penalty([huge["W1"]], 1.0) == math.inf
    with pytest.raises(ValueError, match="sq must be"):
        kernels.sgd_many(ps, gs, 0.05, l2s, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="sq must be"):
        raw = np.zeros(8, F32)  # sq over a parameter's own memory
        kernels.sgd_many([raw], [np.zeros(8, F32)], 0.05, [0.0], raw[:2].view(np.float64))


def test_the_stacked_update_refuses_bad_sizes() -> None:
    p = np.zeros((2, 4), F32)
    for lr, block in [(np.zeros(0), 4), (np.zeros((2, 1)), 4), (np.zeros(2), 0)]:
        with pytest.raises(ValueError, match="must be \\(T,\\) arrays"):
            kernels.sgd_l2_steps(p, p, lr, np.zeros(len(lr)), block)
    C, f, d = kernels._C, (lambda k: np.zeros(k, F32)), (lambda k: np.zeros(k))
    with pytest.raises(ValueError, match="T and L must be positive"):
        C.sgd_l2_step(f(4), f(4), d(0), d(0), 0, 4, None)
    with pytest.raises(ValueError, match="sizes too large"):
        C.sgd_l2_step(f(4), f(4), d(1), d(1), 2**62, 1, None)
    with pytest.raises(ValueError, match="l2: expected 16 bytes, got 8"):
        C.sgd_l2_step(f(4), f(4), d(2), d(1), 2, 2, d(2))
    with pytest.raises(ValueError, match="sq: expected 16 bytes, got 8"):
        C.sgd_l2_step(f(4), f(4), d(2), d(2), 2, 2, d(1))
    with pytest.raises(ValueError, match="not whole rows"):
        C.sgd_l2_step(f(6), f(6), d(2), d(2), 2, 2, None)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_optimizer_l2_equals_the_term_in_the_gradient(name: str, backend: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """step(..., l2=a) is step on gradients that already hold a W, bit for bit."""
    if backend == "numpy":
        monkeypatch.setattr(kernels, "_C", None)
    rng = np.random.default_rng(6)
    params = {"W1": rng.standard_normal((30, 8)).astype(F32), "b1": np.ones(8, F32)}
    copy = {k: v.copy() for k, v in params.items()}
    fused, plain = make_optimizer(name), make_optimizer(name)
    for t in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(F32) for k, v in params.items()}
        summed = {k: v.copy() for k, v in grads.items()}
        summed["W1"] += np.float32(0.01) * copy["W1"]
        fused.step(params, grads, 0.05 * (t + 1), l2=0.01)
        plain.step(copy, summed, 0.05 * (t + 1))
        for k in params:
            np.testing.assert_array_equal(params[k], copy[k])


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_momentum_in_one_pass_is_numpys_bit_for_bit(name: str, l2: float,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Momentum and Nesterov through ``kernels.momentum_step`` equal the NumPy update to
    the last bit over several steps with a changing rate, the optimizer state included."""
    rng = np.random.default_rng(7)
    start = {"W1": rng.standard_normal((50, 33)).astype(F32),
             "b1": rng.standard_normal(33).astype(F32)}
    grads = [{k: (rng.standard_normal(v.shape) * 3).astype(F32) for k, v in start.items()}
             for _ in range(4)]
    runs = []
    for backend in ("c", "numpy"):
        with monkeypatch.context() as m:
            if backend == "numpy":
                m.setattr(kernels, "_C", None)
            params, opt = {k: v.copy() for k, v in start.items()}, make_optimizer(name, mu=0.9)
            for t, g in enumerate(grads):
                sq = opt.step(params, {k: v.copy() for k, v in g.items()}, 0.1 / (t + 1), l2=l2)
                # the C pass hands back the updated weights' squares (the next penalty)
                want = np.sum(params["W1"].astype(np.float64) ** 2)
                assert sq is None if backend == "numpy" or not l2 else sq == pytest.approx(
                    want, rel=1e-6)
            runs.append((params, opt.state_dict()))
    (got, got_state), (ref, ref_state) = runs
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert got_state.keys() == ref_state.keys()
    for k in ref_state:
        np.testing.assert_array_equal(got_state[k], ref_state[k])


def test_momentum_step_refuses_what_it_cannot_run() -> None:
    f = np.zeros(6, F32)
    assert kernels.momentum_step(f, f.astype(np.float64), f.copy(), 0.1, 0.9, 0.0, True,
                                 False) is None
    assert kernels.momentum_step(f, f.copy(), np.zeros(5, F32), 0.1, 0.9, 0.0, True,
                                 False) is None
    with pytest.raises(ValueError, match="v: expected 24 bytes, got 20"):
        kernels._C.momentum_step(f, f.copy(), np.zeros(5, F32), 0.1, 0.9, 0.0, True, False)
    with pytest.raises(ValueError, match="must not overlap"):  # (restrict in C)
        kernels._C.momentum_step(f, f, np.zeros(6, F32), 0.1, 0.9, 0.0, True, False)


# --- whole steps ---------------------------------------------------------------------


def loss_and_grads(cfg: NetConfig, X: np.ndarray, y: np.ndarray) -> tuple:
    net = Network(cfg, rng=0)
    return net.loss_and_grads(X.astype(cfg.dtype), y, lam=0.01)


@pytest.mark.parametrize("skips", [False, True])
def test_network_gradients_with_kernels_match_float64_numpy(
    skips: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((64, 30)) * 2 + 1, rng.integers(0, 10, 64)
    cfg = NetConfig(d=30, hidden=(40, 40, 20), dtype="float32", skip=skips)
    loss, cost, grads = loss_and_grads(cfg, X, y)
    with monkeypatch.context() as m:
        m.setattr(kernels, "_C", None)
        ref_loss, ref_cost, ref = loss_and_grads(
            NetConfig(d=30, hidden=(40, 40, 20), dtype="float64", skip=skips), X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and cost == pytest.approx(ref_cost, rel=1e-5)
    top = max(np.abs(r).max() for r in ref.values())
    for name, g in grads.items():
        assert g.dtype == F32
        # a hidden layer's bias has a zero gradient under batch norm: measure it on the
        # scale of the largest gradient
        err = np.abs(g - ref[name]).max() / max(np.abs(ref[name]).max(), 1e-3 * top)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def synthetic(n: int = 600, d: int = 48, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    centers = rng.integers(40, 216, (4, d))
    y = rng.integers(0, 4, n)
    X = np.clip(centers[y] + rng.normal(0, 120, (n, d)), 0, 255).astype(np.uint8)
    return Data(train=Split(X[:400], y[:400]), val=Split(X[400:500], y[400:500]),
                test=Split(X[500:], y[500:]), num_classes=4)


def train(data: Data) -> tuple[list[float], float]:
    cfg = TrainConfig(hidden=(32, 16), lam=0.005, n_s=40, n_batch=20, cycles=2, seed=3)
    tr = Trainer(cfg, data)
    losses = [tr.step() for _ in range(160)]
    return losses, evaluate(tr.net, data, data.val.X, data.val.y).accuracy


def test_training_with_kernels_tracks_the_numpy_run(monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic()
    losses, acc = train(data)
    with monkeypatch.context() as m:
        m.setattr(kernels, "_C", None)
        ref_losses, ref_acc = train(data)
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)  # same batch, same weights
    np.testing.assert_allclose(losses[:20], ref_losses[:20], rtol=1e-3)
    assert abs(acc - ref_acc) <= 0.03 and acc > 0.6


def test_klayer_kernels_numpy_switches_the_extension_off() -> None:
    code = "import klayer.core.kernels as k; print(k.BACKEND)"
    env = {**os.environ, "KLAYER_KERNELS": "numpy"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "numpy"


def test_an_unknown_klayer_kernels_value_is_a_warning_not_silence() -> None:
    code = "import klayer.core.kernels as k; print(k.BACKEND)"
    env = {**os.environ, "KLAYER_KERNELS": "nmupy"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert "KLAYER_KERNELS='nmupy' is neither 'numpy' nor 'c'" in out.stderr
    env.pop("KLAYER_KERNELS")
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True)
    assert out.stdout == unset.stdout  # the default, as if unset


def test_sgd_uses_the_same_update_either_way(numpy_only: None) -> None:
    p = np.arange(12, dtype=F32).reshape(3, 4)
    g = np.full((3, 4), 0.5, F32)
    SGD().step({"W1": p}, {"W1": g}, 0.1)
    np.testing.assert_array_equal(p, np.arange(12, dtype=F32).reshape(3, 4) - np.float32(0.05))


def test_stacked_batch_norm_equals_one_layer_at_a_time() -> None:
    rng = np.random.default_rng(7)
    s = np.stack([layer_input(n=40, m=9, seed=t) for t in range(3)])  # (T, n, m)
    gamma, beta = rng.uniform(0.5, 2, (3, 9)).astype(F32), rng.normal(0, 1, (3, 9)).astype(F32)
    dh = rng.standard_normal(s.shape).astype(F32)
    stacked = kernels.bn_relu_forward(s, gamma, beta, 1e-5)
    back = kernels.bn_relu_backward(dh, stacked[0], stacked[1], stacked[2], gamma)
    for t in range(3):
        one = kernels.bn_relu_forward(s[t], gamma[t], beta[t], 1e-5)
        for a, b in zip(stacked, one, strict=True):
            np.testing.assert_array_equal(a[t], b)
        for a, b in zip(back[:3], kernels.bn_relu_backward(dh[t], *one[:3], gamma[t])[:3],
                        strict=True):
            np.testing.assert_array_equal(a[t], b)


@pytest.mark.parametrize("overrides", [{}, {"optimizer": "momentum"},
                                       {"optimizer": "adamw", "skip": True,
                                        "hidden": (16, 16, 16)}])
def test_float32_trials_trained_together_track_their_lone_runs(
        overrides: dict[str, object]) -> None:
    """The batched trainer's float32 path (C batch norm, loss and, for SGD, the fused
    update over the stack) against lone runs."""
    from training.test_batched import BASE, TRIALS, lone  # (tests/ is on the path)

    data = make_synthetic(n_train=600, seed=0)
    cfgs = [replace(BASE, dtype="float32", lam=lam, eta_max=em, eta=em / 2, seed=s,
                    **overrides) for lam, em, s in TRIALS]
    plans = [make_plan(c, data.train.n) for c in cfgs]
    bt = BatchedTrainer(cfgs, data, [p.lr for p in plans], plans[0].steps_per_epoch,
                        plans[0].total_steps, eval_every=plans[0].eval_every)
    nets = bt.run()
    if not overrides:  # the penalty the fused update handed back: the stack's sum of squares
        assert bt._penalty is not None
        np.testing.assert_allclose(bt._penalty, bt.stack.penalty(), rtol=1e-6)
    # A hidden bias feeding batch norm has a gradient of exactly 0 in exact arithmetic:
    # what the step computes is rounding noise (~1e-8), which differs between a stacked
    # and a lone product wherever BLAS runs them (its rounding depends on the shapes).
    # SGD and momentum move such a bias by lr times that noise; Adam divides it by its
    # own root mean square (in float32 not small beside eps = 1e-8) and moves the bias
    # by up to lr a step, a walk on the noise's signs. So under Adam those biases are
    # left out; every other parameter is held to the bound below.
    adam = cfgs[0].optimizer.startswith("adam") and cfgs[0].batch_norm
    skip = {f"b{l}" for l in range(1, len(cfgs[0].hidden) + 1)} if adam else set()
    for cfg, net in zip(cfgs, nets, strict=True):
        assert net is not None
        ref = lone(cfg, data, order_seed=cfgs[0].seed).net
        for name, p in ref.params.items():  # (hidden biases stay near 0 under batch norm)
            if name in skip:
                continue
            err = np.abs(net.params[name] - p).max() / max(np.abs(p).max(), 0.1)
            assert err < 1e-5, f"{name}: {err:.1e}"
