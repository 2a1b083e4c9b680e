"""Properties of the network, its cost, its running statistics, bad input and save/load."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from klayer.core.config import NetConfig
from klayer.core.layers import batchnorm_forward_train
from klayer.core.losses import cross_entropy, softmax_cross_entropy
from klayer.core.network import Network
from klayer.data.files import ModelFileError
from klayer.training import modelfile


def data(n: int = 64, d: int = 20, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * 3 + 1, rng.integers(0, k, n)


# --- batch norm and the cost ------------------------------------------------------


def test_batchnorm_training_output_is_normalized() -> None:
    rng = np.random.default_rng(1)
    s = rng.standard_normal((200, 7)) * rng.uniform(0.1, 5, 7) + rng.normal(0, 3, 7)
    gamma, beta = np.ones(7), np.zeros(7)
    y, cache, mu, var = batchnorm_forward_train(s, gamma, beta, eps=1e-12)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=0), 1, rtol=1e-9)
    np.testing.assert_allclose(var, s.var(axis=0), rtol=1e-12)  # the biased variance


def test_cost_is_loss_plus_l2_on_weights_only() -> None:
    X, y = data()
    net = Network(NetConfig(d=20, hidden=(30, 20), dtype="float64"), rng=0)
    for name, p in net.params.items():
        if not name.startswith("W"):
            p += 0.5  # biases, gamma, beta must not enter the penalty
    loss = net.evaluate(X, y).loss
    lam = 0.3
    expected = loss + lam * sum(np.sum(net.params[f"W{l}"] ** 2) for l in (1, 2, 3))
    assert net.evaluate(X, y, lam=lam).cost == pytest.approx(expected, rel=1e-12)
    assert net.evaluate(X, y, lam=lam).loss == pytest.approx(loss, rel=1e-15)


def test_cross_entropy_stable_for_huge_logits() -> None:
    scores = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    y = np.array([1, 0])
    loss, dscores = softmax_cross_entropy(scores, y)
    assert np.isfinite(loss) and np.isfinite(dscores).all()
    assert loss == pytest.approx((2e4 + 2e4 + np.log(2)) / 2)
    assert cross_entropy(scores, np.array([0, 1])) == pytest.approx(np.log(2) / 2)


def test_gradients_do_not_accumulate() -> None:
    X, y = data()
    net = Network(NetConfig(d=20, hidden=(10,), dtype="float64"), rng=0)
    g1 = net.loss_and_grads(X, y, lam=0.1)[2]
    g2 = net.loss_and_grads(X, y, lam=0.1)[2]
    for name in g1:
        np.testing.assert_array_equal(g1[name], g2[name])
        assert g1[name] is not g2[name]


def test_running_stats_assignment_convention() -> None:
    net = Network(NetConfig(d=20, hidden=(10,), dtype="float64"), rng=0)
    X1, y1 = data(seed=1)
    X2, y2 = data(seed=2)
    mu = lambda X: (X @ net.params["W1"] + net.params["b1"]).mean(axis=0)  # noqa: E731
    m1, m2 = mu(X1), mu(X2)
    net.loss_and_grads(X1, y1)
    np.testing.assert_allclose(net.stats["mu1"], m1, rtol=1e-12)  # starts from batch 1
    net.loss_and_grads(X2, y2)
    np.testing.assert_allclose(net.stats["mu1"], 0.9 * m1 + 0.1 * m2, rtol=1e-12)
    before = net.stats["mu1"].copy()
    net.evaluate(X1, y1)
    net.predict(X2)
    np.testing.assert_array_equal(net.stats["mu1"], before)  # never in evaluation mode
    assert net.bn_updates == 2


def test_evaluation_is_deterministic_and_batch_independent() -> None:
    X, y = data(n=300)
    net = Network(NetConfig(d=20, hidden=(30, 20), dtype="float64"), rng=0)
    for i in range(5):
        net.loss_and_grads(X[i * 50 : (i + 1) * 50], y[i * 50 : (i + 1) * 50])
    full = net.scores(X)
    np.testing.assert_array_equal(full, net.scores(X))
    one_by_one = np.concatenate([net.scores(X[i : i + 1]) for i in range(len(X))])
    np.testing.assert_allclose(one_by_one, full, rtol=1e-12, atol=1e-12)


def test_float32_end_to_end() -> None:
    X, y = data()
    net = Network(NetConfig(d=20, hidden=(30, 20)), rng=0)
    assert all(p.dtype == np.float32 for p in net.params.values())
    loss, cost, grads = net.loss_and_grads(X, y, lam=0.01)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert net.scores(X).dtype == np.float32
    ref = net.astype("float64").loss_and_grads(X, y, lam=0.01)
    assert loss == pytest.approx(ref[0], rel=1e-5)


@pytest.mark.parametrize("init", ["he", "xavier", "normal"])
def test_initializations(init: str) -> None:
    cfg = NetConfig(d=400, hidden=(300,), init=init, init_sigma=1e-3, dtype="float64")
    W = Network(cfg, rng=np.random.default_rng(5)).params["W1"]
    expected = {"he": np.sqrt(2 / 400), "xavier": np.sqrt(2 / 700), "normal": 1e-3}[init]
    assert W.std() == pytest.approx(expected, rel=0.02)
    again = Network(cfg, rng=np.random.default_rng(5)).params["W1"]
    np.testing.assert_array_equal(W, again)  # seeded


def test_pack_unpack_round_trip() -> None:
    net = Network(NetConfig(d=5, hidden=(4, 3)), rng=0)
    theta = net.pack()
    net.unpack(theta * 2)
    np.testing.assert_allclose(net.pack(), theta * 2)
    with pytest.raises(ValueError, match="vector of"):
        net.unpack(theta[:-1])


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((4, 7)), np.zeros(4, int), "expects d = 20"),
        (np.zeros(20), None, "2-D array"),
        (np.full((4, 20), np.nan), None, "NaN or infinite"),
        (np.full((4, 20), np.inf), None, "NaN or infinite"),
        (np.zeros((4, 20)), np.array([0, 1, 2, 10]), r"labels must lie in \[0, 10\)"),
        (np.zeros((4, 20)), np.array([0, -1, 2, 3]), r"labels must lie in \[0, 10\)"),
        (np.zeros((4, 20)), np.array([0.0, 1, 2, 3]), "labels must be integers"),
        (np.zeros((4, 20)), np.zeros(3, int), "must have shape"),
        (np.array([["a"] * 20]), None, "real numbers"),
    ],
)
def test_bad_input_is_named(X: np.ndarray, y: np.ndarray | None, match: str) -> None:
    net = Network(NetConfig(d=20, hidden=(5,)), rng=0)
    with pytest.raises(ValueError, match=match):
        if y is None:
            net.predict(X)
        else:
            net.loss_and_grads(X, y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": (50, 0)}, r"hidden\[1\] must be an integer >= 1"),
        ({"hidden": (50, -3)}, r"hidden\[1\]"),
        ({"init": "kaiming"}, "unknown init 'kaiming'; valid: he, xavier, normal"),
        ({"bn_position": "middle"}, "unknown bn_position"),
        ({"bn_alpha": 1.0}, "bn_alpha must be in"),
        ({"bn_eps": 0}, "bn_eps must be a number > 0 \\(finite\\)"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"d": 0}, "d must be an integer >= 1"),
        ({"dtype": "float16"}, "unknown dtype"),
    ],
)
def test_bad_config_is_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NetConfig(**{"d": 20, **kwargs})


# --- save and load ----------------------------------------------------------------


def trained_net(**kw: object) -> tuple[Network, np.ndarray]:
    X, y = data()
    net = Network(NetConfig(d=20, hidden=(12, 8), **kw), rng=3)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for _ in range(3):
        _, _, g = net.loss_and_grads(X, y, lam=0.01, rng=rng)
        for k in net.params:
            net.params[k] -= 0.1 * g[k]
    return net, X


@pytest.mark.parametrize("kw", [{}, {"batch_norm": False}, {"skip": True, "dropout": 0.2,
                                                              "bn_position": "after"}])
def test_save_load_gives_identical_predictions(tmp_path: Path, kw: dict) -> None:
    net, X = trained_net(**kw)
    path = tmp_path / "model.npz"
    modelfile.save(net, path, metadata={"seed": 3}, extras={"mean": np.arange(20.0)})
    loaded, meta, extras = modelfile.load(path)
    np.testing.assert_array_equal(loaded.scores(X), net.scores(X))
    assert loaded.config == net.config and loaded.bn_updates == net.bn_updates
    assert meta == {"seed": 3}
    np.testing.assert_array_equal(extras["mean"], np.arange(20.0))
    with np.load(path, allow_pickle=False) as z:  # readable without klayer or pickle
        assert "param/W1" in z.files and str(z["format"]) == "klayer-model-1"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        modelfile.save(trained_net()[0], tmp_path / "model.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "model.npz").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_load_rejects_corrupt_and_foreign_files(tmp_path: Path) -> None:
    net, _ = trained_net()
    good = tmp_path / "good.npz"
    modelfile.save(net, good)
    raw = good.read_bytes()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "garbage.npz": b"not a zip file at all",
        "empty.npz": b"",
        "text.npz": b"hello\n",
    }
    np.save(tmp_path / "array.npy", np.zeros(3))  # an .npy, not an .npz
    (tmp_path / "array.npy").rename(tmp_path / "npy.npz")
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    arrays = dict(np.load(good))
    arrays["param/W1"] = arrays["param/W1"][:, :3]
    np.savez(tmp_path / "wrong_shape.npz", **arrays)
    arrays = dict(np.load(good))
    arrays["param/W2"] = np.full_like(arrays["param/W2"], np.nan)
    np.savez(tmp_path / "nan.npz", **arrays)
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as zf:  # an object array needs pickle
        zf.writestr("format.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
                    b"'shape': (), }" + b" " * 50 + b"\n" + b"\x80\x04N.")
    expected = {"truncated.npz": "not a readable", "garbage.npz": "not a readable",
                "empty.npz": "not a readable", "foreign.npz": "missing key 'format'",
                "wrong_shape.npz": "param/W1 has shape", "nan.npz": "NaN",
                "pickled.npz": "not a readable", "missing.npz": "no such model file",
                "text.npz": "not a readable", "npy.npz": "not a readable"}
    for name, match in expected.items():
        with pytest.raises(ModelFileError, match=match) as info:
            modelfile.load(tmp_path / name)
        assert name in str(info.value)
        assert "allow_pickle" not in str(info.value)  # no advice to unpickle a stranger's file
