"""Check cases and students' arrays on disk: ``.npz`` (NumPy) and ``.mat`` (MATLAB).

A case file holds, in the course's convention, ``X`` (d x n), ``Y`` (K x n one-hot),
``y`` (n, labels 0..K-1), ``W1..Wk`` (m_l x m_{l-1}), ``b1..bk``, ``gamma1..``,
``beta1..`` (m_l x 1, hidden layers, with batch norm), ``lambda`` and ``eps``. A
``.mat`` case also holds the cell arrays ``W``, ``b``, ``gamma``, ``beta`` that MATLAB
code indexes as ``W{l}``. Students' files may use cell arrays and names with or without
``grad_``; ``load_arrays`` flattens both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from klayer.check.course import Array, Case
from klayer.data.files import atomic_write

GROUPS = ("W", "b", "gamma", "beta")


class CheckFileError(ValueError):
    """A case or a student's file is missing, unreadable or does not fit (exit 4)."""


def make_case(d: int = 10, n: int = 20, hidden: tuple[int, ...] = (8, 8), K: int = 10,
              batch_norm: bool = True, lam: float = 0.01, eps: float = 1e-12, seed: int = 0,
              X: Array | None = None, y: np.ndarray | None = None) -> Case:
    """A small reproducible case; X (d x n) and y (n,) drawn at random unless given.

    The parameters are drawn away from their usual initial values (b != 0, gamma != 1,
    beta != 0) so that no term of the gradients hides behind a zero or a one.
    """
    rng = np.random.default_rng(seed)
    if X is None:
        X = rng.standard_normal((d, n))
    if y is None:
        y = rng.integers(0, K, size=n)
    d, n = X.shape
    widths = (d, *hidden, K)
    W = [rng.standard_normal((m, p)) * np.sqrt(2 / p)  # He, as klayer's nets start
         for p, m in zip(widths, widths[1:], strict=False)]
    b = [rng.normal(0, 0.1, (m, 1)) for m in widths[1:]]
    gamma = [rng.uniform(0.5, 1.5, (m, 1)) for m in hidden] if batch_norm else []
    beta = [rng.normal(0, 0.1, (m, 1)) for m in hidden] if batch_norm else []
    Y = np.eye(K)[:, y]  # (K, n) one-hot
    return Case(np.asarray(X, np.float64), Y, W, b, gamma, beta, float(lam), float(eps))


def case_arrays(case: Case) -> dict[str, Any]:
    """A case as named arrays (the course's convention)."""
    out: dict[str, Any] = {"X": case.X, "Y": case.Y, "y": case.Y.argmax(axis=0),
                           "lambda": np.array(case.lam), "eps": np.array(case.eps)}
    for group in GROUPS:
        out.update({f"{group}{l}": a for l, a in enumerate(getattr(case, group), 1)})
    return out


def save_case(case: Case, path: str | Path) -> None:
    """Write ``case`` as .npz or .mat (by the suffix), atomically."""
    path = Path(path)
    arrays = case_arrays(case)
    if path.suffix == ".mat":
        from scipy.io import savemat

        for group in GROUPS:  # MATLAB's W{l}: a 1 x k cell array
            cells = np.empty((1, len(getattr(case, group))), dtype=object)
            cells[0, :] = getattr(case, group)
            arrays[group] = cells
        atomic_write(path, lambda f: savemat(f, arrays))
    elif path.suffix == ".npz":
        atomic_write(path, lambda f: np.savez(f, **arrays))
    else:
        raise CheckFileError(f"{path}: the case file must end in .npz or .mat")


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The named arrays of a .npz or .mat file, cell arrays split into W1, W2, ...

    Never unpickles. Raises CheckFileError naming the file when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckFileError(f"{path}: no such file")
    try:
        if path.suffix == ".mat":
            from scipy.io import loadmat

            raw = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
        else:
            with np.load(path, allow_pickle=False) as z:  # savez_compressed too: students use it
                raw = {k: z[k] for k in z.files}
    except Exception as e:  # a truncated zip, a MATLAB v7.3 file, ... (any reader error)
        hint = " (a MATLAB v7.3 file: save it with save(..., '-v7'))" if "7.3" in str(e) else ""
        raise CheckFileError(f"{path}: cannot read it as {path.suffix or 'npz'}: {e}{hint}"
                             ) from None
    out: dict[str, np.ndarray] = {}
    for key, a in raw.items():
        out.update(_flatten(path, key, a))
    return out


def _flatten(path: Path, key: str, a: np.ndarray) -> dict[str, np.ndarray]:
    """``key``'s arrays: a cell array as key1, key2, ...; a MATLAB struct by its fields."""
    if a.dtype.names:  # a struct (grads.W{l}, grads.b{l}, ...): its fields, by name
        return {k: v for f in a.dtype.names for k, v in
                _flatten(path, f, a[f].reshape(-1)[0]).items()}
    if a.dtype == object:  # a cell array: W{1}, W{2}, ...
        return {f"{key}{l}": np.asarray(c, np.float64) for l, c in enumerate(a.reshape(-1), 1)}
    if a.dtype.kind in "fiub":
        return {key: np.asarray(a, np.float64)}
    raise CheckFileError(f"{path}: {key} is not a numeric array ({a.dtype})")


def load_case(path: str | Path) -> Case:
    """A case written by ``save_case`` (or by hand in the same names)."""
    a = load_arrays(path)
    try:
        k = sum(1 for key in a if key[:1] == "W" and key[1:].isdigit())
        group = {g: [a[f"{g}{l}"] for l in range(1, (k if g in "Wb" else k - 1) + 1)
                     if f"{g}{l}" in a] for g in GROUPS}
        return Case(a["X"], a["Y"], group["W"], [b.reshape(-1, 1) for b in group["b"]],
                    [g.reshape(-1, 1) for g in group["gamma"]],
                    [b.reshape(-1, 1) for b in group["beta"]],
                    float(a["lambda"].reshape(-1)[0]), float(a["eps"].reshape(-1)[0]))
    except KeyError as e:
        raise CheckFileError(f"{path}: not a check case: no {e.args[0]}") from None
