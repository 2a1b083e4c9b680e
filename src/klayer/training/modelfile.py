"""Save and load a network as one ``.npz`` file, readable without klayer or pickle.

Keys (all plain arrays, so ``np.load(path, allow_pickle=False)`` reads them):

* ``format``        0-d string, ``"klayer-model-1"``
* ``architecture``  0-d string, the NetConfig as JSON (d, num_classes, hidden, batch_norm, ...)
* ``param/<name>``  every parameter: W1 (d, m1), b1 (m1,), gamma1, beta1, ..., Wk (m_{k-1}, K), bk
* ``stats/<name>``  batch-norm running statistics mu1, var1, ... (biased variance unless
  the architecture's bn_convention is "pytorch")
* ``bn_updates``    0-d int, training passes that updated the running statistics
* ``metadata``      0-d string, JSON with free-form information (dataset, seed, ...)
* ``extra/<name>``  optional arrays, e.g. extra/mean and extra/std: the input standardization

Weights are stored as in klayer (rows are examples): W_course = W.T.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from klayer.core.config import NetConfig
from klayer.core.layers import Array
from klayer.core.network import Network
from klayer.data.files import ModelFileError, atomic_write, check_format, read_npz

FORMAT = "klayer-model-1"


def save(
    net: Network,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    extras: dict[str, Array] | None = None,
) -> None:
    """Write ``net`` (parameters, running statistics, architecture) to ``path`` atomically."""
    arrays: dict[str, Any] = {
        "format": np.array(FORMAT),
        "architecture": np.array(net.config.to_json()),
        "bn_updates": np.array(net.bn_updates, dtype=np.int64),
        "metadata": np.array(json.dumps(metadata or {}, sort_keys=True)),
    }
    arrays.update({f"param/{k}": v for k, v in net.params.items()})
    arrays.update({f"stats/{k}": v for k, v in net.stats.items()})
    arrays.update({f"extra/{k}": np.asarray(v) for k, v in (extras or {}).items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load(path: str | Path) -> tuple[Network, dict[str, Any], dict[str, Array]]:
    """Read a model file: (network, metadata, extras). Raises ModelFileError naming the
    file, FormatError (one of them) if it holds another format than ``FORMAT``."""

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    files = read_npz(path)  # no pickles; headers that lie about their size refused unread
    try:
        fmt = _string(files, "format")
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    check_format(path, fmt, FORMAT)
    try:
        return _from_arrays(files)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None


def _string(files: dict[str, np.ndarray], key: str) -> str:
    a = files.get(key)
    if a is None:
        raise ModelFileError(f"missing key {key!r} (not a klayer model file?)")
    if a.shape != () or a.dtype.kind != "U":
        raise ModelFileError(f"key {key!r} must be a string")
    return str(a[()])


def _from_arrays(files: dict[str, np.ndarray]) -> tuple[Network, dict[str, Any], dict[str, Array]]:
    try:
        config = NetConfig.from_dict(json.loads(_string(files, "architecture")))
        metadata = json.loads(_string(files, "metadata")) if "metadata" in files else {}
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"invalid architecture or metadata: {e}") from None
    net = Network(config, rng=0)
    for group, target in (("param", net.params), ("stats", net.stats)):
        found = {k.split("/", 1)[1] for k in files if k.startswith(group + "/")}
        if found != set(target):
            raise ModelFileError(
                f"{group} arrays {sorted(found)} do not match the architecture's {sorted(target)}"
            )
        for name, expected in target.items():
            a = files[f"{group}/{name}"]
            if a.shape != expected.shape or a.dtype.kind != "f":
                raise ModelFileError(
                    f"{group}/{name} has shape {a.shape} dtype {a.dtype}, expected "
                    f"{expected.shape} floating point"
                )
            if not np.isfinite(a).all():
                raise ModelFileError(f"{group}/{name} contains NaN or infinite values")
            target[name] = a.astype(net.dtype)
    bn = files.get("bn_updates")
    if bn is None or bn.shape != () or bn.dtype.kind not in "iu":
        raise ModelFileError("missing or invalid key 'bn_updates'")
    net.bn_updates = int(bn)
    extras = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("extra/")}
    if not isinstance(metadata, dict):
        raise ModelFileError("metadata must be a JSON object")
    return net, metadata, extras
