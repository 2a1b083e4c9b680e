"""klayer against an independent PyTorch (float64, autograd) twin of the same network.

The twin is built from klayer's parameters (W as (d_in, d_out), rows are examples) and
torch.nn.BatchNorm1d modules whose weight/bias are klayer's gamma/beta. Dropout uses
the very mask klayer draws: klayer's forward draws one mask per hidden layer, in layer
order, from the rng it is given, so an identically seeded generator passed to
``dropout_mask`` reproduces them. Skips add h_{l-2} to s_l before batch norm / ReLU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from klayer.core.config import NetConfig  # noqa: E402
from klayer.core.gradcheck import make_check_problem  # noqa: E402
from klayer.core.layers import dropout_mask  # noqa: E402
from klayer.core.network import Network  # noqa: E402

D, N, SEED = 12, 16, 7


def assert_close(name: str, ours, ref, rtol: float, atol: float) -> None:
    """Elementwise |ours - ref| <= atol + rtol |ref|; reports name, max diff and shape."""
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().numpy()
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    diff = np.abs(ours - ref)
    bad = diff > atol + rtol * np.abs(ref)
    if bad.any():
        rel = (diff / np.maximum(np.abs(ref), 1e-300)).max()
        pytest.fail(
            f"{name}: shape {ref.shape}, max abs diff {diff.max():.3e}, max rel diff "
            f"{rel:.3e}, {int(bad.sum())}/{bad.size} elements beyond rtol={rtol:g} atol={atol:g}"
        )


class TorchTwin:
    """The same k-layer net in torch.float64: linear, BN (nn.BatchNorm1d), ReLU, dropout."""

    def __init__(self, net: Network) -> None:
        cfg = self.cfg = net.config
        self.skips = cfg.skip_sources()
        self.W: dict[int, torch.Tensor] = {}
        self.b: dict[int, torch.Tensor] = {}
        self.bn: dict[int, nn.BatchNorm1d | nn.LayerNorm] = {}
        self.params: dict[str, torch.Tensor] = {}
        for l in range(1, cfg.k + 1):
            self.W[l] = self.params[f"W{l}"] = self._leaf(net.params[f"W{l}"])
            self.b[l] = self.params[f"b{l}"] = self._leaf(net.params[f"b{l}"])
            if l < cfg.k and (cfg.batch_norm or cfg.layer_norm):
                bn = nn.LayerNorm(cfg.widths[l], eps=cfg.bn_eps, dtype=torch.float64) if (
                    cfg.layer_norm) else nn.BatchNorm1d(
                    cfg.widths[l], eps=cfg.bn_eps, momentum=1 - cfg.bn_alpha,
                    dtype=torch.float64,
                )
                with torch.no_grad():
                    bn.weight.copy_(torch.from_numpy(net.params[f"gamma{l}"].astype(np.float64)))
                    bn.bias.copy_(torch.from_numpy(net.params[f"beta{l}"].astype(np.float64)))
                self.bn[l] = bn
                self.params[f"gamma{l}"], self.params[f"beta{l}"] = bn.weight, bn.bias
        assert list(self.params) == net.param_names

    @staticmethod
    def _leaf(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(a, np.float64), requires_grad=True)

    def forward(self, X: np.ndarray, train: bool, masks: list[np.ndarray] | None = None):
        cfg = self.cfg
        for bn in self.bn.values():
            bn.train(train)
        h = torch.as_tensor(np.asarray(X, np.float64))
        outs = [h]  # h_0 = X, h_1, ..., h_{k-1}
        for l in range(1, cfg.k):
            s = h @ self.W[l] + self.b[l]
            if l in self.skips:
                s = s + outs[self.skips[l]]
            if not (cfg.batch_norm or cfg.layer_norm):
                h = torch.relu(s)
            elif cfg.bn_position == "before":
                h = torch.relu(self.bn[l](s))
            else:
                h = self.bn[l](torch.relu(s))
            if masks is not None:
                h = h * torch.from_numpy(masks[l - 1].astype(np.float64))
            outs.append(h)
        return h @ self.W[cfg.k] + self.b[cfg.k]

    def cost(self, logits, y: np.ndarray, lam: float):
        penalty = sum((W * W).sum() for W in self.W.values())
        return F.cross_entropy(logits, torch.as_tensor(y)) + lam * penalty


def same_masks(cfg: NetConfig, n: int, seed: int) -> list[np.ndarray] | None:
    """The masks klayer's forward draws from np.random.default_rng(seed)."""
    if cfg.dropout == 0:
        return None
    rng = np.random.default_rng(seed)
    return [dropout_mask((n, m), cfg.dropout, rng, cfg.dtype) for m in cfg.hidden]


# --- 1. logits, cost and every gradient, float64 -----------------------------------

BN_VARIANTS = {"nobn": dict(batch_norm=False), "before": dict(bn_position="before"),
               "after": dict(bn_position="after"),
               "ln-before": dict(batch_norm=False, layer_norm=True, bn_eps=1e-5),
               "ln-after": dict(batch_norm=False, layer_norm=True, bn_position="after")}
DEPTHS = {1: (), 2: (30,), 3: (30, 20), 4: (20, 20, 10), 9: (50, 30, 20, 20, 10, 10, 10, 10)}
CASES = [
    pytest.param(dict(hidden=h, **bn), lam, id=f"k{k}-{name}-lam{lam}")
    for k, h in DEPTHS.items()
    for name, bn in (BN_VARIANTS.items() if k > 1 else [("nobn", BN_VARIANTS["nobn"])])
    for lam in (0.0, 0.1)
] + [
    pytest.param(dict(hidden=(20, 20, 10), dropout=0.3, **bn), 0.1, id=f"k4-dropout-{name}")
    for name, bn in BN_VARIANTS.items()
] + [
    pytest.param(dict(hidden=(16,) * 5, skip=True, **bn), 0.1, id=f"k6-skip-{name}")
    for name, bn in BN_VARIANTS.items()
] + [
    pytest.param(dict(hidden=(8, 32, 8, 32, 8), skip=True, **bn), 0.1,
                 id=f"k6-inverted-bottleneck-{name}")
    for name, bn in BN_VARIANTS.items()
] + [
    pytest.param(dict(hidden=(16,) * 5, skip=True, dropout=0.3, bn_position="after"), 0.0,
                 id="k6-skip-dropout-after"),
]


@pytest.mark.parametrize("arch, lam", CASES)
def test_forward_cost_and_gradients_match_torch(arch: dict, lam: float) -> None:
    cfg = NetConfig(d=D, dtype="float64", **arch)
    net, X, y = make_check_problem(cfg, n=N, seed=3)
    if cfg.skip:
        assert cfg.skip_sources(), "the skip case must actually have skips"
    twin = TorchTwin(net)
    masks = same_masks(cfg, N, SEED)

    logits, _ = net.copy().forward(X, train=True, rng=np.random.default_rng(SEED))
    loss, cost, grads = net.loss_and_grads(X, y, lam, rng=np.random.default_rng(SEED))
    t_logits = twin.forward(X, train=True, masks=masks)
    t_cost = twin.cost(t_logits, y, lam)
    t_cost.backward()

    assert_close("logits", logits, t_logits, rtol=1e-10, atol=1e-13)
    assert_close("cost", cost, t_cost, rtol=1e-10, atol=0)
    if lam == 0:
        assert loss == cost
    assert list(grads) == list(twin.params)
    for name, p in twin.params.items():
        # atol 1e-13: some true gradients are exactly 0 (b_l feeding batch norm, whose
        # mean subtraction cancels it) and both sides then return round-off ~1e-17,
        # where relative error is meaningless. Every other entry here is either exactly
        # 0 (dead ReLU) or above 1e-11, so atol only ever covers round-off.
        assert_close(f"d{name}", grads[name], p.grad, rtol=1e-10, atol=1e-13)


# --- 2. running statistics under PyTorch's conventions ---------------------------


@pytest.mark.parametrize("position", ["before", "after"])
def test_running_stats_follow_torch_batchnorm1d(position: str) -> None:
    cfg = NetConfig(d=D, hidden=(20, 20, 20, 10), skip=True, bn_position=position,
                    bn_convention="pytorch", bn_alpha=0.9, dtype="float64")
    net, _, _ = make_check_problem(cfg, n=N, seed=5)
    twin = TorchTwin(net)
    for l, bn in twin.bn.items():  # torch's starting values: mean 0, variance 1
        assert_close(f"mu{l} init", net.stats[f"mu{l}"], bn.running_mean, 0, 0)
        assert_close(f"var{l} init", net.stats[f"var{l}"], bn.running_var, 0, 0)
    rng = np.random.default_rng(11)
    eta = 0.05
    # Five different batches, of different sizes (the unbiased n / (n - 1) factor
    # changes), each followed by the same SGD step on both sides, each computed from
    # its own gradients: weights, and so the statistics, keep evolving.
    for step, n in enumerate((16, 9, 24, 16, 5)):
        X = rng.standard_normal((n, D)) * 2 + 0.5
        y = rng.integers(0, cfg.num_classes, n)
        _, _, grads = net.loss_and_grads(X, y, lam=0.01)
        t_cost = twin.cost(twin.forward(X, train=True), y, lam=0.01)
        t_cost.backward()
        for l, bn in twin.bn.items():
            assert bn.num_batches_tracked.item() == step + 1
            assert_close(f"step {step} mu{l}", net.stats[f"mu{l}"], bn.running_mean, 1e-12, 1e-14)
            assert_close(f"step {step} var{l}", net.stats[f"var{l}"], bn.running_var, 1e-12, 1e-14)
        for name, p in twin.params.items():
            net.params[name] -= eta * grads[name]
            with torch.no_grad():
                p -= eta * p.grad
            p.grad = None
        assert_close(f"step {step} W1", net.params["W1"], twin.params["W1"], 1e-10, 1e-13)
    assert net.bn_updates == 5

    X_test = rng.standard_normal((40, D))
    before = {k: v.copy() for k, v in net.stats.items()}
    with torch.no_grad():
        t_eval = twin.forward(X_test, train=False)
    assert_close("eval logits", net.scores(X_test), t_eval, rtol=1e-10, atol=1e-13)
    for k, v in before.items():
        assert np.array_equal(net.stats[k], v), f"evaluation changed {k}"


# --- 3. assignment convention against a hand computation (no torch needed) ----------


def test_assignment_running_stats_by_hand() -> None:
    cfg = NetConfig(d=D, hidden=(8, 6), bn_alpha=0.9, dtype="float64")
    net, X1, _ = make_check_problem(cfg, n=N, seed=2)
    X2 = np.random.default_rng(3).standard_normal((N, D)) * 3 - 1
    p = net.params

    def batch_stats(X: np.ndarray) -> dict[str, np.ndarray]:
        """Per-layer batch mean and biased variance of s_l, by hand (BN before ReLU)."""
        out, h = {}, X
        for l in (1, 2):
            s = h @ p[f"W{l}"] + p[f"b{l}"]
            mu = s.mean(axis=0)
            var = ((s - mu) ** 2).mean(axis=0)
            out[f"mu{l}"], out[f"var{l}"] = mu, var
            h = np.maximum(p[f"gamma{l}"] * (s - mu) / np.sqrt(var + cfg.bn_eps)
                           + p[f"beta{l}"], 0)
        return out

    first, second = batch_stats(X1), batch_stats(X2)
    net.forward(X1, train=True)
    for k, v in first.items():  # the first pass starts the averages at the batch stats
        assert_close(f"pass 1 {k}", net.stats[k], v, rtol=1e-13, atol=1e-15)
    net.forward(X2, train=True)
    for k in first:
        assert_close(f"pass 2 {k}", net.stats[k], 0.9 * first[k] + 0.1 * second[k], 1e-13, 1e-15)
    frozen = {k: v.copy() for k, v in net.stats.items()}
    net.forward(X1, train=False)
    net.evaluate(X2, np.zeros(N, int))
    assert net.bn_updates == 2
    for k, v in frozen.items():
        assert np.array_equal(net.stats[k], v), f"evaluation changed {k}"


# --- 4. float32 against the float64 twin ----------------------------------------------


@pytest.mark.parametrize("position", ["before", "after"])
def test_float32_forward_matches_float64_torch(position: str) -> None:
    cfg = NetConfig(d=D, hidden=(30, 20, 20, 10), bn_position=position, dropout=0.3,
                    dtype="float64")
    net64, X, y = make_check_problem(cfg, n=N, seed=4)
    net = net64.astype("float32")
    assert net.params["W1"].dtype == np.float32
    twin = TorchTwin(net64)
    masks = same_masks(cfg, N, SEED)
    logits, _ = net.forward(X.astype(np.float32), train=True, rng=np.random.default_rng(SEED))
    assert logits.dtype == np.float32
    cost = net.cost(X, y, lam=0.1, train=True, rng=np.random.default_rng(SEED))
    with torch.no_grad():
        t_logits = twin.forward(X, train=True, masks=masks)
        t_cost = twin.cost(t_logits, y, 0.1)
    scale = float(t_logits.abs().max())  # float32 round-off is relative to the logit scale
    assert_close("float32 logits", logits, t_logits, rtol=1e-4, atol=1e-4 * scale)
    assert_close("float32 cost", cost, t_cost, rtol=1e-4, atol=0)
    # float32 drops the same units as float64 (same uniforms, same threshold); only the
    # kept value 1 / (1 - p) is rounded to float32.
    f32 = same_masks(replace(cfg, dtype="float32"), N, SEED)
    assert f32 is not None and masks is not None
    for a, b in zip(f32, masks, strict=True):
        assert np.array_equal(a != 0, b != 0)
        assert_close("float32 mask", a, b, rtol=1e-7, atol=0)


# --- 3. mixed targets (mixup, cutmix) with label smoothing -------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_targets_match_torch_soft_label_cross_entropy(smoothing: float) -> None:
    """A mixed mini-batch's cost and gradients against torch's cross-entropy with
    probability targets w onehot(y) + (1 - w) onehot(y2) and the same label smoothing."""
    cfg = NetConfig(d=D, dtype="float64", hidden=(16, 16))
    net, X, y = make_check_problem(cfg, n=N, seed=5)
    rng = np.random.default_rng(1)
    y2, w = rng.integers(0, cfg.num_classes, N), rng.uniform(0, 1, N)
    w[:3] = [0.0, 1.0, 0.5]
    y2[2] = y[2]  # a row mixed with its own class
    twin = TorchTwin(net)
    loss, cost, grads = net.loss_and_grads(X, y, 0.01, label_smoothing=smoothing, mix=(y2, w))
    logits = twin.forward(X, train=True, masks=same_masks(cfg, N, SEED))
    eye = torch.eye(cfg.num_classes, dtype=torch.float64)
    tw = torch.from_numpy(w)[:, None]
    target = tw * eye[torch.from_numpy(y)] + (1 - tw) * eye[torch.from_numpy(y2)]
    t_loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
    t_cost = t_loss + 0.01 * sum((W * W).sum() for W in twin.W.values())
    t_cost.backward()
    assert_close("loss", loss, t_loss, rtol=1e-12, atol=0)
    assert_close("cost", cost, t_cost, rtol=1e-12, atol=0)
    for name, p in twin.params.items():
        assert_close(f"d{name}", grads[name], p.grad, rtol=1e-10, atol=1e-13)
