"""Optimizers: hand-computed single steps, torch.optim as an oracle, state, dtypes, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from klayer.core.optim import (
    OPTIMIZERS,
    SGD,
    Adam,
    Momentum,
    Nesterov,
    Optimizer,
    make_optimizer,
)

SHAPES = {"W1": (5, 4), "b1": (1, 4), "gamma1": (1, 4), "beta1": (1, 4), "W2": (4, 3),
          "b2": (1, 3)}
LRS = [0.1, 0.1, 0.03, 0.25, 0.25, 0.007]  # changes of lr between steps
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {}),
    ("momentum", {"mu": 0.9}),
    ("nesterov", {"mu": 0.8}),
    ("adam", {"beta1": 0.85, "beta2": 0.99, "eps": 1e-6}),
    ("adamw", {"weight_decay": 0.3}),
]


def make_params(dtype: type = np.float64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def make_grads(n: int, dtype: type = np.float64, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
            for _ in range(n)]


# --- one step by hand --------------------------------------------------------------------

P0, G1, G2 = np.array([[1.5, -2.0, 0.25]]), np.array([[0.4, -3.0, 1e-3]]), np.array(
    [[-1.2, 0.5, 2.0]])


def run(opt: Optimizer, grads: list[np.ndarray], lrs: list[float], name: str = "W1") -> Any:
    params = {name: P0.copy()}
    for g, lr in zip(grads, lrs, strict=True):
        opt.step(params, {name: g}, lr)
    return params[name]


def test_sgd_by_hand() -> None:
    np.testing.assert_allclose(run(SGD(), [G1], [0.3]), P0 - 0.3 * G1, rtol=1e-15)


def test_momentum_by_hand() -> None:
    mu = 0.7
    # v1 = g1 (torch's first step), p1 = p0 - lr1 v1; v2 = mu v1 + g2, p2 = p1 - lr2 v2.
    np.testing.assert_allclose(run(Momentum(mu), [G1], [0.3]), P0 - 0.3 * G1, rtol=1e-15)
    expected = P0 - 0.3 * G1 - 0.05 * (mu * G1 + G2)
    np.testing.assert_allclose(run(Momentum(mu), [G1, G2], [0.3, 0.05]), expected, rtol=1e-14)


def test_nesterov_by_hand() -> None:
    mu = 0.7
    # step 1: v1 = g1, p1 = p0 - lr (g1 + mu g1); step 2: v2 = mu g1 + g2.
    p1 = P0 - 0.3 * (1 + mu) * G1
    np.testing.assert_allclose(run(Nesterov(mu), [G1], [0.3]), p1, rtol=1e-14)
    p2 = p1 - 0.05 * (G2 + mu * (mu * G1 + G2))
    np.testing.assert_allclose(run(Nesterov(mu), [G1, G2], [0.3, 0.05]), p2, rtol=1e-14)


def test_adam_by_hand() -> None:
    b1, b2, eps, lr = 0.8, 0.95, 1e-3, 0.1
    # step 1: m/(1-b1) = g, v/(1-b2) = g^2, so the step is lr g / (|g| + eps).
    expected1 = P0 - lr * G1 / (np.abs(G1) + eps)
    np.testing.assert_allclose(run(Adam(b1, b2, eps), [G1], [lr]), expected1, rtol=1e-14)
    m = b1 * (1 - b1) * G1 + (1 - b1) * G2
    v = b2 * (1 - b2) * G1**2 + (1 - b2) * G2**2
    expected2 = expected1 - 0.02 * m / (1 - b1**2) / (np.sqrt(v / (1 - b2**2)) + eps)
    got = run(Adam(b1, b2, eps), [G1, G2], [lr, 0.02])
    np.testing.assert_allclose(got, expected2, rtol=1e-14)


def test_adamw_by_hand_decays_only_weight_matrices() -> None:
    wd, lr, eps = 0.2, 0.1, 1e-8
    step = lr * G1 / (np.abs(G1) + eps)
    got_w = run(make_optimizer("adamw", weight_decay=wd), [G1], [lr], name="W3")
    np.testing.assert_allclose(got_w, P0 * (1 - lr * wd) - step, rtol=1e-14)
    for name in ("b3", "gamma3", "beta3"):
        got = run(make_optimizer("adamw", weight_decay=wd), [G1], [lr], name=name)
        np.testing.assert_allclose(got, P0 - step, rtol=1e-14)


def test_adamw_default_decay_and_zero_gradient() -> None:
    opt = make_optimizer("adamw")
    assert isinstance(opt, Adam) and opt.weight_decay == 1e-2
    params = make_params()
    before = {k: v.copy() for k, v in params.items()}
    opt.step(params, {k: np.zeros_like(v) for k, v in params.items()}, 0.5)
    for k in params:  # zero gradient: only the decoupled decay moves anything, W* only
        expected = before[k] * (1 - 0.5 * 1e-2) if k.startswith("W") else before[k]
        np.testing.assert_array_equal(params[k], expected)


# --- torch.optim as the oracle -----------------------------------------------------------


def torch_run(name: str, kwargs: dict[str, Any], params: dict[str, np.ndarray],
              grads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The same run with torch.optim on float64 tensors, with the same gradients and lrs."""
    torch = pytest.importorskip("torch")
    ts = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    if name in ("adam", "adamw"):
        betas = (kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.999))
        opt = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        decay = [t for k, t in ts.items() if k.startswith("W")]
        rest = [t for k, t in ts.items() if not k.startswith("W")]
        groups = [{"params": decay, "weight_decay": kwargs.get("weight_decay", 0.0)},
                  {"params": rest, "weight_decay": 0.0}]
        topt = opt(groups, lr=LRS[0], betas=betas, eps=kwargs.get("eps", 1e-8), foreach=False)
    else:
        mu = kwargs.get("mu", 0.0)
        topt = torch.optim.SGD(list(ts.values()), lr=LRS[0], momentum=mu,
                               nesterov=name == "nesterov", foreach=False)
    for g, lr in zip(grads, LRS, strict=True):
        for group in topt.param_groups:
            group["lr"] = lr
        for k, t in ts.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        topt.step()
    return {k: t.detach().numpy() for k, t in ts.items()}


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_matches_torch_optim(name: str, kwargs: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    params, grads = make_params(), make_grads(len(LRS))
    ref = torch_run(name, kwargs, params, grads)
    opt = make_optimizer(name, **kwargs)
    for g, lr in zip(grads, LRS, strict=True):
        opt.step(params, g, lr)
    for k in params:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-12, atol=1e-12, err_msg=k)


# --- state, dtypes, in-place -------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_state_dict_round_trip_is_bit_identical(name: str, kwargs: dict[str, Any]) -> None:
    params, grads = make_params(np.float32), make_grads(6, np.float32)
    opt = make_optimizer(name, **kwargs)
    for g in grads[:3]:
        opt.step(params, g, 0.05)
    saved, saved_params = opt.state_dict(), {k: v.copy() for k, v in params.items()}
    assert saved["t"].shape == () and int(saved["t"]) == 3
    slots = {"momentum": {"v"}, "nesterov": {"v"}, "adam": {"m", "v"},
             "adamw": {"m", "v"}}.get(name, set())
    assert set(saved) == {"t"} | {f"{s}/{k}" for s in slots for k in SHAPES}
    restored = make_optimizer(name, **kwargs)
    restored.load_state_dict(saved)
    for k in saved:  # neither the live state nor the restored one aliases the dict
        saved[k] += 1
    for g, lr in zip(grads[3:], (0.05, 0.2, 0.01), strict=True):
        opt.step(params, g, lr)
        restored.step(saved_params, g, lr)
    for k in params:
        np.testing.assert_array_equal(params[k], saved_params[k])
    assert int(restored.state_dict()["t"]) == 6


def test_state_is_lazy_and_updates_are_in_place() -> None:
    opt = make_optimizer("adam")
    assert opt.state_dict().keys() == {"t"}
    params = make_params()
    ids = {k: id(v) for k, v in params.items()}
    opt.step(params, make_grads(1)[0], 0.1)
    assert {k: id(v) for k, v in params.items()} == ids
    assert opt.state_dict()["m/W2"].shape == SHAPES["W2"]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_float32_stays_float32(name: str, kwargs: dict[str, Any]) -> None:
    params, grads = make_params(np.float32), make_grads(3, np.float32)
    ref = make_params(np.float64)
    opt, ref_opt = make_optimizer(name, **kwargs), make_optimizer(name, **kwargs)
    for g in grads:
        opt.step(params, g, np.float64(0.1))  # a NumPy float64 lr must not upcast
        ref_opt.step(ref, {k: v.astype(np.float64) for k, v in g.items()}, 0.1)
    for k, v in params.items():
        assert v.dtype == np.float32, k
        np.testing.assert_allclose(v, ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for key, value in opt.state_dict().items():
        if key != "t":
            assert value.dtype == np.float32, key


# --- registry and validation -------------------------------------------------------------


def test_registry() -> None:
    assert list(OPTIMIZERS) == ["sgd", "momentum", "nesterov", "adam", "adamw"]
    assert isinstance(make_optimizer("nesterov"), Nesterov)
    momentum, adam = make_optimizer("momentum"), make_optimizer("adam")
    assert isinstance(momentum, Momentum) and momentum.mu == 0.9
    assert isinstance(adam, Adam) and adam.weight_decay == 0.0


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("rmsprop", {}, r"unknown optimizer 'rmsprop'; valid: sgd, momentum, nesterov, adam"),
        ("sgd", {"mu": 0.9}, r"optimizer 'sgd' takes no mu; valid: none"),
        ("momentum", {"momentum": 0.9}, r"takes no momentum; valid: mu"),
        ("adam", {"lr": 0.1}, r"takes no lr; valid: beta1, beta2, eps, weight_decay"),
        ("momentum", {"mu": 1.0}, r"mu must be in \[0, 1\)"),
        ("nesterov", {"mu": -0.1}, r"mu must be in \[0, 1\)"),
        ("momentum", {"mu": "fast"}, r"mu must be a number"),
        ("adam", {"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ("adamw", {"beta2": -1e-3}, r"beta2 must be in \[0, 1\)"),
        ("adam", {"eps": 0.0}, r"eps must be in \(0, inf\)"),
        ("adamw", {"weight_decay": -0.1}, r"weight_decay must be in \[0, inf\)"),
        ("adam", {"weight_decay": float("nan")}, r"weight_decay must be"),
    ],
)
def test_make_optimizer_errors(name: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, **kwargs)


def test_load_state_dict_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match=r"unexpected optimizer state 'm/W1'"):
        Momentum().load_state_dict({"t": np.array(1), "m/W1": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"no step counter 't'"):
        SGD().load_state_dict({})
    opt = Momentum()
    opt.load_state_dict({"t": np.array(1), "v/W1": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"v/W1 has shape \(2, 2\)"):
        opt.step({"W1": np.zeros((3, 2))}, {"W1": np.ones((3, 2))}, 0.1)
