"""Frozen, validated configuration of a network's architecture.

Every field has a default that reproduces the DD2424 Assignment 3 setting; invalid
values raise ``ValueError`` naming the field, before any work starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

INITS = ("he", "xavier", "normal")
BN_POSITIONS = ("before", "after")
BN_CONVENTIONS = ("assignment", "pytorch")
DTYPES = ("float32", "float64", "longdouble")  # longdouble: extended precision, for checks

# Default batch-norm epsilon. The assignment uses a tiny epsilon (machine precision in
# its Matlab code), PyTorch 1e-5. With the sigma = 1e-4 initialization of the
# sensitivity experiment, hidden pre-activation variances start near 1e-7: eps = 1e-5
# would dominate them and shrink the normalized output ~10x, so batch norm could no
# longer rescue the badly scaled net. 1e-8 stays well below those variances while
# still guarding a dead (zero-variance) unit against division by zero in float32.
BN_EPS = 1e-8


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field whose help text feeds the CLI flag and the docs."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a k-layer network: k - 1 hidden blocks and a linear output layer.

    A hidden block is  linear -> batch norm -> ReLU  (``bn_position="before"``, the
    assignment) or  linear -> ReLU -> batch norm  (``"after"``, the bonus), followed by
    inverted dropout when ``dropout > 0``. With ``skip`` the input of hidden layer l-1
    is added to the pre-activation of layer l (before batch norm and ReLU) for
    l = 3, 5, 7, ... whenever their widths match (the bonus' residual blocks:
    s_l = h_{l-1} W_l + b_l + h_{l-2}).
    """

    d: int  # input dimension (3072 for CIFAR-10)
    num_classes: int = 10
    hidden: tuple[int, ...] = _f((50, 50), "hidden widths, comma-separated")
    batch_norm: bool = _f(True, "batch norm in every hidden layer")
    layer_norm: bool = _f(False, "layer norm instead (with batch_norm = false; bn_position, eps)")
    bn_position: str = _f("before", "batch norm before or after the ReLU", choices=BN_POSITIONS)
    bn_alpha: float = _f(0.9, "running averages keep alpha of their old value")
    bn_eps: float = _f(BN_EPS, "batch-norm epsilon")
    bn_convention: str = _f("assignment", "running-statistics convention",
                            choices=BN_CONVENTIONS)
    init: str = _f("he", "weight initialization", choices=INITS)
    init_sigma: float = _f(1e-4, "standard deviation of init = normal")
    dropout: float = _f(0.0, "dropout probability of hidden units")
    skip: bool = _f(False, "residual skip connections between equal-width hidden layers")
    dtype: str = _f("float32", "floating-point type of training", choices=DTYPES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", _widths(self.hidden))
        _check_int("d", self.d, 1)
        _check_int("num_classes", self.num_classes, 2)
        for i, w in enumerate(self.hidden):
            _check_int(f"hidden[{i}]", w, 1)
        _check_choice("bn_position", self.bn_position, BN_POSITIONS)
        _check_choice("bn_convention", self.bn_convention, BN_CONVENTIONS)
        _check_choice("init", self.init, INITS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_open_interval("bn_alpha", self.bn_alpha, 0.0, 1.0)
        _check_positive("bn_eps", self.bn_eps)
        _check_positive("init_sigma", self.init_sigma)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("batch_norm", "layer_norm", "skip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.batch_norm and self.layer_norm:
            raise ValueError("layer_norm replaces batch norm: set batch_norm = false "
                             "(--no-batch-norm) as well")

    @property
    def k(self) -> int:
        """Number of layers with weights (hidden layers + output layer)."""
        return len(self.hidden) + 1

    @property
    def widths(self) -> tuple[int, ...]:
        """(d, m_1, ..., m_{k-1}, K): input, hidden and output widths."""
        return (self.d, *self.hidden, self.num_classes)

    def skip_sources(self) -> dict[int, int]:
        """Map hidden layer l (1-based) -> the hidden layer whose output is added to s_l."""
        if not self.skip:
            return {}
        return {
            l: l - 2
            for l in range(3, len(self.hidden) + 1, 2)
            if self.hidden[l - 3] == self.hidden[l - 1]
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        """Build from a mapping, refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown architecture key(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)


# The architecture fields a TrainConfig carries (all of NetConfig's but the data's d, K).
ARCH_FIELDS = tuple(f.name for f in fields(NetConfig) if f.name not in ("d", "num_classes"))


def _arch(name: str, **meta: Any) -> Any:
    """TrainConfig's field for NetConfig's ``name``: the same default and help."""
    f = next(f for f in fields(NetConfig) if f.name == name)
    return field(default=f.default, metadata={**f.metadata, **meta})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a number > 0 (finite), got {value!r}")


def _check_open_interval(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise ValueError(f"{name} must be in ({lo:g}, {hi:g}), got {value!r}")


# --- training ------------------------------------------------------------------------

DATASETS = ("cifar10", "digits", "synthetic")
SPLITS = ("full", "assignment")
BN_STATS = ("ema", "precise")
WHITEN = ("none", "pca", "zca")  # input whitening (klayer.data.whitening)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")  # optim.OPTIMIZERS' keys
SCHEDULES = ("cyclic", "constant", "step", "exponential", "one_cycle")  # schedules.SCHEDULES'
LENGTH_KEYS = ("cycles", "epochs", "steps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; defaults are the assignment's recipe.

    The same keys are TOML keys (``--config run.toml``) and flags (``--n-batch`` for
    ``n_batch``; ``lambda`` is ``lam`` here). Validation happens in ``__post_init__``
    and names the key, so bad values fail before any work starts.
    """

    # data
    dataset: str = _f("cifar10", "dataset", choices=DATASETS)
    data_dir: str | None = _f(None, "folder holding CIFAR-10 (or set $KLAYER_DATA_DIR)")
    split: str = _f("full", "full: batches 1-5 minus a validation tail; assignment: "
                    "batch 1 train, batch 2 validation", choices=SPLITS)
    val_size: int = _f(5000, "validation examples taken from the end of the training batches")
    strict_checksums: bool = _f(False, "refuse CIFAR-10 files whose checksums differ")
    n_train: int | None = _f(None, "train on the first N training examples only (e.g. 100: "
                             "the assignment's overfitting check); default all")
    # architecture: NetConfig's fields, with its defaults and help (``_arch``)
    hidden: tuple[int, ...] = _arch("hidden")
    batch_norm: bool = _arch("batch_norm")
    layer_norm: bool = _arch("layer_norm")
    bn_position: str = _arch("bn_position")
    bn_alpha: float = _arch("bn_alpha")
    bn_eps: float = _arch("bn_eps")
    bn_convention: str = _arch("bn_convention")
    init: str = _arch("init")
    init_sigma: float = _arch("init_sigma")
    dropout: float = _arch("dropout")
    skip: bool = _arch("skip")
    dtype: str = _arch("dtype", choices=DTYPES[:2])  # longdouble is for gradient checks
    # cost
    lam: float = _f(0.005, "L2 regularization lambda on the weight matrices", flag="lambda")
    label_smoothing: float = _f(0.0, "label smoothing epsilon")
    ema: float = _f(0.0, "weight EMA decay per step (e.g. 0.999; 0: off): the trained network "
                    "is the average, with its own batch-norm statistics (PreciseBN)")
    # optimization
    n_batch: int = _f(100, "mini-batch size")
    optimizer: str = _f("sgd", "sgd, momentum, nesterov, adam or adamw", choices=OPTIMIZERS)
    momentum: float = _f(0.9, "momentum coefficient (momentum, nesterov)")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay (adamw)")
    schedule: str = _f("cyclic", "cyclic, constant, step, exponential or one_cycle",
                       choices=SCHEDULES)
    eta_min: float = _f(1e-5, "cyclic: lowest learning rate")
    eta_max: float = _f(1e-1, "cyclic and one_cycle: highest learning rate")
    n_s: int | None = _f(None, "cyclic: half-cycle length in steps (default 5 n_train / n_batch)")
    eta: float = _f(0.01, "constant, step and exponential: (initial) learning rate")
    decay: float = _f(0.1, "step: factor per drop; exponential: factor per decay_every steps")
    decay_every: int = _f(1000, "step and exponential: steps per decay")
    cycles: float | None = _f(None, "training length in cycles (cyclic; default 2)")
    epochs: float | None = _f(None, "training length in epochs")
    steps: int | None = _f(None, "training length in update steps")
    shuffle: bool = _f(True, "reshuffle the training set every epoch")
    # batch-norm statistics and augmentation
    bn_stats: str = _f("ema", "ema: moving averages; precise: PreciseBN population statistics",
                       choices=BN_STATS)
    precise_per_epoch: int = _f(0, "PreciseBN recomputations per epoch (0: only at the end)")
    precise_examples: int = _f(10000, "training examples PreciseBN averages over (0: all)")
    adaptive_bn: bool = _f(False, "also report test accuracy with statistics of the test set")
    flip_fraction: float = _f(0.0, "adaptive_bn: also test on the test set with this fraction "
                              "of its images mirrored (the bonus: 0.5), with the running "
                              "and with adaptive statistics")
    flip: bool = _f(False, "augment: random horizontal flips (images only)")
    translate: int = _f(0, "augment: random translations of up to this many pixels")
    mixup: float = _f(0.0, "augment: mixup alpha; a mixed mini-batch blends its rows with "
                      "a shuffled copy, weight ~ Beta(alpha, alpha) (0: off)")
    cutmix: float = _f(0.0, "augment: cutmix alpha; a mixed mini-batch pastes a box of a "
                       "shuffled copy into each image (0: off; images only)")
    mix_prob: float = _f(1.0, "share of mini-batches mixed (mixup or cutmix; both: each half)")
    tta_flip: bool = _f(False, "test-time flip averaging (images only)")
    tta_shift: int = _f(0, "test-time crops: also average over the image shifted diagonally "
                        "by this many pixels (five views; ten with tta_flip)")
    whiten: str = _f("none", "input whitening fitted on the training split (zca keeps images "
                     "images; pca takes no image augmentation)", choices=WHITEN)
    whiten_eps: float = _f(0.1, "whitening epsilon, added to the eigenvalues of the "
                           "standardized inputs' covariance (they sum to d)")
    # bookkeeping
    checkpoint_every: int = _f(1000, "steps between checkpoints (0: only at the end and on "
                               "interrupt)")
    evals_per_cycle: int = _f(10, "evaluations of train/val metrics per cycle (or per run / 2)")
    seed: int = _f(0, "seed of initialization, shuffling, dropout and augmentation")
    order_seed: int | None = _f(None, "seed of the mini-batch order and augmentation instead "
                                "(default: seed; a batched search trial's order_seed)")
    name: str = _f("run", "run name, used in the default output folder")

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", _widths(self.hidden))
        _check_types(self)
        _check_choice("dtype", self.dtype, DTYPES[:2])  # longdouble is for gradient checks
        self.net_config(d=1)  # validates the architecture fields
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("split", self.split, SPLITS)
        _check_choice("bn_stats", self.bn_stats, BN_STATS)
        _check_choice("whiten", self.whiten, WHITEN)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("val_size", "n_batch", "decay_every", "evals_per_cycle"):
            _check_int(name, getattr(self, name), 1)
        for name in ("precise_per_epoch", "precise_examples", "translate", "tta_shift", "seed",
                     "checkpoint_every"):
            _check_int(name, getattr(self, name), 0)
        if self.n_s is not None:
            _check_int("n_s", self.n_s, 1)
        if self.order_seed is not None:
            _check_int("order_seed", self.order_seed, 0)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        for name in ("eta_min", "eta_max", "eta", "decay", "adam_eps", "whiten_eps"):
            _check_positive(name, getattr(self, name))
        if self.eta_min > self.eta_max:
            raise ValueError(f"eta_min ({self.eta_min:g}) must not exceed eta_max "
                             f"({self.eta_max:g})")
        if not self.lam >= 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.n_train is not None:
            _check_int("n_train", self.n_train, 1)
        _check_inputs(self)
        if not 0 <= self.flip_fraction <= 1:
            raise ValueError(f"flip_fraction must be in [0, 1], got {self.flip_fraction!r}")
        for name in ("cycles", "epochs"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        given = [k for k in LENGTH_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one training length, got {' and '.join(given)}")
        if self.cycles is not None and self.schedule != "cyclic":
            raise ValueError("cycles only applies to schedule = cyclic; use epochs or steps")

    @property
    def shuffle_seed(self) -> int:
        """The seed of the mini-batch order and augmentation: order_seed, else seed."""
        return self.seed if self.order_seed is None else self.order_seed

    def net_config(self, d: int, num_classes: int = 10) -> NetConfig:
        """The architecture part, for inputs of dimension d."""
        return NetConfig(d, num_classes, **{name: getattr(self, name) for name in ARCH_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """Plain values keyed by their TOML names (``lambda`` for ``lam``)."""
        return {key_name(f): _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from TOML-style keys, refusing unknown keys by name."""
        by_key = {key_name(f): f.name for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ValueError("; ".join(unknown_key(k, by_key) for k in unknown))
        return cls(**{by_key[k]: v for k, v in values.items()})


# The one list of settings that leave a training's result (weights, metrics, accuracies)
# unchanged: where the data are found and whether their checksums are enforced (the data
# themselves are checked by their fingerprint or their files), how often checkpoints are
# written and the run's name. A resumed run may change them; comparisons of settings
# (a checkpoint's, a config.toml's, a kept experiment training's) ignore them.
RESULT_NEUTRAL = ("data_dir", "strict_checksums", "checkpoint_every", "name")


def unknown_key(key: str, valid: Iterable[str], what: str = "key") -> str:
    """'unknown key hiden (did you mean hidden?)': the closest valid names, not all 48."""
    import difflib

    score = {v: difflib.SequenceMatcher(None, key, v).ratio() for v in valid}
    ranked = sorted((v for v in score if score[v] >= 0.6), key=lambda v: -score[v])
    close = [v for v in ranked[:2] if score[v] >= score[ranked[0]] - 0.1]  # near-ties only
    hint = (f" (did you mean {' or '.join(close)}?)" if close else
            " (the keys are klayer train's flags, with _ for -)")
    return f"unknown {what} {key}{hint}"


def key_name(f: Any) -> str:
    """The TOML key / flag stem of a TrainConfig field."""
    return str(f.metadata.get("flag", f.name))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _widths(hidden: Any) -> tuple[Any, ...]:
    """``hidden`` as a tuple; anything but a list or tuple is refused (a string too)."""
    if not isinstance(hidden, (list, tuple)):
        raise ValueError(f"hidden must be a list of integers, got {hidden!r}")
    return tuple(hidden)


def _check_inputs(cfg: TrainConfig) -> None:
    """Mixing and whitening: alphas >= 0, a probability, no image operation on PCA inputs."""
    for name in ("mixup", "cutmix"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ValueError(f"{name} (alpha) must be >= 0, got {getattr(cfg, name)!r}")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {cfg.ema!r}")
    if not 0 <= cfg.mix_prob <= 1:
        raise ValueError(f"mix_prob must be in [0, 1], got {cfg.mix_prob!r}")
    image_ops = [k for k in ("flip", "translate", "cutmix", "tta_flip", "tta_shift",
                             "flip_fraction") if getattr(cfg, k)]
    if cfg.whiten == "pca" and image_ops:
        raise ValueError(f"whiten = pca makes inputs that are not images, so "
                         f"{', '.join(image_ops)} cannot apply; use whiten = zca")


def _check_types(cfg: TrainConfig) -> None:
    """Each value must have its field's type (ints may stand for floats)."""
    hints = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = str(f.type).replace(" | None", "")
        if value is None and "None" in str(f.type):
            continue
        if kind.startswith("tuple"):
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, hints[kind]) and (kind == "bool" or not isinstance(value, bool))
        if not ok:
            names = {"int": "an integer", "float": "a number", "str": "a string",
                     "bool": "true or false"}
            expected = "a list of integers" if kind.startswith("tuple") else names[kind]
            raise ValueError(f"{key_name(f)} must be {expected}, got {value!r}")


def to_toml(values: dict[str, Any]) -> str:
    """A flat mapping of str/int/float/bool/list values as TOML (None values are left out)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else str(value)
    return str(value)
