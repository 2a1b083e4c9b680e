/* klayer's own float32 matrix products, for the shapes its layers have.
 *
 * A training step of a 100-example mini-batch multiplies short, wide operands: the
 * first layer's X W (100 x 3072 by 3072 x m) and X^T dS (3072 x 100 by 100 x m).
 * OpenBLAS packs both operands into blocks before every product, which on these shapes
 * costs it a quarter of the cores' FMA peak (benchmarks/profile_step.py,
 * docs/performance.md). These kernels keep a tile of C (8 rows by up to 48 columns) in
 * 24 AVX-512 registers and stream its whole sum over k through it, reading A by
 * broadcasts where it lies and B's rows 48 floats at a time. B is copied only where its
 * rows lie pages apart (256 columns or more: a panel of 512 k at a time, reused by
 * every row tile) and, for A^T B, when wider than a tile (B then has the batch's ~100
 * rows). Every element of C is one sequential sum of FMAs, over k in order, whatever
 * the thread count or blocking.
 *
 * Columns beyond the last whole 16 (m % 16 of them, 2 for a 50-unit layer) are done
 * apart, so a 50-wide C costs 50, not 64, columns of work: for C = A B, as dot
 * products of A's rows with those columns (copied contiguous), 16 k at a time; for
 * C = A^T B, 16 rows of C at a time (A's rows are C's columns there), or, when 1 or 2
 * follow whole tiles, in the last tile's own pass (tile_tn_last).
 *
 * Threads: C's rows (or, for a wide A B or any A B^T, its columns) are split among the
 * threads of _pool.c. Only x86-64 with GCC or Clang has the kernels, chosen at run time
 * when the CPU has AVX-512F; elsewhere klayer_gemm returns 0 and klayer uses BLAS.
 */
#include "_gemm.h"
#include "_pool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f")))
#define INLINE static inline __attribute__((always_inline))
#define MR 8    /* rows of a C tile */
#define NB 48   /* columns of a C tile: three 16-float vectors */

typedef struct {
    const float *A, *B;
    float *C;
    const float *Bt;  /* rows giving C's columns bt0.. as dot products: for C = A B, B's
                       * last m % 16 columns made contiguous (rem x d); for A B^T, B */
    ptrdiff_t bt0;
    float *Bp;   /* C = A^T B with B wider than a tile: B by blocks of tile columns, each
                  * block (d x its width) contiguous; or NULL */
    ptrdiff_t n, d, m;
    int trans_a, trans_b;
} gemm_job;

/* C[i0:i0+mr, j0:j0+16 nv] (+)= sum over k < K of a_r[k sk] B[k, j0:...]: the tile kernel.
 * a[r] points at row r's first factor; sk steps k (1 for A's rows, n for A^T's).
 * mr and nv are constants at every call, so the loops unroll into registers. */
INLINE AVX512 void
tile(const float *const a[MR], ptrdiff_t sk, const float *B, ptrdiff_t ldb, ptrdiff_t K,
     float *C, ptrdiff_t ldc, int acc, const int mr, const int nv)
{
    __m512 c[MR][3];  /* acc: go on from C's partial sums (the same sums, in k order) */
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            c[r][v] = acc ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < K; k++) {
        const float *b = B + k * ldb;
        __m512 b0 = _mm512_loadu_ps(b);
        __m512 b1 = nv > 1 ? _mm512_loadu_ps(b + 16) : b0;
        __m512 b2 = nv > 2 ? _mm512_loadu_ps(b + 32) : b0;
        for (int r = 0; r < mr; r++) {
            __m512 x = _mm512_set1_ps(a[r][k * sk]);
            c[r][0] = _mm512_fmadd_ps(x, b0, c[r][0]);
            if (nv > 1) c[r][1] = _mm512_fmadd_ps(x, b1, c[r][1]);
            if (nv > 2) c[r][2] = _mm512_fmadd_ps(x, b2, c[r][2]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

/* Rows [i0, i0 + mr) of C, columns [j0, j0 + 16 nv), over k in [k0, k1); B's rows
 * k0.. of those columns are at b, ldb apart. */
INLINE AVX512 void
tile_at(const gemm_job *g, const float *b, ptrdiff_t ldb, ptrdiff_t i0, ptrdiff_t j0,
        ptrdiff_t k0, ptrdiff_t k1, const int mr, const int nv)
{
    const float *a[MR];
    for (int r = 0; r < mr; r++)
        a[r] = g->trans_a ? g->A + k0 * g->n + i0 + r : g->A + (i0 + r) * g->d + k0;
    tile(a, g->trans_a ? g->n : 1, b, ldb, k1 - k0, g->C + i0 * g->m + j0, g->m, k0 > 0,
         mr, nv);
}

/* Rows [i0, i1) of C for columns [j0, j0 + 16 nv), k in [k0, k1): tiles of 8 rows,
 * then 4, 2, 1. With a panel (room for KC x NB floats), B's block is first copied
 * there, contiguous: a wide B's rows are pages apart, and the tiles would walk them. */
INLINE AVX512 void
rows_at(const gemm_job *g, float *panel, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j0,
        ptrdiff_t k0, ptrdiff_t k1, const int nv)
{
    const float *b = g->B + k0 * g->m + j0;
    ptrdiff_t ldb = g->m, i = i0;
    if (g->Bp) {  /* packed whole by the caller: the block at column j0 starts at d j0 */
        b = g->Bp + g->d * j0 + k0 * 16 * nv;
        ldb = 16 * nv;
    } else if (panel) {
        for (ptrdiff_t k = k0; k < k1; k++)
            for (int v = 0; v < nv; v++)
                _mm512_storeu_ps(panel + (k - k0) * 16 * nv + 16 * v,
                                 _mm512_loadu_ps(g->B + k * g->m + j0 + 16 * v));
        b = panel;
        ldb = 16 * nv;
    }
    for (; i + 8 <= i1; i += 8) tile_at(g, b, ldb, i, j0, k0, k1, 8, nv);
    if (i + 4 <= i1) { tile_at(g, b, ldb, i, j0, k0, k1, 4, nv); i += 4; }
    if (i + 2 <= i1) { tile_at(g, b, ldb, i, j0, k0, k1, 2, nv); i += 2; }
    if (i < i1) tile_at(g, b, ldb, i, j0, k0, k1, 1, nv);
}

/* C = A^T B, rows [i0, i0 + 8): the last tile's 48 columns from j0 and the nr <= 2
 * columns after them, in one pass over k. A's row k holds these 8 rows of C side by
 * side, so the extra columns take one 8-wide FMA each per k, from the A values the
 * tile reads anyway (a pass of their own, columns(), would read A again from L2). */
static AVX512 void
tile_tn_last(const gemm_job *g, ptrdiff_t i0, ptrdiff_t j0, ptrdiff_t nr)
{
    ptrdiff_t n = g->n, m = g->m, ldb = g->Bp ? NB : m;
    const float *B = g->Bp ? g->Bp + g->d * j0 : g->B + j0, *extra = g->B + j0 + NB;
    ptrdiff_t second = nr > 1;  /* with nr = 1, e1 repeats e0: no branch in the loop */
    __m512 c[MR][3], e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) c[r][v] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < g->d; k++) {
        const float *a = g->A + k * n + i0, *b = B + k * ldb;
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16),
               b2 = _mm512_loadu_ps(b + 32);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            __m512 x = _mm512_set1_ps(a[r]);
            c[r][0] = _mm512_fmadd_ps(x, b0, c[r][0]);
            c[r][1] = _mm512_fmadd_ps(x, b1, c[r][1]);
            c[r][2] = _mm512_fmadd_ps(x, b2, c[r][2]);
        }
        __m512 rows = _mm512_maskz_loadu_ps(0xFF, a);  /* C's 8 rows, A's row k */
        e0 = _mm512_fmadd_ps(rows, _mm512_set1_ps(extra[k * m]), e0);
        e1 = _mm512_fmadd_ps(rows, _mm512_set1_ps(extra[k * m + second]), e1);
    }
    float out[2][16];
    _mm512_storeu_ps(out[0], e0);
    _mm512_storeu_ps(out[1], e1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        float *row = g->C + (i0 + r) * m + j0;
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) _mm512_storeu_ps(row + 16 * v, c[r][v]);
        for (ptrdiff_t j = 0; j < nr; j++) row[NB + j] = out[j][r];
    }
}

/* Rows [i0, i1) of C, the whole 16-column vectors in columns [j, j1), k in [k0, k1). */
static AVX512 void
whole_columns(const gemm_job *g, float *panel, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j,
              ptrdiff_t j1, ptrdiff_t k0, ptrdiff_t k1)
{
    for (; j + NB <= j1; j += NB) rows_at(g, panel, i0, i1, j, k0, k1, 3);
    if (j + 32 <= j1) { rows_at(g, panel, i0, i1, j, k0, k1, 2); j += 32; }
    if (j + 16 <= j1) rows_at(g, panel, i0, i1, j, k0, k1, 1);
}

/* C[i0:i1, j0:j1] as dot products of A's rows with Bt's rows j - bt0 (C = A B's last
 * m % 16 columns; all of C = A B^T): 4 rows by up to 4 columns at a time, over k in
 * vectors of 16 (the last one masked). */
static AVX512 void
dots(const gemm_job *g, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j0, ptrdiff_t j1)
{
    ptrdiff_t d = g->d, rem = j1 - j0;
    const float *Bt = g->Bt + (j0 - g->bt0) * d;
    __mmask16 tail = (__mmask16)((1u << (d % 16)) - 1u);
    for (ptrdiff_t i = i0; i < i1; i += 4) {
        for (ptrdiff_t j = 0; j < rem; j += 4) {
            const float *a[4], *b[4];
            for (int r = 0; r < 4; r++) a[r] = g->A + (i + r < i1 ? i + r : i) * d;
            for (int c = 0; c < 4; c++) b[c] = Bt + (j + c < rem ? j + c : j) * d;
            __m512 s[4][4];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
            ptrdiff_t k = 0;
            for (; k + 16 <= d; k += 16) {
                __m512 x[4];
                for (int r = 0; r < 4; r++) x[r] = _mm512_loadu_ps(a[r] + k);
                for (int c = 0; c < 4; c++) {
                    __m512 y = _mm512_loadu_ps(b[c] + k);
                    for (int r = 0; r < 4; r++) s[r][c] = _mm512_fmadd_ps(x[r], y, s[r][c]);
                }
            }
            if (k < d) {
                __m512 x[4];
                for (int r = 0; r < 4; r++) x[r] = _mm512_maskz_loadu_ps(tail, a[r] + k);
                for (int c = 0; c < 4; c++) {
                    __m512 y = _mm512_maskz_loadu_ps(tail, b[c] + k);
                    for (int r = 0; r < 4; r++) s[r][c] = _mm512_fmadd_ps(x[r], y, s[r][c]);
                }
            }
            for (int r = 0; r < 4 && i + r < i1; r++)
                for (int c = 0; c < 4 && j + c < rem; c++)
                    g->C[(i + r) * g->m + j0 + j + c] = _mm512_reduce_add_ps(s[r][c]);
        }
    }
}

/* C = A^T B, columns [j, j + nc) of rows [i, i + 16 nv), nc <= 4, nv <= 4: vectors of
 * A's row k (the rows of C), times B[k, j + c] broadcast, summed over k in order;
 * mask: the valid rows of the last vector. */
INLINE AVX512 void
column_tile(const gemm_job *g, ptrdiff_t i, ptrdiff_t j, __mmask16 mask, const int nv,
            const int nc)
{
    ptrdiff_t n = g->n, m = g->m;
    __m512 s[4][4];
    float out[16];
    for (int v = 0; v < nv; v++)
        for (int c = 0; c < nc; c++) s[v][c] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < g->d; k++) {
        const float *arow = g->A + k * n + i, *brow = g->B + k * m + j;
        __m512 x[4];
        for (int v = 0; v < nv; v++)
            x[v] = v < nv - 1 ? _mm512_loadu_ps(arow + 16 * v)
                              : _mm512_maskz_loadu_ps(mask, arow + 16 * v);
        for (int c = 0; c < nc; c++) {
            __m512 y = _mm512_set1_ps(brow[c]);
            for (int v = 0; v < nv; v++) s[v][c] = _mm512_fmadd_ps(x[v], y, s[v][c]);
        }
    }
    for (int v = 0; v < nv; v++)
        for (int c = 0; c < nc; c++) {
            _mm512_storeu_ps(out, s[v][c]);
            int valid = v < nv - 1 ? 16 : __builtin_popcount((unsigned)mask);
            for (int t = 0; t < valid; t++) g->C[(i + 16 * v + t) * m + j + c] = out[t];
        }
}

/* C = A^T B, columns [j0, m) (fewer than 16) of rows [i0, i1), i1 - i0 <= 64. */
static AVX512 void
columns(const gemm_job *g, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j0)
{
    ptrdiff_t rows = i1 - i0, nv = (rows + 15) / 16;
    __mmask16 mask = (__mmask16)(rows % 16 ? (1u << (rows % 16)) - 1u : 0xFFFFu);
    for (ptrdiff_t j = j0; j < g->m; j += 4) {
        ptrdiff_t nc = g->m - j < 4 ? g->m - j : 4;
#define COLUMNS(NC) \
        switch (nv) { \
        case 4: column_tile(g, i0, j, mask, 4, NC); break; \
        case 3: column_tile(g, i0, j, mask, 3, NC); break; \
        case 2: column_tile(g, i0, j, mask, 2, NC); break; \
        default: column_tile(g, i0, j, mask, 1, NC); }
        switch (nc) {
        case 4: COLUMNS(4) break;
        case 3: COLUMNS(3) break;
        case 2: COLUMNS(2) break;
        default: COLUMNS(1)
        }
#undef COLUMNS
    }
}

/* One thread's share of a product (part p of parts): C's rows [n p / P, n (p+1) / P).
 * C = A B: k in blocks of KC when B is wider than one tile, so that a block of B's
 * tile columns stays in L2 while every row tile passes over it (and A's block too).
 * C = A^T B: 64 rows at a time, all columns, so that the last m % 16 columns read
 * A's 64 columns while the tiles have left them in L1. */
#define KC 512
#define WIDE 256  /* columns of B from which its blocks are copied to a panel */
static AVX512 void
gemm_part(const void *job, int p, int parts)
{
    const gemm_job *g = job;
    ptrdiff_t m = g->m, rest = m - m % 16, i0 = 0, i1 = g->n, j0 = 0, j1 = rest;
    if (g->trans_b) {  /* C = A B^T: by columns, in fours, when each part gets 16 */
        if (m >= 16 * parts) {
            dots(g, 0, g->n, m / 4 * p / parts * 4,
                 p == parts - 1 ? m : m / 4 * (p + 1) / parts * 4);
        } else {
            dots(g, g->n * p / parts, g->n * (p + 1) / parts, 0, m);
        }
        return;
    }
    if (g->trans_a) {
        i0 = g->n * p / parts;
        i1 = g->n * (p + 1) / parts;
        /* 1 or 2 columns after whole tiles (a 50-unit layer): with the last tile's */
        int fuse = m > rest && m - rest <= 2 && rest >= NB && rest % NB == 0;
        for (ptrdiff_t i = i0; i < i1; i += 64) {
            ptrdiff_t e = i + 64 < i1 ? i + 64 : i1, r = i, last = rest - NB;
            if (!fuse) {
                whole_columns(g, NULL, i, e, 0, rest, 0, g->d);
            } else {
                whole_columns(g, NULL, i, e, 0, last, 0, g->d);
                for (; r + MR <= e; r += MR) tile_tn_last(g, r, last, m - rest);
                whole_columns(g, NULL, r, e, last, rest, 0, g->d);
            }
            if (rest < m && r < e) columns(g, r, e, rest);
        }
        return;
    }
    /* C = A B: by tile columns when there are enough for every part, else by rows */
    ptrdiff_t blocks = m / NB;
    if (blocks >= parts * 2) {
        j0 = NB * (blocks * p / parts);
        j1 = p == parts - 1 ? rest : NB * (blocks * (p + 1) / parts);
    } else {
        i0 = g->n * p / parts;
        i1 = g->n * (p + 1) / parts;
    }
    int wide = m >= WIDE;
    ptrdiff_t kc = wide || g->d == 0 ? KC : g->d;  /* d = 0: one pass, which zeroes C */
    float *panel = wide ? malloc(KC * NB * sizeof(float)) : NULL;  /* NULL: B as it is */
    for (ptrdiff_t k = 0; k < g->d || k == 0; k += kc)
        whole_columns(g, panel, i0, i1, j0, j1, k, k + kc < g->d ? k + kc : g->d);
    free(panel);
    if (rest < m && j1 == rest) dots(g, i0, i1, rest, m);
}

int
klayer_gemm_available(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

int
klayer_gemm(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d, ptrdiff_t m,
            int trans_a, int trans_b, int threads)
{
    if (!klayer_gemm_available() || (trans_a && trans_b)) return 0;
    gemm_job g = {A, B, C, trans_b ? B : NULL, 0, NULL, n, d, m, trans_a, trans_b};
    ptrdiff_t rem = trans_b ? 0 : m % 16;
    float *Bt = NULL;
    if (trans_a && m > NB) {  /* B's tile columns, block by block, each contiguous */
        float *Bp = malloc((size_t)(d * (m - rem)) * sizeof(float) + 1);
        if (!Bp) return 0;
        for (ptrdiff_t j = 0; j < m - rem; j += NB) {
            ptrdiff_t w = m - rem - j < NB ? m - rem - j : NB;
            for (ptrdiff_t k = 0; k < d; k++)
                memcpy(Bp + d * j + k * w, B + k * m + j, (size_t)w * sizeof(float));
        }
        g.Bp = Bp;
    }
    if (rem && !trans_a) {  /* B's last rem columns, each contiguous */
        Bt = malloc((size_t)(rem * d) * sizeof(float) + 1);
        if (!Bt) return 0;
        for (ptrdiff_t k = 0; k < d; k++)
            for (ptrdiff_t j = 0; j < rem; j++) Bt[j * d + k] = B[k * m + m - rem + j];
        g.Bt = Bt;
        g.bt0 = m - rem;
    }
    /* no more threads than asked for, and each with 16 rows and 2^20 multiply-adds at
     * least: waking a thread for less costs more than it saves */
    ptrdiff_t most = n / 16, work = (n * d * m) >> 20;
    most = work < most ? work : most;
    most = most > 1 ? most : 1;
    int parts = threads < 1 ? 1 : threads;
    klayer_run_parts(gemm_part, &g, parts > most ? (int)most : parts);
    free(Bt);
    free(g.Bp);
    return 1;
}

#else  /* no kernels for this CPU or compiler: BLAS does the products */

int klayer_gemm_available(void) { return 0; }

int
klayer_gemm(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d, ptrdiff_t m,
            int trans_a, int trans_b, int threads)
{
    (void)A; (void)B; (void)C; (void)n; (void)d; (void)m; (void)trans_a; (void)trans_b;
    (void)threads;
    return 0;
}

#endif
