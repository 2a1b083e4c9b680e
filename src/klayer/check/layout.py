"""A student's arrays in the course's columns, whatever convention they came in.

Gradients are named ``grad_W1``, ``grad_b1``, ``grad_gamma1``, ``grad_beta1``, ... (or
without ``grad_``); forward values ``S1``, ``mu1``, ``v1``, ``S_hat1``, ``S_tilde1``,
``X1``, ..., ``Sk``, ``P``, ``J``. Row-major arrays (X n x d, W_l m_{l-1} x m_l, as in
klayer and PyTorch) are recognised by their shapes: a non-square matrix either has its
column shape or its transpose. Vectors may come as (m,), (m, 1) or (1, m).
"""

from __future__ import annotations

import numpy as np

from klayer.check.course import Array, Case

LAYOUTS = ("auto", "columns", "rows")


def forward_names(k: int) -> list[str]:
    """The forward values of a k-layer net, in computation order."""
    per_layer = ("S", "mu", "v", "S_hat", "S_tilde", "X")
    return [f"{q}{l}" for l in range(1, k) for q in per_layer] + [f"S{k}", "P", "J"]


def column_shapes(case: Case) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The shapes of the gradients and of the forward values in the course's convention."""
    n, K = case.n, case.Y.shape[0]
    grads: dict[str, tuple[int, ...]] = {}
    values: dict[str, tuple[int, ...]] = {"P": (K, n), "J": ()}
    for l, W in enumerate(case.W, 1):
        m = W.shape[0]
        grads[f"W{l}"], grads[f"b{l}"] = W.shape, (m, 1)
        values[f"S{l}"] = (m, n)
        if l < case.k:
            values[f"X{l}"] = (m, n)
            if case.batch_norm:
                grads[f"gamma{l}"] = grads[f"beta{l}"] = (m, 1)
                values.update({f"mu{l}": (m, 1), f"v{l}": (m, 1), f"S_hat{l}": (m, n),
                               f"S_tilde{l}": (m, n)})
    return grads, values


def to_columns(case: Case, mine: dict[str, np.ndarray], layout: str = "auto",
               ) -> tuple[dict[str, Array], dict[str, Array], str, list[str]]:
    """(gradients, forward values, the layout taken, notes) from the student's arrays."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    grad_shapes, value_shapes = column_shapes(case)
    grads, values, notes = {}, {}, []
    for key, a in mine.items():
        name = key[5:] if key.startswith("grad_") else key
        if key in grad_shapes and "grad_" + key in mine:  # W1 beside grad_W1: a parameter
            notes.append(f"note: {key} taken for a parameter (grad_{key} is given); ignored")
        elif name in grad_shapes and (key.startswith("grad_") or name not in value_shapes):
            grads[name] = np.asarray(a, np.float64)
        elif name in value_shapes:
            values[name] = np.asarray(a, np.float64)
        elif key not in ("X", "Y", "y", "lambda", "eps"):
            notes.append(f"note: {key} is not a name the checker knows; ignored")
    shapes = {**grad_shapes, **value_shapes}
    arrays = {**grads, **values}
    taken = _layout(arrays, shapes) if layout == "auto" else layout
    if layout == "auto":
        notes.insert(0, f"note: took the arrays as {taken} ({_why(taken)})")
    for group in (grads, values):
        for name, a in group.items():
            group[name] = _fit(a, shapes[name], taken)
            if group[name].shape != shapes[name]:
                notes.append(f"note: {name} has shape {a.shape}; expected {shapes[name]} "
                             f"({taken})")
    return grads, values, taken, notes


def _layout(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> str:
    """'rows' when some non-square matrix comes transposed and none as columns."""
    votes = {"columns": 0, "rows": 0}
    for name, a in arrays.items():
        want = shapes[name]
        if a.ndim == 2 and len(want) == 2 and 1 not in want and want[0] != want[1]:
            if a.shape == want:
                votes["columns"] += 1
            elif a.shape == want[::-1]:
                votes["rows"] += 1
    if votes["rows"] and votes["columns"]:
        raise ValueError(f"some matrices come as columns ({votes['columns']}) and some "
                         f"transposed ({votes['rows']}): give one layout (--layout)")
    return "rows" if votes["rows"] else "columns"


def _why(taken: str) -> str:
    return ("X is n x d, W_l is m_{l-1} x m_l: transposed to the course's convention"
            if taken == "rows" else "the course's convention: X is d x n, W_l is m_l x m_{l-1}")


def _fit(a: Array, want: tuple[int, ...], layout: str) -> Array:
    """``a`` in the course's shape ``want``: vectors as columns, matrices transposed for rows."""
    if want == ():
        return a.reshape(()) if a.size == 1 else a
    if len(want) == 2 and want[1] == 1 and a.size == want[0]:
        return a.reshape(want)  # a vector, however it came
    return a.T if layout == "rows" and a.ndim == 2 else a
