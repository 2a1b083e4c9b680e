"""From a TrainConfig to work: the dataset, the step plan, the optimizer, and the checks.

``validate`` and ``validate_for_data`` run before any training starts, so a bad value
stops the command with a message naming the key while nothing has been written yet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from klayer.core.config import TrainConfig
from klayer.core.network import EVAL_CHUNK
from klayer.core.optim import Optimizer, make_optimizer
from klayer.core.schedules import make_schedule, resolve_total_steps
from klayer.data.datasets import Data, Split, make_synthetic

MAX_INT = 2**53  # config integers above this (seed excepted) are refused: floats lose them
MAX_SEED = 2**128


@dataclass
class Plan:
    """The resolved length and schedule of a run."""

    steps_per_epoch: int
    total_steps: int
    n_s: int | None
    eval_every: int
    lr: Callable[[int], float]


def load_data(cfg: TrainConfig) -> Data:
    """The dataset the config names (CIFAR-10 found via data_dir / $KLAYER_DATA_DIR / cache)."""
    if cfg.dataset == "synthetic":
        return first_examples(make_synthetic(seed=cfg.seed), cfg.n_train)
    from klayer.data import fetch  # platformdirs, filelock, scikit-learn: only when needed

    if cfg.dataset == "digits":
        return first_examples(fetch.load_digits_data(seed=cfg.seed), cfg.n_train)
    from klayer.data.datasets import load_cifar10

    folder = fetch.locate_cifar10(cfg.data_dir, strict_checksums=cfg.strict_checksums)
    return first_examples(load_cifar10(folder, split=cfg.split, val_size=cfg.val_size),
                          cfg.n_train)


def first_examples(data: Data, n_train: int | None) -> Data:
    """``data`` with its training split cut to the first ``n_train`` examples (None: all),
    standardized with their own statistics; validation and test unchanged."""
    if n_train is None:
        return data
    if n_train > len(data.train.y):
        raise ValueError(f"n_train ({n_train}) exceeds the {data.name} training set "
                         f"({len(data.train.y)} examples)")
    train = Split(np.asarray(data.train.X[:n_train]), np.asarray(data.train.y[:n_train]))
    return Data(train, data.val, data.test, data.num_classes, data.name, data.image_shape,
                classes=data.classes)


def make_plan(cfg: TrainConfig, n_train: int) -> Plan:
    """Steps per epoch, total steps, n_s and evaluation interval for a training set size."""
    if cfg.n_batch > n_train:
        raise ValueError(f"n_batch ({cfg.n_batch}) is larger than the training set ({n_train})")
    per_epoch = n_train // cfg.n_batch
    n_s = cfg.n_s if cfg.n_s is not None else max(1, 5 * n_train // cfg.n_batch)
    length = {k: getattr(cfg, k) for k in ("cycles", "epochs", "steps")}
    if all(v is None for v in length.values()):
        length = {"cycles": 2} if cfg.schedule == "cyclic" else {"epochs": 10}
    total = resolve_total_steps(cfg.schedule, steps_per_epoch=per_epoch, n_s=n_s, **length)
    kwargs: dict[str, Any] = {
        "cyclic": {"eta_min": cfg.eta_min, "eta_max": cfg.eta_max, "n_s": n_s},
        "constant": {"eta": cfg.eta},
        "step": {"eta": cfg.eta, "drop": cfg.decay, "every": cfg.decay_every},
        "exponential": {"eta": cfg.eta, "gamma": cfg.decay, "every": cfg.decay_every},
        "one_cycle": {"eta_max": cfg.eta_max, "total_steps": total},
    }.get(cfg.schedule, {})
    lr = make_schedule(cfg.schedule, **kwargs)
    period = 2 * n_s if cfg.schedule == "cyclic" else total
    eval_every = max(1, round(period / cfg.evals_per_cycle))
    return Plan(per_epoch, total, n_s if cfg.schedule == "cyclic" else None, eval_every, lr)


def resolve_length(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """``cfg`` with every setting that decides the run's length written out: n_s
    (cyclic; its default depends on the training set size) and the length itself
    (cycles = 2 for a cyclic run, epochs = 10 otherwise, when none was given), so
    that config.toml records everything that determines the run."""
    from dataclasses import replace

    plan = make_plan(cfg, n_train)
    changes: dict[str, Any] = {}
    if cfg.schedule == "cyclic" and cfg.n_s is None:
        changes["n_s"] = plan.n_s
    if all(getattr(cfg, k) is None for k in ("cycles", "epochs", "steps")):
        changes["cycles" if cfg.schedule == "cyclic" else "epochs"] = (
            2.0 if cfg.schedule == "cyclic" else 10.0)
    return replace(cfg, **changes) if changes else cfg


def make_optimizer_for(cfg: TrainConfig) -> Optimizer:
    """The optimizer of ``cfg``, its settings named by their config keys in errors."""
    kwargs: dict[str, Any] = {
        "momentum": {"mu": cfg.momentum},
        "nesterov": {"mu": cfg.momentum},
        "adam": {"beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.adam_eps,
                 "weight_decay": cfg.weight_decay},
        "adamw": {"beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.adam_eps,
                  "weight_decay": cfg.weight_decay or 1e-2},
    }.get(cfg.optimizer, {})
    try:
        return make_optimizer(cfg.optimizer, **kwargs)
    except ValueError as e:  # name the config key, not the optimizer's argument
        message = str(e)
        for arg, key in (("mu", "momentum"), ("eps", "adam_eps")):
            if message.startswith(arg + " "):
                message = key + message[len(arg):]
        raise ValueError(message) from None


def validate(cfg: TrainConfig) -> None:
    """Checks beyond TrainConfig's own; raise ValueError naming the key.

    Every number finite and every integer within float range (2**53; the seed 2**128),
    strings free of control characters (they go into config.toml and file names),
    the optimizer's settings, and a plan for the smallest possible training set.
    """
    for key, value in cfg.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        limit = MAX_SEED if key == "seed" else MAX_INT
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise ValueError(f"{key} must be at most {limit}, got {value!r}")
        if isinstance(value, list) and any(abs(v) > MAX_INT for v in value):
            raise ValueError(f"{key}: every value must be at most {MAX_INT}, got {value!r}")
        if isinstance(value, str):
            _check_text(key, value)
    if "/" in cfg.name or "\\" in cfg.name or cfg.name in ("", ".", ".."):
        raise ValueError(f"name must be a plain file name (no / or \\), got {cfg.name!r}")
    make_optimizer_for(cfg)
    make_plan(cfg, n_train=max(cfg.n_batch, 1))


def _check_text(key: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{key} must be valid text, got {value!r}") from None
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError(f"{key} must not contain control characters, got {value!r}")


def validate_for_data(cfg: TrainConfig, data: Data) -> None:
    """Checks that need the dataset: batch size, shifts, and that the run fits in memory."""
    make_plan(cfg, len(data.train.y))
    for key in ("translate", "tta_shift"):
        if data.image_shape is not None and getattr(cfg, key) >= min(data.image_shape[1:]):
            raise ValueError(f"{key} ({getattr(cfg, key)}) must be less than the image size "
                             f"{data.image_shape[1]}x{data.image_shape[2]}")
    widths = (data.d, *cfg.hidden, data.num_classes)
    n_params = sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
    itemsize = np.dtype(cfg.dtype).itemsize
    # parameters, gradients, two optimizer slots, scratch; activations of a batch and a chunk
    need = itemsize * (5 * n_params + 8 * max(cfg.n_batch, EVAL_CHUNK) * sum(widths))
    if cfg.whiten != "none":  # the whitened training split, kept whole
        need += itemsize * len(data.train.y) * data.d
    have = _physical_memory()
    if have and need > have:
        raise ValueError(f"hidden: a network of {n_params:,} parameters needs about "
                         f"{need / 2**30:.1f} GiB, more than this machine's "
                         f"{have / 2**30:.1f} GiB")


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not POSIX: no check
        return 0

