"""Training throughput: klayer against a PyTorch CPU twin of the same recipe, in one run.

    python benchmarks/bench_train.py --data-dir DIR            # CIFAR-10 (45k/5k split)
    python benchmarks/bench_train.py                           # random uint8 stand-in data
    python benchmarks/bench_train.py --hidden 50,30,20,20,10,10,10,10 --json out.json

The recipe is the assignment's: float32, mini-batches of 100 standardized on the fly
from uint8 images, batch norm before ReLU, cyclical learning rate (1e-5 .. 1e-1,
n_s = 2250), L2 lambda = 0.005, plain SGD. Each library runs in a fresh subprocess with
the same thread count (OMP/OpenBLAS/MKL variables and torch.set_num_threads), warms
up, then times ``--steps`` update steps (no evaluation). The libraries alternate over
``--repeats`` rounds and the median steps/second of each is reported, with the ratio.

``--malloc-tuned`` runs both libraries with glibc's malloc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GB) instead of handing large
blocks back to the system between steps. PyTorch allocates its tensors afresh every
step and pays page faults for them by default (on this machine, in the README's table
run, 397-516 steps/s that way and 684-699 tuned); klayer reuses its mini-batch buffer, and
its figure hardly moves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# benchmarks/ is on sys.path when run as a script
from _common import load, machine, require_torch, run_worker, thread_env, training_data

LAM, ETA_MIN, ETA_MAX, N_S, N_BATCH = 0.005, 1e-5, 1e-1, 2250, 100
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def run_klayer(args: argparse.Namespace, hidden: tuple[int, ...]) -> float:
    from klayer.core.config import TrainConfig
    from klayer.training.trainer import Trainer

    data = training_data(args.data_dir)
    cfg = TrainConfig(hidden=hidden, lam=LAM, eta_min=ETA_MIN, eta_max=ETA_MAX, n_s=N_S,
                      n_batch=N_BATCH, seed=0)
    trainer = Trainer(cfg, data)
    for _ in range(args.warmup):
        trainer.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    return args.steps / (time.perf_counter() - start)


def run_torch(args: argparse.Namespace, hidden: tuple[int, ...]) -> float:
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    X_np, y_np, mean_np, std_np = load(args.data_dir)
    X = torch.from_numpy(X_np)
    y = torch.from_numpy(y_np.astype("int64"))
    mean = torch.from_numpy(mean_np).float()
    inv_std = 1.0 / torch.from_numpy(std_np).float()
    layers: list[nn.Module] = []
    d = X.shape[1]
    for m in hidden:
        layers += [nn.Linear(d, m), nn.BatchNorm1d(m, eps=1e-8, momentum=0.1), nn.ReLU()]
        d = m
    layers.append(nn.Linear(d, 10))
    model = nn.Sequential(*layers)
    for mod in model:
        if isinstance(mod, nn.Linear):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    # L2 lambda ||W||^2 in the cost == weight decay 2 lambda on the weight matrices
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 2 * LAM},
                           {"params": others, "weight_decay": 0.0}], lr=ETA_MIN)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=ETA_MIN, max_lr=ETA_MAX,
                                              step_size_up=N_S, cycle_momentum=False)
    loss_fn = nn.CrossEntropyLoss()
    n = X.shape[0]
    per_epoch = n // N_BATCH
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=gen)

    def step(t: int) -> None:
        nonlocal perm
        pos = (t % per_epoch) * N_BATCH
        if pos == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[pos : pos + N_BATCH]
        xb = (X[idx].float() - mean) * inv_std
        loss = loss_fn(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    model.train()
    for t in range(args.warmup):
        step(t)
    start = time.perf_counter()
    for t in range(args.warmup, args.warmup + args.steps):
        step(t)
    return args.steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: random uint8 stand-in data)")
    p.add_argument("--hidden", default="50,50", help="hidden widths (default 50,50)")
    p.add_argument("--steps", type=int, default=2000, help="timed update steps per round")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per library")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both")
    p.add_argument("--malloc-tuned", action="store_true",
                   help="both libraries with glibc's malloc keeping freed memory")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=("klayer", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    if args.worker:
        run = run_klayer if args.worker == "klayer" else run_torch
        print(json.dumps({"steps_per_second": run(args, hidden)}))
        return
    require_torch()
    rates: dict[str, list[float]] = {"klayer": [], "torch": []}
    env = thread_env(args.threads)
    if args.malloc_tuned:
        env.update(dict.fromkeys(MALLOC_VARS, str(2**30)))
    for _ in range(args.repeats):
        for lib in rates:
            cmd = [sys.executable, __file__, "--worker", lib, *sys.argv[1:]]
            out = run_worker(cmd, env)
            rates[lib].append(json.loads(out.strip().splitlines()[-1])["steps_per_second"])
    med = {lib: statistics.median(v) for lib, v in rates.items()}
    import numpy
    import torch

    result = {
        "benchmark": "training throughput", "hidden": list(hidden), "threads": args.threads,
        "steps": args.steps, "repeats": args.repeats, "data": args.data_dir or "random",
        "malloc_tuned": args.malloc_tuned,
        "klayer_steps_per_second": med["klayer"], "torch_steps_per_second": med["torch"],
        "ratio": med["klayer"] / med["torch"], "all": rates, "machine": machine(),
        "numpy": numpy.__version__, "torch": torch.__version__,
    }
    print(f"hidden {args.hidden}, {args.threads} threads, median of {args.repeats} x "
          f"{args.steps} steps{', malloc tuned' if args.malloc_tuned else ''} "
          f"({result['machine']})")
    print(f"{'library':<8} {'steps/s':>9}")
    print(f"{'klayer':<8} {med['klayer']:>9.0f}")
    print(f"{'torch':<8} {med['torch']:>9.0f}")
    print(f"ratio klayer / torch: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
