"""The augmented recipe's peers for ``bench_time_to_accuracy.py --recipe augmented``.

The recipe is the best recipe's training (``src/klayer/recipes/best.toml``) on a
schedule of ``EPOCHS`` epochs, without PreciseBN and without test-time views (an
evaluation is one view of the test set): ZCA whitening (eps 0.1) of the standardized
images, random flips and translations by up to 3 pixels (zero-filled) of the whitened
images, batch norm before ReLU with running averages, label smoothing 0.1, L2 lambda
5e-4 on the weights, Nesterov momentum 0.9 (torch's form) with the cosine one-cycle
rate of peak 0.1, mini-batches of 100 in a new order every epoch.

- ``klayer``: ``Trainer`` with those settings.
- ``jax``: one ``jax.jit`` step (augmentation, forward, ``jax.grad``, update, running
  statistics) on the whitened training set as one device array, the way a JAX user
  writes it: flips by ``jnp.where``, translations as ``vmap``-ed ``dynamic_slice`` crops
  of the zero-padded images. The whitening matrix is klayer's NumPy fit (a dozen lines a
  JAX user would write the same), computed inside the timed part as klayer's is.

JAX was the fastest peer on the wide net in ``bench_peers.py``; the PyTorch peers are not
written for this recipe.
"""

from __future__ import annotations

from typing import Any

EPOCHS, ETA_MAX, LAM, MU, SMOOTH, SHIFT, EPS_BN, N_BATCH = 40, 0.1, 5e-4, 0.9, 0.1, 3, 1e-8, 100
Peer = tuple[Any, Any]


def config(hidden: tuple[int, ...]) -> Any:
    from klayer.core.config import TrainConfig

    return TrainConfig(hidden=hidden, flip=True, translate=SHIFT, label_smoothing=SMOOTH,
                       optimizer="nesterov", momentum=MU, schedule="one_cycle", eta_max=ETA_MAX,
                       epochs=EPOCHS, lam=LAM, whiten="zca", whiten_eps=0.1, n_batch=N_BATCH,
                       bn_eps=EPS_BN, seed=0)


def klayer_peer(hidden: tuple[int, ...], data: Any) -> Peer:
    from klayer.training.evaluation import evaluate
    from klayer.training.trainer import Trainer

    trainer = Trainer(config(hidden), data)
    return (lambda t: trainer.step(),
            lambda split: evaluate(trainer.net, trainer.data, split.X, split.y).accuracy)


def jax_peer(hidden: tuple[int, ...], data: Any) -> Peer:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_peers import jax_net

    from klayer.core.schedules import one_cycle

    white = data.whitened("zca", 0.1)
    X, Y = jnp.asarray(white.whitened_train(np.float32)), jnp.asarray(data.train.y)
    n, per_epoch = X.shape[0], X.shape[0] // N_BATCH
    total = EPOCHS * per_epoch
    rng = np.random.default_rng(0)
    params, stats, forward = jax_net(hidden, X.shape[1], rng)  # bench_peers' net, EPS 1e-8
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)

    def augment(xb, key):  # type: ignore[no-untyped-def]
        kf, kt = jax.random.split(key)
        img = xb.reshape(-1, 3, 32, 32)
        img = jnp.where(jax.random.bernoulli(kf, 0.5, (img.shape[0], 1, 1, 1)),
                        img[..., ::-1], img)
        moves = jax.random.randint(kt, (img.shape[0], 2), -SHIFT, SHIFT + 1)
        padded = jnp.pad(img, ((0, 0), (0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT)))
        crop = lambda im, d: jax.lax.dynamic_slice(  # noqa: E731
            im, (0, SHIFT - d[0], SHIFT - d[1]), (3, 32, 32))
        return jax.vmap(crop)(padded, moves).reshape(xb.shape)

    def loss(p, xb, yb):  # type: ignore[no-untyped-def]
        scores, batch = forward(p, xb)
        target = jax.nn.one_hot(yb, 10) * (1 - SMOOTH) + SMOOTH / 10
        ce = -(target * jax.nn.log_softmax(scores)).sum(axis=1).mean()
        return ce + LAM * sum(jnp.sum(W * W) for W in p["W"]), batch

    @jax.jit
    def train_step(p, v, st, idx, lr, key):  # type: ignore[no-untyped-def]
        (_, batch), g = jax.value_and_grad(loss, has_aux=True)(p, augment(X[idx], key), Y[idx])
        v = jax.tree_util.tree_map(lambda a, b: MU * a + b, v, g)  # torch's Nesterov
        p = jax.tree_util.tree_map(lambda a, b, c: a - lr * (b + MU * c), p, g, v)
        st = [(0.9 * m + 0.1 * bm, 0.9 * s + 0.1 * bs) for (m, s), (bm, bs) in
              zip(st, batch, strict=True)]
        return p, v, st

    predict = jax.jit(lambda p, st, x: forward(p, x, st)[0].argmax(axis=1))
    state: dict[str, Any] = {"p": params, "v": velocity, "st": stats, "order": rng.permutation(n),
                             "key": jax.random.PRNGKey(0), "test": {}}

    def step(t: int) -> Any:
        pos = (t % per_epoch) * N_BATCH
        if pos == 0 and t:
            state["order"] = rng.permutation(n)
        idx = jnp.asarray(state["order"][pos : pos + N_BATCH])
        state["key"], key = jax.random.split(state["key"])
        state["p"], state["v"], state["st"] = train_step(
            state["p"], state["v"], state["st"], idx, one_cycle(t, ETA_MAX, total), key)
        return state["p"]

    def accuracy(split: Any) -> float:
        x = state["test"].get(id(split))
        if x is None:  # whitened once, as klayer's evaluation reads its copy
            x = state["test"][id(split)] = jnp.asarray(white.standardize(split.X, np.float32))
        pred = predict(state["p"], state["st"], x)
        return float((np.asarray(pred) == split.y).mean())

    return step, accuracy


def make_peer(name: str, hidden: tuple[int, ...], data: Any) -> Peer:
    return {"klayer": klayer_peer, "jax": jax_peer}[name](hidden, data)
