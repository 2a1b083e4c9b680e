"""Analytic gradients against centered finite differences, every element of every tensor."""

from __future__ import annotations

import numpy as np
import pytest

from klayer.core.config import NetConfig
from klayer.core.gradcheck import (
    GradCheckRow,
    check_gradients,
    default_tol,
    judge,
    make_check_problem,
    rel_error,
)

BOUND = default_tol()  # klayer gradcheck's default --tol must pass every correct net below

HIDDEN = {
    1: (),
    2: (16,),
    3: (16, 12),
    4: (16, 12, 10),
    9: (20, 15, 12, 10, 10, 8, 8, 8),
}


def worst(cfg: NetConfig, lam: float, n: int = 10, seed: int = 0) -> dict[str, float]:
    net, X, y = make_check_problem(cfg, n=n, seed=seed)
    rows = check_gradients(net, X, y, lam=lam, seed=seed)
    assert {r.name for r in rows} == set(net.params)
    assert all(r.checked == int(np.prod(r.shape)) for r in rows)  # every element
    return {r.name: r.max_rel_error for r in rows}


# k = 1 is a linear classifier: it has no hidden layer for batch norm to act on.
GRID = [(k, bn) for k in sorted(HIDDEN) for bn in (False, True) if k > 1 or not bn]


@pytest.mark.parametrize(("k", "bn"), GRID)
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_gradients_exact(k: int, bn: bool, lam: float) -> None:
    errors = worst(NetConfig(d=12, hidden=HIDDEN[k], batch_norm=bn), lam)
    assert max(errors.values()) <= BOUND, errors


@pytest.mark.parametrize(
    "extra",
    [
        {"bn_position": "after"},
        {"dropout": 0.3},
        {"dropout": 0.5, "bn_position": "after"},
        {"skip": True},
        {"skip": True, "dropout": 0.2},
    ],
    ids=["bn-after", "dropout", "dropout-bn-after", "skip", "skip-dropout"],
)
def test_gradients_exact_options(extra: dict) -> None:
    cfg = NetConfig(d=12, hidden=(16, 16, 16, 16, 16), batch_norm=True, **extra)
    assert max(worst(cfg, lam=0.1).values()) <= BOUND


def test_skip_without_batch_norm_and_label_smoothing() -> None:
    cfg = NetConfig(d=12, hidden=(10, 10, 10), batch_norm=False, skip=True)
    net, X, y = make_check_problem(cfg, n=8, seed=3)
    rows = check_gradients(net, X, y, lam=0.05, label_smoothing=0.1)
    assert max(r.max_rel_error for r in rows) <= BOUND


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_targets_of_mixup_and_cutmix(smoothing: float) -> None:
    """The cost of a mixed mini-batch, w CE(y) + (1 - w) CE(y2), against numerical
    differences; and its gradients are the w-weighted mix of the two labels' gradients
    (the gradient is linear in the target)."""
    cfg = NetConfig(d=12, hidden=(16, 16, 16), batch_norm=True)
    net, X, y = make_check_problem(cfg, n=10, seed=4)
    rng = np.random.default_rng(2)
    y2 = rng.integers(0, cfg.num_classes, 10)
    w = np.full(10, 0.3)
    rows = check_gradients(net, X, y, lam=0.05, label_smoothing=smoothing, mix=(y2, w))
    assert max(r.max_rel_error for r in rows) <= BOUND
    _, _, mixed = net.copy().loss_and_grads(X, y, label_smoothing=smoothing, mix=(y2, w))
    _, _, g1 = net.copy().loss_and_grads(X, y, label_smoothing=smoothing)
    _, _, g2 = net.copy().loss_and_grads(X, y2, label_smoothing=smoothing)
    for name, g in mixed.items():
        np.testing.assert_allclose(g, 0.3 * g1[name] + 0.7 * g2[name], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("k", [2, 3, 4, 9])
@pytest.mark.parametrize("extra", [{}, {"bn_position": "after"}, {"skip": True},
                                   {"dropout": 0.2}, {"bn_eps": 1e-5}],
                         ids=["before", "after", "skip", "dropout", "eps1e-5"])
def test_layer_norm_gradients_exact(k: int, extra: dict) -> None:
    cfg = NetConfig(d=12, hidden=HIDDEN[k], batch_norm=False, layer_norm=True, **extra)
    assert max(worst(cfg, lam=0.1).values()) <= BOUND


@pytest.mark.parametrize("norm", [{}, {"batch_norm": False, "layer_norm": True}],
                         ids=["bn", "ln"])
def test_inverted_bottleneck_residual_blocks(norm: dict) -> None:
    """--skip with widths w, 4w, w, 4w, w: two inverted-bottleneck residual blocks
    (s_3 += h_1, s_5 += h_3), the block of Bachmann et al.'s MLPs with layer norm."""
    cfg = NetConfig(d=12, hidden=(8, 32, 8, 32, 8), skip=True, **norm)
    assert cfg.skip_sources() == {3: 1, 5: 3}
    assert max(worst(cfg, lam=0.1).values()) <= BOUND


def test_layer_norm_is_the_same_in_training_and_evaluation() -> None:
    cfg = NetConfig(d=12, hidden=(16, 12), batch_norm=False, layer_norm=True, dtype="float64")
    net, X, _ = make_check_problem(cfg, n=10, seed=1)
    train, _ = net.forward(X, train=True)
    np.testing.assert_allclose(net.forward(X, train=False)[0], train, rtol=1e-12)
    assert net.stats == {} and {"gamma1", "beta1", "gamma2", "beta2"} <= set(net.params)
    one = net.forward(X[:1], train=True)[0]  # per example: no batch statistics
    np.testing.assert_allclose(one, train[:1], rtol=1e-12)
    with pytest.raises(ValueError, match="layer_norm replaces batch norm"):
        NetConfig(d=12, layer_norm=True)


def test_checker_catches_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker must fail loudly on a small but real backward-pass bug."""
    import klayer.core.layers as layers_mod

    real = layers_mod.batchnorm_backward

    def off_by_a_bit(dy, cache, gamma):  # type: ignore[no-untyped-def]
        ds, dg, db = real(dy, cache, gamma)
        return ds * 1.001, dg, db

    monkeypatch.setattr(layers_mod, "batchnorm_backward", off_by_a_bit)
    errors = worst(NetConfig(d=12, hidden=(16, 12), batch_norm=True), lam=0.0)
    assert errors["W1"] > 1e-4  # the first layer sees the corrupted signal
    assert errors["W3"] <= BOUND  # the last layer does not


def test_sampled_variant_checks_the_requested_number() -> None:
    net, X, y = make_check_problem(NetConfig(d=30, hidden=(40, 20), batch_norm=False), n=6)
    rows = check_gradients(net, X, y, lam=0.01, sample=25)
    assert [r.checked for r in rows] == [25, 25, 25, 20, 25, 10]
    assert max(r.max_rel_error for r in rows) <= BOUND


def test_check_leaves_the_network_untouched() -> None:
    net, X, y = make_check_problem(NetConfig(d=12, hidden=(8,), batch_norm=True), n=6)
    before = {k: v.copy() for k, v in {**net.params, **net.stats}.items()}
    check_gradients(net, X, y)
    for k, v in {**net.params, **net.stats}.items():
        np.testing.assert_array_equal(v, before[k])
    assert net.bn_updates == 0


def test_rel_error_definition() -> None:
    assert rel_error(np.array([1.0]), np.array([1.0])) == 0.0
    assert rel_error(np.array([1.0]), np.array([3.0])) == pytest.approx(0.5)
    assert rel_error(np.array([0.0]), np.array([1e-9]), floor=1e-6) == pytest.approx(1e-3)


def _row(name: str, err: float) -> GradCheckRow:
    return GradCheckRow(name, (2,), 2, err, err * 1e-6, 1.0)


def test_verdict_names_the_worst_tensor_and_the_tolerance() -> None:
    rows = [_row("W1", 3e-9), _row("b1", 2e-7), _row("W2", 1e-8)]
    ok = judge(rows, 1e-6)
    assert (ok.passed, ok.worst, ok.max_rel_error, ok.tol) == (True, "b1", 2e-7, 1e-6)
    assert ok.line() == "PASS: max relative error 2.000e-07 (b1) <= tol 1e-06"
    bad = judge(rows, 1e-7)
    assert not bad.passed and bad.line() == "FAIL: max relative error 2.000e-07 (b1) > tol 1e-07"
    assert judge(rows, 2e-7).passed  # the tolerance itself passes


def test_a_nan_error_fails() -> None:
    v = judge([_row("W1", 1e-9), _row("gamma1", float("nan")), _row("W2", 1e-8)], 1e-6)
    assert not v.passed and v.worst == "gamma1"


def test_default_tol_matches_the_precision() -> None:
    extended = np.finfo(np.longdouble).eps < 1e-18
    assert default_tol() == (1e-6 if extended else 1e-3)
