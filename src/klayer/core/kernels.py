"""Fused C kernels for the float32 training step, and their NumPy fall-backs.

A training step of klayer's small networks spends more time in NumPy's per-call
overhead and extra passes over memory than in arithmetic (benchmarks/profile_step.py).
The optional extension ``klayer._kernels`` (``_kernels.c``, built at install when a C
compiler is there) does these parts of a step in one pass each:

* ``gather_standardize``: a mini-batch's uint8 rows, converted and standardized;
* ``move_images``: a mini-batch's random flips and translations (``data.augment``);
* ``bn_relu_forward`` / ``bn_relu_backward``: training-mode batch norm followed by a
  ReLU, and its backward pass (the compact formula of ``layers.batchnorm_backward``);
  in the same calls, the linear map's "+ b" and the running averages' update forward,
  and the bias gradient backward, so a hidden layer costs one call each way;
* ``softmax_cross_entropy``: the mean loss and dJ/dscores (``_stack``: of T networks);
* ``matmul``: a layer's products x W, x^T dS and dS W^T for a mini-batch, by klayer's
  own kernels (``_gemm.c``, AVX-512 or AVX2, threads from ``_pool.c``), which on these
  short, wide operands beat BLAS, which packs both operands first
  (docs/performance.md); elsewhere, NumPy's ``@``;
* ``add_scaled`` (the L2 term of a gradient), ``sgd_step`` (the update) and
  ``sgd_l2_step`` (both at once, for a weight matrix), ``sgd_many`` (the update of every
  parameter of a network in one call), ``momentum_step`` (momentum and Nesterov, one
  pass), and ``sgd_l2_steps`` (``sgd_l2_step`` for T
  stacked trials, each with its own learning rate and L2 term, also returning each
  trial's sum of squares: the next step's penalty).

The NumPy code in ``layers``, ``losses``, ``data``, ``bnstats`` and ``optim`` stays the
reference: it is what float64 (gradient checks) and every other configuration run, and
tests/test_kernels.py and tests/test_kernels_fused.py check each kernel against it. The
kernels are used only for float32, C-contiguous arrays: callers ask ``enabled`` first,
except for ``add_scaled``, ``sgd_step``, ``sgd_l2_step`` and ``sgd_l2_steps``, which fall
back to NumPy themselves, and ``sgd_many``, which says when the caller must. Set
``KLAYER_KERNELS=numpy`` (before klayer is imported) to run the NumPy code everywhere
(``c``, or unset, is the default; any other value is ignored with a warning).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating]
F32 = np.dtype(np.float32)


def _load() -> ModuleType | None:
    choice = os.environ.get("KLAYER_KERNELS", "").strip().lower()
    if choice == "numpy":
        return None
    if choice not in ("", "c"):
        import warnings

        warnings.warn(f"KLAYER_KERNELS={choice!r} is neither 'numpy' nor 'c'; ignored (the C "
                      "kernels run where they are built)", RuntimeWarning, stacklevel=2)
    try:
        return importlib.import_module("klayer.core._kernels")
    except ImportError:
        return None


_C: Any = _load()
BACKEND = "c" if _C is not None else "numpy"  # what float32 training runs on
_ISAS = {2: "avx512", 1: "avx2"}  # the C side's levels of klayer_gemm
# the instruction sets matmul's own kernels can run on here, widest first
GEMM_ISAS = tuple(_ISAS[n] for n in range(_C.gemm_level()[0], 0, -1)) if _C else ()
GEMM = bool(GEMM_ISAS)  # matmul's own kernels run here


def matmul_isa() -> str:
    """Who runs a float32 mini-batch's products now: "avx512" or "avx2" (klayer's
    kernels, on that instruction set), else "blas"."""
    return _ISAS[_C.gemm_level()[1]] if GEMM else "blas"


def _threads_from_env() -> int:
    """OpenBLAS's thread count as the environment sets it, else this process's cores."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ.get(var, "").split(",")[0]))
        except ValueError:
            continue
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(cores) if cores else (os.cpu_count() or 1)


_threads = _threads_from_env()


def set_threads(n: int) -> None:
    """Run ``matmul``'s kernels on ``n`` threads (the default: OPENBLAS_NUM_THREADS or
    OMP_NUM_THREADS, else every core this process may use). Whoever limits BLAS's threads
    at run time (``threadpoolctl``) should set this too."""
    global _threads
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _threads = int(n)


def threads() -> int:
    """The thread count ``matmul``'s kernels run on."""
    return _threads


@contextmanager
def limited_threads(n: int) -> Iterator[None]:
    """``set_threads(n)`` for the ``with`` block (as threadpoolctl limits BLAS's)."""
    before = _threads
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


@contextmanager
def gemm_isa(name: str) -> Iterator[None]:
    """Run ``matmul``'s kernels on the instruction set ``name`` (one of ``GEMM_ISAS``)
    for the ``with`` block: the tests and benchmarks of the AVX2 kernels on a CPU that
    also has AVX-512. Not for use while another thread multiplies."""
    if name not in GEMM_ISAS:
        raise ValueError(f"matmul's kernels cannot run on {name!r} here; this CPU has "
                         f"{list(GEMM_ISAS) or 'none of them'}")
    before = _C.gemm_level()[1]
    _C.gemm_level(next(level for level, isa in _ISAS.items() if isa == name))
    try:
        yield
    finally:
        _C.gemm_level(before)


def enabled(*arrays: np.ndarray) -> bool:
    """True when the kernels are built and every array is float32 and C-contiguous."""
    if _C is None:
        return False
    for a in arrays:  # a loop, not all(...): this runs a dozen times per training step
        if a.dtype != F32 or not a.flags.c_contiguous:
            return False
    return True


def gather_standardize(X: np.ndarray, idx: np.ndarray, shift: Array, scale: Array,
                       out: Array | None = None) -> Array:
    """(X[idx] - shift) * scale as a float32 (n, d) array; X is (N, d) uint8.

    ``idx`` holds row numbers in [0, N) (no negative ones, no boolean masks). The result
    goes into ``out`` when it is a float32 C-contiguous (n, d) array, else a new one.
    """
    if X.dtype != np.uint8 or X.ndim != 2:
        raise TypeError(f"X must be a 2-d uint8 array, got {X.dtype} with shape {X.shape}")
    rows = np.asarray(idx)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise TypeError(f"idx must be a 1-d array of row numbers, got {rows.dtype} {rows.shape}")
    N, d = X.shape
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if out is None or out.shape != (len(rows), d) or not enabled(out) or not out.flags.writeable:
        out = np.empty((len(rows), d), F32)
    _C.gather_standardize(X, N, d, rows, shift, scale, out)
    return out


def move_images(X: Array, image_shape: tuple[int, int, int], mirror: np.ndarray,
                dy: np.ndarray, dx: np.ndarray) -> Array | None:
    """Each image of X (n, c h w) mirrored left-right where ``mirror`` (n,) is true, then
    moved dy (n,) rows down and dx (n,) columns right, zero-filled: a new (n, d) array in
    one C pass (``augment.moved``'s, to the bit), or None unless X is float32 and
    C-contiguous and the kernels are built."""
    if not enabled(X) or X.ndim != 2:
        return None
    c, h, w = image_shape
    out = np.empty_like(X)
    flags = (np.asarray(mirror) != 0).astype(np.uint8)  # any non-zero value mirrors
    _C.move_images(X, out, flags, _offsets(dy, h, "dy"), _offsets(dx, w, "dx"), c, h, w)
    return out


def _offsets(a: np.ndarray, limit: int, name: str) -> np.ndarray:
    """Integer moves as int64, clipped to [-limit, limit] (the same image: a move of the
    frame's size or more leaves only zeros); a TypeError for other dtypes, as NumPy's
    slicing gives."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got {a.dtype}")
    low = 0 if a.dtype.kind == "u" else -limit
    return np.ascontiguousarray(np.clip(a, low, limit), dtype=np.int64)


def bn_relu_forward(
    s: Array, gamma: Array, beta: Array, eps: float, b: Array | None = None,
    running: tuple[Array, Array, bool, float, float, float] | None = None,
) -> tuple[Array, Array, Array, Array, Array]:
    """Batch norm with batch statistics, then ReLU: s (n, m) -> (y, x_hat, inv_std, mu, var).

    y = max(gamma x_hat + beta, 0) and x_hat = (s - mu) inv_std (both (n, m)); mu, var
    (the biased batch variance) and inv_std = 1 / sqrt(var + eps) are (m,). A stack of
    T networks' layers, s (T, n, m) with gamma and beta (T, m), works the same way.

    In the same call, so a layer costs one call from Python: with a bias ``b`` (m,),
    s += b first, in place (the linear map's "+ b"); with ``running`` = (mu_av, var_av,
    *``bnstats.running_rule``*), the running averages are updated in place, rounded as
    ``bnstats.update_running`` rounds them. b, mu_av and var_av must be float32 and
    C-contiguous (TypeError otherwise) and share no memory with s or each other.
    """
    extras = {"b": b} if running is None else {"b": b, "mu_av": running[0],
                                               "var_av": running[1]}
    for name, a in extras.items():  # the C code reads their bytes as float32
        if a is not None and not enabled(a):
            raise TypeError(f"bn_relu_forward: {name} must be a C-contiguous float32 array, "
                            f"got {a.dtype}")
    *T, n, m = s.shape
    y, x_hat = np.empty_like(s), np.empty_like(s)
    mu, var, inv_std = (np.empty((*T, m), F32) for _ in range(3))
    _C.bn_relu_forward(s, T[0] if T else 1, n, m, gamma, beta, float(eps), x_hat, y, mu, var,
                       inv_std, b, running)
    return y, x_hat, inv_std, mu, var


def bn_relu_backward(
    dh: Array, y: Array, x_hat: Array, inv_std: Array, gamma: Array, want_db: bool = False
) -> tuple[Array, Array, Array, Array | None]:
    """Gradients (ds, dgamma, dbeta, db) of ``bn_relu_forward`` given dh = dJ/dy ((T,) n, m).

    With ``want_db``, db = sum_i ds_i, the bias gradient of the linear map that feeds the
    layer, bit-identical to NumPy's ``ds.sum(axis=-2)`` (summed in the same call, row
    after row in float32, as NumPy sums over rows; a single column NumPy sums pairwise,
    so that case is left to it); else db is None.
    """
    *T, n, m = dh.shape
    ds = np.empty_like(dh)
    dgamma, dbeta = np.empty((*T, m), F32), np.empty((*T, m), F32)
    db = np.empty((*T, m), F32) if want_db and m > 1 else None
    _C.bn_relu_backward(dh, y, x_hat, inv_std, gamma, T[0] if T else 1, n, m, ds, dgamma,
                        dbeta, db)
    if want_db and db is None:
        db = ds.sum(axis=-2)
    return ds, dgamma, dbeta, db


def softmax_cross_entropy(scores: Array, y: np.ndarray) -> tuple[float, Array]:
    """Mean cross-entropy of softmax(scores) (n, K) against labels y, and dJ/dscores."""
    n, k = scores.shape
    labels = np.ascontiguousarray(y, dtype=np.int64)
    dscores = np.empty_like(scores)
    loss = _C.softmax_xent(scores, labels, n, k, dscores)
    return float(loss), dscores


def softmax_cross_entropy_stack(scores: Array, y: np.ndarray) -> tuple[np.ndarray, Array]:
    """``softmax_cross_entropy`` of T stacked score arrays (T, n, K) against the same
    labels y: the T mean losses (float64) and dJ/dscores (T, n, K)."""
    T, n, k = scores.shape
    labels = np.ascontiguousarray(y, dtype=np.int64)
    dscores = np.empty_like(scores)
    losses = np.array([_C.softmax_xent(scores[t], labels, n, k, dscores[t]) for t in range(T)])
    return losses, dscores


MATMUL_MAX_ROWS = 1024  # a mini-batch; larger operands go to BLAS, tuned for them


def matmul(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False,
           out: Array | None = None) -> Array:
    """a @ b, a^T @ b (``trans_a``) or a @ b^T (``trans_b``), the last two axes swapped:
    a layer's x W, x^T dS and dS W^T.

    For a float32 mini-batch (2-D, C-contiguous; at most ``MATMUL_MAX_ROWS`` rows of
    examples in a, the k of x^T dS; shapes where they win, ``_kernels_win``) on a CPU
    with AVX-512 or AVX2, klayer's own kernels (``_gemm.c``) run it on
    ``threads()`` threads: each output element is one sum of fused multiply-adds, so the
    result differs from BLAS's only by rounding (a float32 ulp or so per term). Everything
    else, float64 included, is NumPy's matmul. ``out``, when given, must be C-contiguous
    of the result's shape and dtype, and must not overlap a or b.
    """
    x = a.swapaxes(-1, -2) if trans_a else a  # (..., n, d)
    y = b.swapaxes(-1, -2) if trans_b else b  # (..., d, m)
    if GEMM and a.ndim == 2 and b.ndim == 2 and a.shape[0] <= MATMUL_MAX_ROWS \
            and not (trans_a and trans_b) and x.shape[1] == y.shape[0] \
            and _kernels_win(y.shape[0], y.shape[1], trans_a, trans_b) and enabled(a, b):
        (n, d), m = x.shape, y.shape[1]
        c = np.empty((n, m), F32) if out is None else out
        if c.shape == (n, m) and enabled(c) \
                and _C.matmul(a, b, c, n, d, m, trans_a, trans_b, _threads):
            return c
    return np.matmul(x, y, out=out)


def matmul_blocks(a: Array, b: Array) -> Array:
    """a @ b (2-D) for an a of any number of rows: ``matmul`` on ``MATMUL_MAX_ROWS`` rows
    of a at a time (so that float32 runs on klayer's kernels, at BLAS's rate on large
    operands, and no OpenBLAS thread is left spinning afterwards); a new array."""
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    for i in range(0, a.shape[0], MATMUL_MAX_ROWS):
        matmul(a[i : i + MATMUL_MAX_ROWS], b, out=out[i : i + MATMUL_MAX_ROWS])
    return out


def _kernels_win(d: int, m: int, trans_a: bool, trans_b: bool) -> bool:
    """Whether the kernels beat BLAS on a product with d terms per sum and m output
    columns: dS W^T from 64 terms; x^T dS from 16 columns; x W from 16 columns, or
    from 128 terms when narrower: a 10-class output layer (256 terms: 7 against 8 µs
    on 100 rows, 34 against 60 µs on 1,000 at 2 threads; at 64 terms BLAS is as fast),
    whose BLAS call on a 1,000-row evaluation chunk would also wake OpenBLAS's threads,
    to spin on the cores the next product needs."""
    if trans_b:
        return d >= 64
    return m >= 16 or (not trans_a and d >= 128)


def add_scaled(g: Array, W: Array, a: float | Array) -> None:
    """In place: g += a W, the L2 term of a gradient (a = 2 lambda, or per trial); C or
    NumPy."""
    if np.ndim(a) == 0 and enabled(g, W) and g.shape == W.shape:
        _C.add_scaled(g, W, float(a))  # one pass, rounded as NumPy's two
    else:
        g += a * W


def sgd_step(p: Array, g: Array, lr: float | Array, buf: Array | None = None) -> None:
    """In place: p -= lr g (float32 lr, as ``optim.SGD``): one C pass, or NumPy's two
    (through the scratch array ``buf``, shaped like p, when one is given)."""
    if np.ndim(lr) == 0 and enabled(p, g) and p.shape == g.shape:
        _C.add_scaled(p, g, -float(lr))  # p += (-lr) g rounds as p -= lr g
        return
    p -= np.multiply(g, lr, out=buf)


def sgd_l2_step(p: Array, g: Array, lr: float | Array, l2: float | Array,
                buf: Array | None = None) -> None:
    """In place: p -= lr (g + l2 p), as ``add_scaled(g, p, l2)`` then ``sgd_step``, with g
    left as it was: one C pass, or NumPy's (through ``buf`` when one is given)."""
    if np.ndim(lr) == np.ndim(l2) == 0 and enabled(p, g) and p.shape == g.shape:
        if p.size:  # (an empty matrix has nothing to update)
            _C.sgd_l2_step(p, g, np.array([lr], np.float64), np.array([l2], np.float64), 1,
                           p.size, None)
        return
    step = np.multiply(p, l2, out=buf)
    step += g
    step *= lr
    p -= step


def momentum_step(p: Array, g: Array, v: Array, lr: float, mu: float, l2: float,
                  nesterov: bool, first: bool) -> float | None:
    """In place, one C pass: g += l2 p (l2 != 0), v = g (``first``) or v mu + g, then
    p -= (v mu + g) lr (``nesterov``) or v lr: ``optim.Momentum``'s and ``Nesterov``'s
    update, bit for bit. Returns the sum of the updated p's squares (in double, from
    the same pass); None, touching nothing, unless p, g and v are float32, C-contiguous
    and of one shape (the caller then runs the NumPy code)."""
    if not (enabled(p, g, v) and p.shape == g.shape == v.shape):
        return None
    return float(_C.momentum_step(p, g, v, lr, mu, l2, nesterov, first))


def sgd_many(ps: list[Array], gs: list[Array], lr: float, l2s: list[float],
             sq: np.ndarray | None = None) -> bool:
    """In place, for every i: ps[i] -= lr (gs[i] + l2s[i] ps[i]) (l2s[i] = 0: ps[i] -= lr
    gs[i]), as ``sgd_l2_step`` / ``sgd_step`` one by one, in one C call. Returns False,
    having done nothing, unless the kernels are built and every array is float32,
    C-contiguous and shaped like its partner: the caller then updates one by one.

    ``sq`` (a float64 array of len(ps)), when given, gets from the same pass each updated
    ps[i]'s sum of squares (in double) where l2s[i] != 0, and 0 elsewhere: the next
    step's L2 penalty, with no pass of its own."""
    if len(ps) != len(gs) or len(ps) != len(l2s) or not enabled(*ps, *gs):
        return False
    for p, g in zip(ps, gs, strict=True):
        if p.shape != g.shape:
            return False
    if sq is not None and (sq.dtype != np.float64 or sq.shape != (len(ps),)
                           or not sq.flags.c_contiguous or not sq.flags.writeable
                           or any(np.shares_memory(sq, p) for p in ps)):
        raise ValueError(f"sq must be a writable float64 array of shape ({len(ps)},) apart "
                         f"from the parameters, got {sq.dtype} {sq.shape}")
    _C.sgd_many(ps, gs, float(lr), np.array(l2s, np.float64), sq)
    return True


def sgd_l2_steps(p: Array, g: Array, lr: np.ndarray, l2: np.ndarray, block: int,
                 buf: Array | None = None) -> np.ndarray:
    """``sgd_l2_step`` for T stacked trials at once, each with its own lr[t] and l2[t].

    p and g (same shape, C-contiguous) are read as blocks of ``block`` values, block b
    belonging to trial b % T: a (T, ...) stack has one block per trial, the stacked first
    layer (d, T m) has T blocks of m per row. Returns the sums of squares of each trial's
    updated values (T,) float64: with p a weight matrix, the next step's L2 penalty.
    """
    lr = np.ascontiguousarray(lr, np.float64)
    l2 = np.ascontiguousarray(l2, np.float64)
    T = lr.shape[0] if lr.ndim == 1 else 0
    if T < 1 or l2.shape != (T,) or block < 1:
        raise ValueError(f"sgd_l2_steps: lr and l2 must be (T,) arrays with T >= 1 and block "
                         f">= 1, got {lr.shape}, {l2.shape} and {block}")
    if not p.flags.c_contiguous or p.shape != g.shape or p.size % (T * block):
        raise ValueError(f"sgd_l2_steps: parameter {p.shape} and gradient {g.shape} must be "
                         f"C-contiguous whole rows of {T} blocks of {block}")
    if enabled(p, g):
        sq = np.empty(T)
        _C.sgd_l2_step(p, g, lr, l2, T, block, sq)
        return sq
    v, gv = p.reshape(-1, T, block), g.reshape(-1, T, block)  # views: p is contiguous
    lr_t, l2_t = (a.astype(p.dtype)[:, None] for a in (lr, l2))  # rounded as the lone lr, l2
    step = np.multiply(v, l2_t, out=None if buf is None else buf.reshape(v.shape))
    step += gv
    step *= lr_t
    v -= step
    return np.einsum("itj,itj->t", v, v, dtype=np.float64)
