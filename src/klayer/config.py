"""Frozen, validated configuration of a network's architecture.

Every field has a default that reproduces the DD2424 Assignment 3 setting; invalid
values raise ``ValueError`` naming the field, before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
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
    hidden: tuple[int, ...] = (50, 50)  # widths of the k - 1 hidden layers
    batch_norm: bool = True
    bn_position: str = "before"  # "before" or "after" the ReLU
    bn_alpha: float = 0.9  # running average keeps alpha of the old value
    bn_eps: float = BN_EPS
    bn_convention: str = "assignment"  # or "pytorch" (see Network)
    init: str = "he"  # "he", "xavier" or "normal" (fixed sigma)
    init_sigma: float = 1e-4  # std of the "normal" initialization
    dropout: float = 0.0  # drop probability of hidden units while training
    skip: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
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
        for name in ("batch_norm", "skip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _check_open_interval(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise ValueError(f"{name} must be in ({lo:g}, {hi:g}), got {value!r}")
