"""What every benchmark shares: the BLAS thread environment and a line naming the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def thread_env(threads: int) -> dict[str, str]:
    """The current environment with every BLAS/OpenMP thread count set to ``threads``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_worker(cmd: list[str], env: dict[str, str]) -> str:
    """A benchmark worker's stdout; if it fails, exit with its own error, not ours."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{Path(cmd[1]).name} worker {' '.join(cmd[2:4])} failed "
                 f"(exit {r.returncode}):\n{r.stderr.strip()[-2000:]}")
    return r.stdout


def require_torch() -> None:
    """Exit with how to install PyTorch, the peer these benchmarks compare against."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        sys.exit("this benchmark compares klayer with PyTorch, which is not installed: "
                 "pip install torch==2.13.0 (the CPU build)")


def machine() -> str:
    """CPU model, its widest vector instructions, logical cores and OS, for the README's
    performance table. (The vectors matter: klayer's own matrix products need AVX-512,
    and two guests of one CPU model can differ there.)"""
    info: dict[str, str] = {}  # the first processor's lines
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), None)
    cpu = f"{cpu} ({isa})" if isa else cpu
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def load(data_dir: str | None):  # type: ignore[no-untyped-def]
    """(X uint8 (n, 3072), y, mean, std) of the training split."""
    import numpy as np

    if data_dir:
        from klayer.data.datasets import load_cifar10
        from klayer.data.fetch import locate_cifar10

        data = load_cifar10(locate_cifar10(data_dir))
        return data.train.X, data.train.y, data.mean, data.std
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(45000, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, size=45000)
    return X, y, X[:5000].mean(axis=0), X[:5000].std(axis=0) + 1e-3


def training_data(data_dir: str | None):  # type: ignore[no-untyped-def]
    """klayer ``Data`` over ``load``'s training split, with 200-image validation and test
    splits (the throughput benchmarks time update steps, not evaluations)."""
    from klayer.data.datasets import Data, Split

    X, y, mean, std = load(data_dir)
    small = Split(X[:200], y[:200])
    return Data(Split(X, y), small, small, 10, "bench", (3, 32, 32), mean=mean, std=std)


def trial_configs(trials: int, n_s: int, cycles: float):  # type: ignore[no-untyped-def]
    """The T trials of the batched benchmarks: the default recipe with lambda log-spaced
    over 1e-5 .. 1e-1, eta_max over 0.05 .. 0.1, and each trial's search seed."""
    import numpy as np

    from klayer.core.config import TrainConfig
    from klayer.search.storage import trial_seed

    base = TrainConfig(n_s=n_s, cycles=cycles, checkpoint_every=0)
    lams = np.geomspace(1e-5, 1e-1, trials)
    etas = np.linspace(0.05, 0.1, trials)
    return [TrainConfig(**{**base.__dict__, "lam": float(lam), "eta_max": float(eta),
                           "seed": trial_seed(0, i)})
            for i, (lam, eta) in enumerate(zip(lams, etas, strict=True))]


def time_matmul(a, b, iters: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per ``a @ b`` (into a preallocated output), after a short warm-up."""
    import numpy as np

    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    for _ in range(max(1, iters // 10)):
        np.matmul(a, b, out=out)
    start = time.perf_counter()
    for _ in range(iters):
        np.matmul(a, b, out=out)
    return (time.perf_counter() - start) / iters


def sgemm_peak(size: int = 2048, iters: int = 20) -> float:
    """The machine's float32 matrix-product rate in FLOP/s: a large square product
    (``size``^3, random data), which BLAS runs at its best."""
    import numpy as np

    rng = np.random.default_rng(0)
    A = rng.standard_normal((size, size), dtype=np.float32)
    B = rng.standard_normal((size, size), dtype=np.float32)
    return 2 * size**3 / time_matmul(A, B, iters)
