"""klayer's own matrix products (``kernels.matmul``, ``_gemm.c``) against float64 and BLAS.

The kernels' tests run once per instruction set this CPU has (AVX-512 and AVX2 on an
AVX-512 CPU, AVX2 alone on most others). On a CPU with neither the kernels do not exist
and ``matmul`` is NumPy's; the tests of the kernels themselves then skip and say why,
and the fall-back tests still run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from klayer.core import kernels
from klayer.core.config import TrainConfig
from klayer.data.datasets import make_synthetic
from klayer.training.trainer import Trainer

F32 = np.float32
NO_GEMM = ("this CPU has neither AVX-512F nor AVX2 with FMA (or klayer._kernels is not "
           "built): matmul is NumPy's here")
needs_gemm = pytest.mark.skipif(not kernels.GEMM, reason=NO_GEMM)


@pytest.fixture(params=kernels.GEMM_ISAS or [None])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each instruction set the kernels can run on here, in turn."""
    if request.param is None:
        pytest.skip(NO_GEMM)
    with kernels.gemm_isa(request.param):
        yield request.param

# (rows of examples, inner, columns): the mini-batch shapes of klayer's nets, every path of
# the kernels for 16- and 8-float vectors (8/4/2/1-row tiles, 3/2/1-vector tiles, the
# last m % 16 or m % 8 columns apart or, 1 or 2 of them after whole tiles, with the last
# tile; panels of a wide B, k in blocks, split by rows or columns) and empty sizes
SHAPES = [(100, 3072, 50), (100, 3072, 1024), (100, 1024, 512), (100, 512, 256),
          (100, 50, 50), (7, 33, 17), (1, 1, 16), (15, 600, 300), (64, 70, 96), (100, 31, 47),
          (3, 515, 1029), (0, 20, 16), (5, 0, 32), (129, 200, 113), (100, 300, 49),
          (37, 129, 98), (20, 3, 194), (100, 256, 10), (30, 130, 3), (100, 200, 26),
          (11, 45, 40), (6, 7, 8)]


def operands(n: int, d: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d), dtype=F32), rng.standard_normal((d, m), dtype=F32))


def bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A float32 sum's rounding bound: d ulps of the sum of |terms|, per element."""
    d = a.shape[-1]
    return (d + 1) * np.finfo(F32).eps * (np.abs(a.astype(np.float64)) @ np.abs(b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_products_match_float64(shape: tuple[int, int, int], threads: int, isa: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    n, d, m = shape
    monkeypatch.setattr(kernels, "_threads", threads)
    x, W = operands(n, d, m)
    got = kernels.matmul(x, W)
    exact = x.astype(np.float64) @ W
    assert got.dtype == F32 and got.shape == (n, m)
    assert np.all(np.abs(got - exact) <= bound(x, W))
    # x^T dS: x is (n, d) with n the examples, dS (n, m); the result is (d, m)
    dS = np.random.default_rng(1).standard_normal((n, m), dtype=F32)
    got = kernels.matmul(x, dS, trans_a=True)
    exact = x.T.astype(np.float64) @ dS
    assert got.shape == (d, m)
    assert np.all(np.abs(got - exact) <= bound(x.T, dS))
    # dS W^T: dS (n, m) and W (d, m); the result is (n, d)
    got = kernels.matmul(dS, W, trans_b=True)
    exact = dS.astype(np.float64) @ W.T
    assert got.shape == (n, d)
    assert np.all(np.abs(got - exact) <= bound(dS, W.T))


@pytest.mark.parametrize("shape", [(100, 3072, 50), (100, 1100, 530), (37, 300, 77)])
def test_each_element_is_one_sum_whatever_the_threads(shape: tuple[int, int, int], isa: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads split C, never a sum: the result is bit for bit the same on 1 to 4."""
    x, W = operands(*shape)
    dS = np.random.default_rng(2).standard_normal((shape[0], shape[2]), dtype=F32)
    results = []
    for t in (1, 2, 3, 4):
        monkeypatch.setattr(kernels, "_threads", t)
        results.append((kernels.matmul(x, W), kernels.matmul(x, dS, trans_a=True),
                        kernels.matmul(dS, W, trans_b=True)))
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_kernels_run_and_differ_from_blas_only_by_rounding(isa: str) -> None:
    """The kernel path is taken (its sums round differently from BLAS's somewhere),
    and agrees with BLAS to float32 rounding."""
    x, W = operands(100, 3072, 50)
    got, blas = kernels.matmul(x, W), x @ W
    assert not np.array_equal(got, blas)
    np.testing.assert_allclose(got, blas, rtol=0, atol=float(bound(x, W).max()))
    x, W = operands(1000, 256, 10)  # a 10-class output layer on an evaluation chunk
    got, blas = kernels.matmul(x, W), x @ W
    assert not np.array_equal(got, blas)
    np.testing.assert_allclose(got, blas, rtol=0, atol=float(bound(x, W).max()))
    dS = np.random.default_rng(4).standard_normal((100, 512), dtype=F32)
    W = np.random.default_rng(5).standard_normal((1024, 512), dtype=F32)
    got, blas = kernels.matmul(dS, W, trans_b=True), dS @ W.T
    assert not np.array_equal(got, blas)
    np.testing.assert_allclose(got, blas, rtol=0, atol=float(bound(dS, W.T).max()))


@pytest.mark.skipif(len(kernels.GEMM_ISAS) < 2, reason="this CPU has no AVX-512F: the "
                    "AVX2 kernels are its only ones, and the test above covers them")
@pytest.mark.parametrize("shape", [(100, 3072, 48), (100, 1024, 512), (37, 300, 96)])
def test_tiles_sum_alike_on_either_vector_width(shape: tuple[int, int, int]) -> None:
    """Where every column is a tile's (m a multiple of 16), each element of x W and
    x^T dS is one FMA sum over k in order with 16- and with 8-float vectors: the
    same bits. (The dot products, dS W^T and the last m % 16 columns, sum partial
    sums of the vector's width, so those may differ by rounding.)"""
    x, W = operands(*shape)
    dS = np.random.default_rng(3).standard_normal((shape[0], shape[2]), dtype=F32)
    got = []
    for name in kernels.GEMM_ISAS:
        with kernels.gemm_isa(name):
            got.append((kernels.matmul(x, W), kernels.matmul(x, dS, trans_a=True)))
    for a, b in zip(got[0], got[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_instruction_set_is_chosen_and_restored() -> None:
    best = kernels.matmul_isa()
    assert best == (kernels.GEMM_ISAS[0] if kernels.GEMM else "blas")
    with pytest.raises(ValueError, match="cannot run on 'sse'"):
        with kernels.gemm_isa("sse"):
            pass
    for name in kernels.GEMM_ISAS:
        with kernels.gemm_isa(name):
            assert kernels.matmul_isa() == name
        assert kernels.matmul_isa() == best
    if kernels.GEMM:
        with pytest.raises(ValueError, match="level 3"):
            kernels._C.gemm_level(3)


@needs_gemm
def test_out_is_written_and_checked() -> None:
    x, W = operands(100, 300, 40)
    out = np.full((100, 40), np.nan, F32)
    assert kernels.matmul(x, W, out=out) is out
    np.testing.assert_allclose(out, x @ W, rtol=1e-5, atol=1e-4)
    dW = np.full((300, 40), np.nan, F32)
    assert kernels.matmul(x, out, trans_a=True, out=dW) is dW
    with pytest.raises(ValueError, match="expected 16000 bytes"):  # the C layer's own check
        kernels._C.matmul(x, W, np.empty((100, 41), F32), 100, 300, 40, False, False, 1)
    with pytest.raises(ValueError, match="overlaps an operand"):
        buf = np.zeros(300 * 40 + 100 * 40, F32)
        Wv, Cv = buf[: 300 * 40].reshape(300, 40), buf[300 * 40 - 40:][: 100 * 40]
        kernels._C.matmul(x, Wv, Cv.reshape(100, 40), 100, 300, 40, False, False, 1)


@pytest.mark.parametrize("dtype", [F32, np.float64])
def test_products_of_many_rows_run_a_block_at_a_time(dtype: type) -> None:
    """``matmul_blocks``: a @ b for an a of more than MATMUL_MAX_ROWS rows, each block of
    rows as ``matmul`` computes it (float32: the kernels; float64: NumPy)."""
    rows = 2 * kernels.MATMUL_MAX_ROWS + 37
    x, W = (v.astype(dtype) for v in operands(rows, 200, 70, seed=6))
    got = kernels.matmul_blocks(x, W)
    assert got.dtype == dtype and got.shape == (rows, 70)
    step = kernels.MATMUL_MAX_ROWS
    np.testing.assert_array_equal(
        got, np.concatenate([kernels.matmul(x[i : i + step], W) for i in range(0, rows, step)]))
    assert np.all(np.abs(got - x.astype(np.float64) @ W) <= bound(x, W))


@pytest.mark.parametrize("case", ["float64", "3-D", "narrow", "strided", "many rows"])
def test_everything_else_is_numpys_matmul(case: str) -> None:
    """Operands the kernels are not for go to NumPy, with NumPy's exact result."""
    x, W = operands(100, 64, 32)
    if case == "float64":
        x, W = x.astype(np.float64), W.astype(np.float64)
    elif case == "3-D":
        x, W = np.stack([x, x + 1]), np.stack([W, W - 1])
    elif case == "narrow":  # 10 columns from 64 terms: BLAS wins
        W = W[:, :10].copy()
    elif case == "strided":
        x = np.asfortranarray(x)
    else:
        x = np.random.default_rng(3).standard_normal((kernels.MATMUL_MAX_ROWS + 1, 64),
                                                     dtype=F32)
    np.testing.assert_array_equal(kernels.matmul(x, W), x @ W)
    dS = x @ W
    np.testing.assert_array_equal(kernels.matmul(x, dS, trans_a=True),
                                  x.swapaxes(-1, -2) @ dS)
    # dS W^T with 32 terms per sum (fewer than 64): NumPy's too
    np.testing.assert_array_equal(kernels.matmul(dS, W, trans_b=True), dS @ W.swapaxes(-1, -2))


def test_thread_count_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        kernels.set_threads(0)
    before = kernels.threads()
    with kernels.limited_threads(before + 2):
        assert kernels.threads() == before + 2
    assert kernels.threads() == before


def _product_in_child(q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    x, W = operands(100, 3072, 64)
    q.put(float(np.abs(kernels.matmul(x, W) - x @ W).max()))


@needs_gemm
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_threads_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's helper threads do not exist in a forked child: the child starts its
    own instead of waiting for them forever."""
    monkeypatch.setattr(kernels, "_threads", 2)
    x, W = operands(100, 3072, 64)
    kernels.matmul(x, W)  # the parent's pool now has a helper
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_product_in_child, args=(q,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert q.get(timeout=5) < 1e-2


@needs_gemm
def test_training_with_the_kernels_tracks_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 training run through the kernels ends within rounding of the same run
    through BLAS (the products are the only difference)."""
    data = make_synthetic(n_train=400, n_val=100, n_test=100, d=600, num_classes=10, seed=0)
    cfg = TrainConfig(dataset="synthetic", hidden=(64, 32), n_batch=100, n_s=8, cycles=1,
                      seed=0, dtype="float32")
    ours = Trainer(cfg, data)
    ours.run()
    monkeypatch.setattr(kernels, "GEMM", False)
    blas = Trainer(replace(cfg), data)
    blas.run()
    for name, value in blas.net.params.items():
        # a bias before batch norm gets no gradient but rounding noise (~1e-10): the floor
        scale = max(float(np.abs(value).max()), 1e-2)
        np.testing.assert_allclose(ours.net.params[name], value, rtol=0, atol=1e-3 * scale,
                                   err_msg=name)
    assert ours.net.params["W1"].tobytes() != blas.net.params["W1"].tobytes()
