"""What every benchmark shares: the BLAS thread environment and a line naming the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def thread_env(threads: int) -> dict[str, str]:
    """The current environment with every BLAS/OpenMP thread count set to ``threads``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def machine() -> str:
    """CPU model, logical cores and OS, for the README's performance table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"
