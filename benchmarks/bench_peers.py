"""Training throughput: klayer against the peers a user would pick, each written their way.

    python benchmarks/bench_peers.py --data-dir DIR --threads 2
    python benchmarks/bench_peers.py --data-dir DIR --hidden 50,30,20,20,10,10,10,10 --threads 1
    python benchmarks/bench_peers.py --peers klayer,torch,jax --json out.json

The recipe is the assignment's: float32, mini-batches of 100 in a new order every
epoch, batch norm before ReLU (batch statistics, running averages updated), cyclical
learning rate (1e-5 .. 1e-1, n_s = 2250), L2 lambda = 0.005 on the weight matrices,
plain SGD. The peers, as their own docs write them:

- ``torch``: PyTorch eager, the training set standardized once into a float32 tensor
  (the PyTorch examples' way), ``nn.Sequential``, ``optim.SGD`` with weight decay
  2 lambda on the weights (the gradient of lambda ||W||^2), the cyclical rate set per step;
- ``torch-malloc``: the same with glibc's malloc keeping freed memory
  (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ at 1 GB): PyTorch allocates afresh
  every step;
- ``torch-compile``: the same model under ``torch.compile`` and the optimizer step
  compiled with a tensor learning rate (PyTorch's "compiled optimizer" recipe);
- ``jax``: one ``jax.jit`` train step (forward, ``jax.grad``, SGD update, running
  statistics) on a pre-standardized device array, indexed inside the step;
- ``klayer``: ``Trainer.step``, which keeps the images uint8 and standardizes each
  mini-batch on the fly (klayer's own design).

Every worker is a fresh process pinned to the first ``--threads`` CPUs, with every
thread pool set to that count; the peers alternate over ``--rounds`` rounds, and the
median and the spread (min..max) of each are printed. A peer that is not installed is
skipped, and the table says so. JAX is the benchmark-only extra ``pip install -e
".[bench]"``. ``bench_time_to_accuracy.py`` trains the same peers to a target accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine, run_worker, thread_env, training_data

LAM, ETA_MIN, ETA_MAX, N_S, N_BATCH, EPS = 0.005, 1e-5, 1e-1, 2250, 100, 1e-8
PEERS = ("klayer", "torch", "torch-malloc", "torch-compile", "jax")
NEEDS = {"torch": "torch", "torch-malloc": "torch", "torch-compile": "torch", "jax": "jax"}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
# a peer: step(t) does update t; accuracy(split) measures a klayer Split in evaluation mode
Peer = tuple[Callable[[int], Any], Callable[[Any], float]]


def cyclic(t: int) -> float:
    """The recipe's cyclical learning rate of update t, the same for every peer."""
    from klayer.core.schedules import cyclic as triangle

    return triangle(t, ETA_MIN, ETA_MAX, N_S)


def load_sets(data_dir: str | None) -> Any:
    """klayer ``Data`` (uint8 images; the training set's mean and std): CIFAR-10's 45k /
    5k / 10k from ``data_dir``, else random stand-in images."""
    if not data_dir:
        return training_data(None)
    from klayer.data.datasets import load_cifar10
    from klayer.data.fetch import locate_cifar10

    return load_cifar10(locate_cifar10(data_dir))


def standardized(data: Any, X: Any) -> Any:
    """X standardized once, float32: what a PyTorch or JAX user feeds their model."""
    import numpy as np

    return ((np.asarray(X, np.float32) - data.mean) / data.std).astype(np.float32)


def klayer_peer(name: str, threads: int, hidden: tuple[int, ...], data: Any) -> Peer:
    from klayer.core.config import TrainConfig
    from klayer.training.evaluation import evaluate
    from klayer.training.trainer import Trainer

    cfg = TrainConfig(hidden=hidden, lam=LAM, eta_min=ETA_MIN, eta_max=ETA_MAX, n_s=N_S,
                      n_batch=N_BATCH, bn_eps=EPS, seed=0)
    trainer = Trainer(cfg, data)
    return (lambda t: trainer.step(),
            lambda split: evaluate(trainer.net, data, split.X, split.y).accuracy)


def torch_peer(name: str, threads: int, hidden: tuple[int, ...], data: Any) -> Peer:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    X, y = torch.from_numpy(standardized(data, data.train.X)), torch.from_numpy(data.train.y)
    layers: list[nn.Module] = []
    d = X.shape[1]
    for m in hidden:
        layers += [nn.Linear(d, m), nn.BatchNorm1d(m, eps=EPS), nn.ReLU()]
        d = m
    model = nn.Sequential(*layers, nn.Linear(d, 10))
    compiled = name == "torch-compile"
    lr = torch.tensor(ETA_MIN) if compiled else ETA_MIN  # a tensor: no recompile per rate
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.dim() == 2],
                            "weight_decay": 2 * LAM},
                           {"params": [p for p in model.parameters() if p.dim() != 2]}], lr=lr)
    run = torch.compile(model) if compiled else model
    opt_step = torch.compile(opt.step) if compiled else opt.step
    loss_fn = nn.CrossEntropyLoss()
    n, per_epoch = X.shape[0], X.shape[0] // N_BATCH
    gen = torch.Generator().manual_seed(0)
    order = [torch.randperm(n, generator=gen)]

    def step(t: int) -> None:
        pos = (t % per_epoch) * N_BATCH
        if pos == 0 and t:
            order[0] = torch.randperm(n, generator=gen)
        idx = order[0][pos : pos + N_BATCH]
        for group in opt.param_groups:
            if compiled:
                group["lr"].fill_(cyclic(t))
            else:
                group["lr"] = cyclic(t)
        loss = loss_fn(run(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()

    def accuracy(split: Any) -> float:
        model.eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(standardized(data, split.X))).argmax(dim=1)
        model.train()
        return float((pred.numpy() == split.y).mean())

    model.train()
    return step, accuracy


def jax_net(hidden: tuple[int, ...], d: int, rng: Any) -> tuple[Any, Any, Any]:
    """A JAX user's BN net: He-initialized parameters (from ``rng``), running statistics
    and ``forward(p, xb, st=None)`` -> (scores, each layer's batch mean and variance);
    with ``st``, evaluation mode."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    widths = (d, *hidden, 10)
    params = {"W": [jnp.asarray(rng.standard_normal((a, b), np.float32) * np.sqrt(2 / a))
                    for a, b in zip(widths, widths[1:], strict=False)],
              "b": [jnp.zeros(b, jnp.float32) for b in widths[1:]],
              "gamma": [jnp.ones(m, jnp.float32) for m in hidden],
              "beta": [jnp.zeros(m, jnp.float32) for m in hidden]}
    stats = [(jnp.zeros(m, jnp.float32), jnp.ones(m, jnp.float32)) for m in hidden]

    def forward(p, xb, st=None):  # type: ignore[no-untyped-def]
        h, batch = xb, []
        for l in range(len(hidden)):
            s = h @ p["W"][l] + p["b"][l]
            mu, var = (s.mean(axis=0), s.var(axis=0)) if st is None else st[l]
            batch.append((mu, var))
            h = jax.nn.relu(p["gamma"][l] * (s - mu) / jnp.sqrt(var + EPS) + p["beta"][l])
        return h @ p["W"][-1] + p["b"][-1], batch

    return params, stats, forward


def jax_peer(name: str, threads: int, hidden: tuple[int, ...], data: Any) -> Peer:
    import jax
    import jax.numpy as jnp
    import numpy as np

    X, Y = jnp.asarray(standardized(data, data.train.X)), jnp.asarray(data.train.y)
    rng = np.random.default_rng(0)
    params, stats, forward = jax_net(hidden, X.shape[1], rng)

    def loss(p, xb, yb):  # type: ignore[no-untyped-def]
        scores, batch = forward(p, xb)
        logp = jax.nn.log_softmax(scores)
        l2 = sum(jnp.sum(W * W) for W in p["W"])
        return -jnp.take_along_axis(logp, yb[:, None], axis=1).mean() + LAM * l2, batch

    @jax.jit
    def train_step(p, st, idx, lr):  # type: ignore[no-untyped-def]
        (_, batch), g = jax.value_and_grad(loss, has_aux=True)(p, X[idx], Y[idx])
        p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
        st = [(0.9 * m + 0.1 * bm, 0.9 * v + 0.1 * bv) for (m, v), (bm, bv) in
              zip(st, batch, strict=True)]
        return p, st

    predict = jax.jit(lambda p, st, x: forward(p, x, st)[0].argmax(axis=1))
    n, per_epoch = X.shape[0], X.shape[0] // N_BATCH
    state: dict[str, Any] = {"p": params, "st": stats, "order": rng.permutation(n)}

    def step(t: int) -> Any:
        pos = (t % per_epoch) * N_BATCH
        if pos == 0 and t:
            state["order"] = rng.permutation(n)
        idx = jnp.asarray(state["order"][pos : pos + N_BATCH])
        state["p"], state["st"] = train_step(state["p"], state["st"], idx, cyclic(t))
        return state["p"]  # not waited for: JAX dispatches asynchronously

    def accuracy(split: Any) -> float:
        pred = predict(state["p"], state["st"], jnp.asarray(standardized(data, split.X)))
        return float((np.asarray(pred) == split.y).mean())

    return step, accuracy


def make_peer(name: str, threads: int, hidden: tuple[int, ...], data: Any) -> Peer:
    """The peer ``name`` on ``data``, pinned to the first ``threads`` cores."""
    os.sched_setaffinity(0, set(range(threads)))  # the same cores for every peer
    make = {"klayer": klayer_peer, "jax": jax_peer}.get(name, torch_peer)
    return make(name, threads, hidden, data)


def env_for(peer: str, threads: int) -> dict[str, str]:
    """A worker's environment: every thread pool at ``threads``, malloc tuned if asked."""
    env = thread_env(threads)
    env["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                        f"intra_op_parallelism_threads={threads}")
    if peer == "torch-malloc":
        env.update(MALLOC)
    return env


def installed(peers: list[str]) -> tuple[list[str], list[str]]:
    """(the peers whose library is installed, the others)."""
    missing = [x for x in peers if x in NEEDS and importlib.util.find_spec(NEEDS[x]) is None]
    return [x for x in peers if x not in missing], missing


def alternate(peers: list[str], rounds: int, argv: list[str], threads: int,
              key: str) -> dict[str, list[float]]:
    """``rounds`` rounds of one fresh worker process per peer; each one's ``key`` figures."""
    out: dict[str, list[float]] = {x: [] for x in peers}
    for _ in range(rounds):
        for peer in peers:
            text = run_worker([sys.executable, argv[0], "--worker", peer, *argv[1:]],
                              env_for(peer, threads))
            out[peer].append(json.loads(text.strip().splitlines()[-1])[key])
    return out


def worker(args: argparse.Namespace) -> None:
    hidden = tuple(int(w) for w in args.hidden.split(","))
    step, _ = make_peer(args.worker, args.threads, hidden, load_sets(args.data_dir))
    for t in range(args.warmup):
        wait(step(t))
    start = time.perf_counter()
    for t in range(args.warmup, args.warmup + args.steps):
        last = step(t)
    wait(last)
    print(json.dumps({"steps_per_second": args.steps / (time.perf_counter() - start)}))


def wait(result: Any) -> None:
    """Block until an asynchronously dispatched result (JAX's) is computed."""
    if result is not None and "jax" in sys.modules:
        import jax

        jax.block_until_ready(result)


def run_flags(p: argparse.ArgumentParser, peers: str) -> None:
    """The flags of how the peers run: rounds, cores, which peers, the JSON file."""
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per peer")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores for each")
    p.add_argument("--peers", default=peers, help="comma-separated, of " + ", ".join(PEERS))
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: random uint8 stand-in data)")
    p.add_argument("--hidden", default="50,50", help="hidden widths (default 50,50)")
    p.add_argument("--steps", type=int, default=2000, help="timed update steps per round")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps first (compiles)")
    run_flags(p, ",".join(PEERS))
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    peers, missing = installed([x for x in args.peers.split(",") if x])
    rates = alternate(peers, args.rounds, [__file__, *sys.argv[1:]], args.threads,
                      "steps_per_second")
    report(args, rates, missing)


def report(args: argparse.Namespace, rates: dict[str, list[float]], missing: list[str]) -> None:
    med = {x: statistics.median(v) for x, v in rates.items()}
    peers = {x: m for x, m in med.items() if x != "klayer"}
    best = max(peers, key=peers.__getitem__) if peers else None
    ratio = med["klayer"] / med[best] if best and "klayer" in med else None
    print(f"hidden {args.hidden}, {args.threads} thread(s), median (min..max) of {args.rounds} "
          f"rounds x {args.steps} updates, fresh processes ({machine()})")
    for x, v in rates.items():
        print(f"{x:<14} {med[x]:>8.0f} updates/s  ({min(v):.0f}..{max(v):.0f})")
    for x in missing:
        print(f"{x:<14} skipped: {NEEDS[x]} is not installed")
    if ratio is not None:
        print(f"klayer / best peer ({best}): {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "training throughput against peers", "hidden": args.hidden,
            "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
            "data": args.data_dir or "random", "median": med, "all": rates,
            "best_peer": best, "ratio_to_best_peer": ratio, "skipped": missing,
            "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
