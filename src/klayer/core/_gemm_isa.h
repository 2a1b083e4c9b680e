/* The body of klayer's matrix products, written once for any vector width: _gemm.c
 * includes it once per instruction set, after defining
 *
 *   SFX(name)      the name with the set's suffix (tile_avx512, ...)
 *   TARGET         the functions' target attribute (the rest of the build is baseline)
 *   VEC, LANES     the vector type and its floats (16 or 8)
 *   MR             rows of a C tile (8 or 4): MR x 3 accumulators, 3 vectors of B and a
 *                  broadcast fit the register file (32 zmm or 16 ymm)
 *   DR             rows of a dots() block (4 or 3): DR x 4 sums, DR rows and a column
 *   VZERO() VLOAD(p) VSTORE(p, v) VSET1(x) VFMA(a, b, c)   (c + a b, one rounding)
 *   VLOAD_FIRST(p, n)   lanes 0 .. n-1 from p (0 < n <= LANES), zeros after, and no
 *                       read beyond p[n-1]
 *   VLOAD_MR(p)    VLOAD_FIRST(p, MR), by the fastest load there is
 *   VSUM(v)        the lanes' sum
 *   KC, WIDE       C = A B copies B to panels of KC k by a tile's columns when B has
 *                  WIDE columns or more (0: always), k in blocks of KC then
 *   PACK_AT        1: C = A^T B copies A's columns for ROWS_AT_ONCE rows of C at a time
 *                  (contiguous, so its lines do not all share one cache set)
 *
 * NB (a tile's columns) is 3 LANES. Every C element is one sequential FMA sum over k
 * whatever the set, except dots(), which sums LANES partial sums at the end.
 */
#define NB (3 * LANES)
#define ROWS_AT_ONCE (4 * LANES)  /* rows of C = A^T B per pass: columns() takes <= 4 vectors */

/* C[i0:i0+mr, j0:j0+LANES nv] (+)= sum over k < K of a_r[k sk] B[k, j0:...]: the tile
 * kernel. a[r] points at row r's first factor; sk steps k (1 for A's rows, n for A^T's).
 * mr and nv are constants at every call, so the loops unroll into registers. */
INLINE TARGET void
SFX(tile)(const float *const a[MR], ptrdiff_t sk, const float *B, ptrdiff_t ldb,
          ptrdiff_t K, float *C, ptrdiff_t ldc, int acc, const int mr, const int nv)
{
    VEC c[MR][3];  /* acc: go on from C's partial sums (the same sums, in k order) */
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            c[r][v] = acc ? VLOAD(C + r * ldc + LANES * v) : VZERO();
    for (ptrdiff_t k = 0; k < K; k++) {
        const float *b = B + k * ldb;
        VEC b0 = VLOAD(b);
        VEC b1 = nv > 1 ? VLOAD(b + LANES) : b0;
        VEC b2 = nv > 2 ? VLOAD(b + 2 * LANES) : b0;
        for (int r = 0; r < mr; r++) {
            VEC x = VSET1(a[r][k * sk]);
            c[r][0] = VFMA(x, b0, c[r][0]);
            if (nv > 1) c[r][1] = VFMA(x, b1, c[r][1]);
            if (nv > 2) c[r][2] = VFMA(x, b2, c[r][2]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) VSTORE(C + r * ldc + LANES * v, c[r][v]);
}

/* Rows [i0, i0 + mr) of C, columns [j0, j0 + LANES nv), over k in [k0, k1); B's rows
 * k0.. of those columns are at b, ldb apart. */
INLINE TARGET void
SFX(tile_at)(const gemm_job *g, const float *b, ptrdiff_t ldb, ptrdiff_t i0, ptrdiff_t j0,
             ptrdiff_t k0, ptrdiff_t k1, const int mr, const int nv)
{
    const float *a[MR];
    for (int r = 0; r < mr; r++)
        a[r] = g->trans_a ? g->At + k0 * g->lda + i0 - g->ia + r : g->A + (i0 + r) * g->d + k0;
    SFX(tile)(a, g->trans_a ? g->lda : 1, b, ldb, k1 - k0, g->C + i0 * g->m + j0, g->m,
              k0 > 0, mr, nv);
}

/* Rows [i0, i1) of C for columns [j0, j0 + LANES nv), k in [k0, k1): tiles of MR rows,
 * then halves down to 1. With a panel (room for KC x NB floats), B's block is first
 * copied there, contiguous: a wide B's rows are pages apart, and the tiles would walk
 * them. */
INLINE TARGET void
SFX(rows_at)(const gemm_job *g, float *panel, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j0,
             ptrdiff_t k0, ptrdiff_t k1, const int nv)
{
    const float *b = g->B + k0 * g->m + j0;
    ptrdiff_t ldb = g->m, i = i0;
    if (g->Bp) {  /* packed whole by the caller: the block at column j0 starts at d j0 */
        b = g->Bp + g->d * j0 + k0 * LANES * nv;
        ldb = LANES * nv;
    } else if (panel) {
        for (ptrdiff_t k = k0; k < k1; k++)
            for (int v = 0; v < nv; v++)
                VSTORE(panel + (k - k0) * LANES * nv + LANES * v,
                       VLOAD(g->B + k * g->m + j0 + LANES * v));
        b = panel;
        ldb = LANES * nv;
    }
    for (; i + MR <= i1; i += MR) SFX(tile_at)(g, b, ldb, i, j0, k0, k1, MR, nv);
#if MR > 4
    if (i + 4 <= i1) { SFX(tile_at)(g, b, ldb, i, j0, k0, k1, 4, nv); i += 4; }
#endif
    if (i + 2 <= i1) { SFX(tile_at)(g, b, ldb, i, j0, k0, k1, 2, nv); i += 2; }
    if (i < i1) SFX(tile_at)(g, b, ldb, i, j0, k0, k1, 1, nv);
}

/* C = A^T B, rows [i0, i0 + MR): the last tile's NB columns from j0 and the nr <= 2
 * columns after them, in one pass over k. A's row k holds these MR rows of C side by
 * side, so the extra columns take one FMA each per k, from the A values the tile
 * reads anyway (a pass of their own, columns(), would read A again from L2). */
static TARGET void
SFX(tile_tn_last)(const gemm_job *g, ptrdiff_t i0, ptrdiff_t j0, ptrdiff_t nr)
{
    ptrdiff_t n = g->lda, m = g->m, ldb = g->Bp ? NB : m;
    const float *B = g->Bp ? g->Bp + g->d * j0 : g->B + j0, *extra = g->B + j0 + NB;
    ptrdiff_t second = nr > 1;  /* with nr = 1, e1 repeats e0: no branch in the loop */
    VEC c[MR][3], e0 = VZERO(), e1 = VZERO();
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) c[r][v] = VZERO();
    for (ptrdiff_t k = 0; k < g->d; k++) {
        const float *a = g->At + k * n + i0 - g->ia, *b = B + k * ldb;
        VEC b0 = VLOAD(b), b1 = VLOAD(b + LANES), b2 = VLOAD(b + 2 * LANES);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            VEC x = VSET1(a[r]);
            c[r][0] = VFMA(x, b0, c[r][0]);
            c[r][1] = VFMA(x, b1, c[r][1]);
            c[r][2] = VFMA(x, b2, c[r][2]);
        }
        VEC rows = VLOAD_MR(a);  /* C's MR rows, A's row k */
        e0 = VFMA(rows, VSET1(extra[k * m]), e0);
        e1 = VFMA(rows, VSET1(extra[k * m + second]), e1);
    }
    float out[2][LANES];
    VSTORE(out[0], e0);
    VSTORE(out[1], e1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        float *row = g->C + (i0 + r) * m + j0;
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) VSTORE(row + LANES * v, c[r][v]);
        for (ptrdiff_t j = 0; j < nr; j++) row[NB + j] = out[j][r];
    }
}

/* Rows [i0, i1) of C, the whole LANES-column vectors in columns [j, j1), k in [k0, k1). */
static TARGET void
SFX(whole_columns)(const gemm_job *g, float *panel, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j,
                   ptrdiff_t j1, ptrdiff_t k0, ptrdiff_t k1)
{
    for (; j + NB <= j1; j += NB) SFX(rows_at)(g, panel, i0, i1, j, k0, k1, 3);
    if (j + 2 * LANES <= j1) {
        SFX(rows_at)(g, panel, i0, i1, j, k0, k1, 2);
        j += 2 * LANES;
    }
    if (j + LANES <= j1) SFX(rows_at)(g, panel, i0, i1, j, k0, k1, 1);
}

/* C[i0:i1, j0:j1] as dot products of A's rows with Bt's rows j - bt0 (C = A B's last
 * m % LANES columns; all of C = A B^T): DR rows by up to 4 columns at a time, over k in
 * vectors of LANES (the last one partial). */
static TARGET void
SFX(dots)(const gemm_job *g, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j0, ptrdiff_t j1)
{
    ptrdiff_t d = g->d, rem = j1 - j0, tail = d % LANES;
    const float *Bt = g->Bt + (j0 - g->bt0) * d;
    for (ptrdiff_t i = i0; i < i1; i += DR) {
        for (ptrdiff_t j = 0; j < rem; j += 4) {
            const float *a[DR], *b[4];
            for (int r = 0; r < DR; r++) a[r] = g->A + (i + r < i1 ? i + r : i) * d;
            for (int c = 0; c < 4; c++) b[c] = Bt + (j + c < rem ? j + c : j) * d;
            VEC s[DR][4];
            for (int r = 0; r < DR; r++)
                for (int c = 0; c < 4; c++) s[r][c] = VZERO();
            ptrdiff_t k = 0;
            for (; k + LANES <= d; k += LANES) {
                VEC x[DR];
                for (int r = 0; r < DR; r++) x[r] = VLOAD(a[r] + k);
                for (int c = 0; c < 4; c++) {
                    VEC y = VLOAD(b[c] + k);
                    for (int r = 0; r < DR; r++) s[r][c] = VFMA(x[r], y, s[r][c]);
                }
            }
            if (tail) {
                VEC x[DR];
                for (int r = 0; r < DR; r++) x[r] = VLOAD_FIRST(a[r] + k, tail);
                for (int c = 0; c < 4; c++) {
                    VEC y = VLOAD_FIRST(b[c] + k, tail);
                    for (int r = 0; r < DR; r++) s[r][c] = VFMA(x[r], y, s[r][c]);
                }
            }
            for (int r = 0; r < DR && i + r < i1; r++)
                for (int c = 0; c < 4 && j + c < rem; c++)
                    g->C[(i + r) * g->m + j0 + j + c] = VSUM(s[r][c]);
        }
    }
}

/* C = A^T B, columns [j, j + nc) of rows [i, i + LANES nv), nc <= 4, nv <= 4: vectors
 * of A's row k (the rows of C), times B[k, j + c] broadcast, summed over k in order;
 * valid: the rows of the last vector that are C's. */
INLINE TARGET void
SFX(column_tile)(const gemm_job *g, ptrdiff_t i, ptrdiff_t j, int valid, const int nv,
                 const int nc)
{
    ptrdiff_t n = g->lda, m = g->m;
    VEC s[4][4];
    float out[LANES];
    for (int v = 0; v < nv; v++)
        for (int c = 0; c < nc; c++) s[v][c] = VZERO();
    for (ptrdiff_t k = 0; k < g->d; k++) {
        const float *arow = g->At + k * n + i - g->ia, *brow = g->B + k * m + j;
        VEC x[4];
        for (int v = 0; v < nv; v++)
            x[v] = v < nv - 1 ? VLOAD(arow + LANES * v)
                              : VLOAD_FIRST(arow + LANES * v, valid);
        for (int c = 0; c < nc; c++) {
            VEC y = VSET1(brow[c]);
            for (int v = 0; v < nv; v++) s[v][c] = VFMA(x[v], y, s[v][c]);
        }
    }
    for (int v = 0; v < nv; v++)
        for (int c = 0; c < nc; c++) {
            VSTORE(out, s[v][c]);
            int rows = v < nv - 1 ? LANES : valid;
            for (int t = 0; t < rows; t++) g->C[(i + LANES * v + t) * m + j + c] = out[t];
        }
}

/* C = A^T B, columns [j0, m) (fewer than LANES) of rows [i0, i1), i1 - i0 <=
 * ROWS_AT_ONCE. */
static TARGET void
SFX(columns)(const gemm_job *g, ptrdiff_t i0, ptrdiff_t i1, ptrdiff_t j0)
{
    ptrdiff_t rows = i1 - i0, nv = (rows + LANES - 1) / LANES;
    int valid = rows % LANES ? (int)(rows % LANES) : LANES;
    for (ptrdiff_t j = j0; j < g->m; j += 4) {
        ptrdiff_t nc = g->m - j < 4 ? g->m - j : 4;
#define COLUMNS(NC) \
        switch (nv) { \
        case 4: SFX(column_tile)(g, i0, j, valid, 4, NC); break; \
        case 3: SFX(column_tile)(g, i0, j, valid, 3, NC); break; \
        case 2: SFX(column_tile)(g, i0, j, valid, 2, NC); break; \
        default: SFX(column_tile)(g, i0, j, valid, 1, NC); }
        switch (nc) {
        case 4: COLUMNS(4) break;
        case 3: COLUMNS(3) break;
        case 2: COLUMNS(2) break;
        default: COLUMNS(1)
        }
#undef COLUMNS
    }
}

/* C = A^T B, rows [i0, i1): ROWS_AT_ONCE rows at a time, all columns, so that the last
 * m % LANES columns read A's columns while the tiles have left them in L1. With
 * PACK_AT, those columns of A are first copied side by side: A's row k is n floats
 * long, and with n a multiple of 1,024 (3,072 inputs) every k's line falls in one
 * L1 set. */
static TARGET void
SFX(part_tn)(const gemm_job *g, ptrdiff_t i0, ptrdiff_t i1)
{
    ptrdiff_t m = g->m, rest = m - m % LANES, last = rest - NB;
    /* 1 or 2 columns after whole tiles (a 50-unit layer): with the last tile's */
    int fuse = m > rest && m - rest <= 2 && rest >= NB && rest % NB == 0;
    gemm_job h = *g;
    float *Ap = PACK_AT ? malloc((size_t)(ROWS_AT_ONCE * g->d) * sizeof(float) + 1) : NULL;
    for (ptrdiff_t i = i0; i < i1; i += ROWS_AT_ONCE) {
        ptrdiff_t e = i + ROWS_AT_ONCE < i1 ? i + ROWS_AT_ONCE : i1, w = e - i, r = i;
        if (Ap) {  /* (without the buffer, A is read where it lies) */
            for (ptrdiff_t k = 0; k < g->d; k++)
                memcpy(Ap + k * w, g->A + k * g->n + i, (size_t)w * sizeof(float));
            h.At = Ap;
            h.lda = w;
            h.ia = i;
        }
        if (!fuse) {
            SFX(whole_columns)(&h, NULL, i, e, 0, rest, 0, g->d);
        } else {
            SFX(whole_columns)(&h, NULL, i, e, 0, last, 0, g->d);
            for (; r + MR <= e; r += MR) SFX(tile_tn_last)(&h, r, last, m - rest);
            SFX(whole_columns)(&h, NULL, r, e, last, rest, 0, g->d);
        }
        if (rest < m && r < e) SFX(columns)(&h, r, e, rest);
    }
    free(Ap);
}

/* One thread's share of a product (part p of parts): C's rows [n p / P, n (p+1) / P).
 * C = A B: k in blocks of KC when B is at least WIDE columns wide, so that a block of
 * B's tile columns stays in cache while every row tile passes over it (and A's block
 * too). C = A^T B: part_tn. */
static TARGET void
SFX(gemm_part)(const void *job, int p, int parts)
{
    const gemm_job *g = job;
    ptrdiff_t m = g->m, rest = m - m % LANES, i0 = 0, i1 = g->n, j0 = 0, j1 = rest;
    if (g->trans_b) {  /* C = A B^T: by columns, in fours, when each part gets 16 */
        if (m >= 16 * parts) {
            SFX(dots)(g, 0, g->n, m / 4 * p / parts * 4,
                      p == parts - 1 ? m : m / 4 * (p + 1) / parts * 4);
        } else {
            SFX(dots)(g, g->n * p / parts, g->n * (p + 1) / parts, 0, m);
        }
        return;
    }
    if (g->trans_a) {
        SFX(part_tn)(g, g->n * p / parts, g->n * (p + 1) / parts);
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
        SFX(whole_columns)(g, panel, i0, i1, j0, j1, k, k + kc < g->d ? k + kc : g->d);
    free(panel);
    if (rest < m && j1 == rest) SFX(dots)(g, i0, i1, rest, m);
}

/* klayer_gemm on this set: B's operands arranged, then the parts run on the pool.
 * Returns 0 (C untouched) when a buffer cannot be allocated. */
static int
SFX(gemm)(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d, ptrdiff_t m,
          int trans_a, int trans_b, int parts)
{
    gemm_job g = {A, B, C, trans_b ? B : NULL, 0, NULL, n, d, m, trans_a, trans_b, A, n, 0};
    ptrdiff_t rem = trans_b ? 0 : m % LANES;
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
        if (!Bt) {
            free(g.Bp);
            return 0;
        }
        for (ptrdiff_t k = 0; k < d; k++)
            for (ptrdiff_t j = 0; j < rem; j++) Bt[j * d + k] = B[k * m + m - rem + j];
        g.Bt = Bt;
        g.bt0 = m - rem;
    }
    klayer_run_parts(SFX(gemm_part), &g, parts);
    free(Bt);
    free(g.Bp);
    return 1;
}

#undef NB
#undef ROWS_AT_ONCE
#undef TARGET
#undef SFX
#undef VEC
#undef LANES
#undef MR
#undef DR
#undef KC
#undef WIDE
#undef PACK_AT
#undef VZERO
#undef VLOAD
#undef VSTORE
#undef VSET1
#undef VFMA
#undef VLOAD_FIRST
#undef VLOAD_MR
#undef VSUM
