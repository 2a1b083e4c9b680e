"""Save and load a network as one ``.npz`` file, readable without klayer or pickle.

Keys (all plain arrays, so ``np.load(path, allow_pickle=False)`` reads them):

* ``format``        0-d string, ``"klayer-model-1"``
* ``architecture``  0-d string, the NetConfig as JSON (d, num_classes, hidden, batch_norm, ...)
* ``param/<name>``  every parameter: W1 (d, m1), b1 (m1,), gamma1, beta1, ..., Wk (m_{k-1}, K), bk
* ``stats/<name>``  batch-norm running statistics mu1, var1, ... (biased variance unless
  the architecture's bn_convention is "pytorch")
* ``bn_updates``    0-d int, training passes that updated the running statistics
* ``metadata``      0-d string, JSON with free-form information (dataset, seed, ...)
* ``extra/<name>``  optional arrays: extra/mean and extra/std (d,), the input standardization,
  and extra/whiten (d, d), the whitening applied after it (``Data.transform_arrays``)

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
from klayer.data.files import FormatError, ModelFileError, atomic_write, check_format, read_npz

FORMAT = "klayer-model-1"


def save(net: Network, path: str | Path, metadata: dict[str, Any] | None = None,
         extras: dict[str, Array] | None = None) -> None:
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
        check_format(path, text(files, "format"), FORMAT)
        return _from_arrays(files)
    except FormatError:
        raise
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None


# --- checked reading, shared with checkpoints (trainstate) --------------------------------

def text(d: dict[str, np.ndarray], key: str, error: type[ModelFileError] = ModelFileError) -> str:
    """The 0-d string ``d[key]``."""
    a = d.get(key)
    if a is None:
        raise error(f"missing key {key!r} (not a klayer file?)")
    if a.shape != () or a.dtype.kind != "U":
        raise error(f"key {key!r} must be a string")
    return str(a[()])


def count(d: dict[str, np.ndarray], key: str, error: type[ModelFileError] = ModelFileError) -> int:
    """The 0-d integer ``d[key]`` >= 0."""
    a = d.get(key)
    if a is None or a.shape != () or a.dtype.kind not in "iu" or int(a) < 0:
        raise error(f"missing or invalid {key!r}")
    return int(a)


def arrays_like(d: dict[str, np.ndarray], group: str, like: dict[str, Array],
                error: type[ModelFileError] = ModelFileError,
                exact: bool = False) -> dict[str, Array]:
    """Copies of the ``group/<name>`` arrays, each shaped like like[name], finite, in its
    dtype (``exact``: stored in it, as in a checkpoint; else any float, converted)."""
    found = {k.split("/", 1)[1]: v for k, v in d.items() if k.startswith(group + "/")}
    if set(found) != set(like):
        raise error(f"{group} arrays {sorted(found)} do not match the network's {sorted(like)}")
    for name, a in found.items():
        want = like[name]
        if a.shape != want.shape or (a.dtype != want.dtype if exact else a.dtype.kind != "f"):
            raise error(f"{group}/{name} has shape {a.shape} dtype {a.dtype}, expected "
                        f"{want.shape} {want.dtype if exact else 'floating point'}")
        if not np.isfinite(a).all():
            raise error(f"{group}/{name} contains NaN or infinite values")
    return {k: v.astype(like[k].dtype) for k, v in found.items()}


def _from_arrays(files: dict[str, np.ndarray]) -> tuple[Network, dict[str, Any], dict[str, Array]]:
    try:
        config = NetConfig.from_dict(json.loads(text(files, "architecture")))
        metadata = json.loads(text(files, "metadata")) if "metadata" in files else {}
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"invalid architecture or metadata: {e}") from None
    if not isinstance(metadata, dict):
        raise ModelFileError("metadata must be a JSON object")
    net = Network(config, rng=0)
    net.params.update(arrays_like(files, "param", net.params))
    net.stats.update(arrays_like(files, "stats", net.stats))
    net.bn_updates = count(files, "bn_updates")
    extras = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("extra/")}
    d = config.d
    for name, shape in (("mean", (d,)), ("std", (d,)), ("whiten", (d, d))):
        a = extras.get(name)
        if a is not None and (a.shape != shape or a.dtype.kind != "f" or not np.isfinite(a).all()):
            raise ModelFileError(f"extra/{name} must be finite floats of shape {shape}, got "
                                 f"{a.dtype} {a.shape}")
    return net, metadata, extras
