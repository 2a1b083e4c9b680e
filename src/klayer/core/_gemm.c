/* klayer's own float32 matrix products, for the shapes its layers have.
 *
 * A training step of a 100-example mini-batch multiplies short, wide operands: the
 * first layer's X W (100 x 3072 by 3072 x m) and X^T dS (3072 x 100 by 100 x m).
 * OpenBLAS packs both operands into blocks before every product, which on these shapes
 * costs it a quarter of the cores' FMA peak (benchmarks/profile_step.py,
 * docs/performance.md). These kernels keep a tile of C in registers and stream its
 * whole sum over k through it, reading A by broadcasts where it lies and B's rows a
 * tile's width at a time: with AVX-512, 8 rows by 48 columns in 24 of 32 registers;
 * with AVX2, 4 rows by 24 columns in 12 of 16. B is copied only where its rows lie
 * pages apart (256 columns or more: a panel of 512 k at a time, reused by every row
 * tile) and, for A^T B, when wider than a tile (B then has the batch's ~100 rows).
 * Every element of C is one sequential sum of FMAs, over k in order, whatever the
 * thread count, blocking or vector width (the dot products below excepted).
 *
 * Columns beyond the last whole vector (m % 16 of them with AVX-512, m % 8 with AVX2; 2
 * for a 50-unit layer either way) are done apart, so a 50-wide C costs 50, not 64,
 * columns of work: for C = A B, as dot products of A's rows with those columns
 * (copied contiguous), a vector of k at a time, so their sums' order depends on the
 * vector width; for C = A^T B, a vector of C's rows at a time (A's rows are C's
 * columns there), or, when 1 or 2 follow whole tiles, in the last tile's own pass
 * (tile_tn_last).
 *
 * The kernels are written once (_gemm_isa.h) and compiled here once per instruction
 * set. Threads: C's rows (or, for a wide A B or any A B^T, its columns) are split among
 * the threads of _pool.c. Only x86-64 with GCC or Clang has the kernels, chosen at run
 * time: AVX-512F where the CPU has it, else AVX2 with FMA; elsewhere klayer_gemm
 * returns 0 and klayer uses BLAS.
 */
#include "_gemm.h"
#include "_pool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const float *A, *B;
    float *C;
    const float *Bt;  /* rows giving C's columns bt0.. as dot products: for C = A B, B's
                       * last m % LANES columns made contiguous (rem x d); for A B^T, B */
    ptrdiff_t bt0;
    float *Bp;   /* C = A^T B with B wider than a tile: B by blocks of tile columns, each
                  * block (d x its width) contiguous; or NULL */
    ptrdiff_t n, d, m;
    int trans_a, trans_b;
    const float *At;  /* C = A^T B: A's element (k, i) at At[k lda + i - ia]; A itself, */
    ptrdiff_t lda, ia;  /* or a copy of some of its columns (PACK_AT) */
} gemm_job;


/* --- AVX-512: 16 floats a vector, 32 registers; tiles of 8 rows by 48 columns --- */
#define TARGET __attribute__((target("avx512f")))
#define SFX(name) name##_avx512
#define VEC __m512
#define LANES 16
#define MR 8
#define DR 4
#define KC 512     /* a panel: 512 k by 48 columns, 96 KB, in the 1-2 MB L2 */
#define WIDE 256   /* and copied only for a B this wide (narrower ones stay in L2) */
#define PACK_AT 0  /* A^T read in place (tuned so on the AVX-512 guests measured) */
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps((p), (v))
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VLOAD_FIRST(p, n) _mm512_maskz_loadu_ps((__mmask16)((1u << (n)) - 1u), (p))
#define VLOAD_MR(p) VLOAD_FIRST((p), MR)
#define VSUM(v) _mm512_reduce_add_ps(v)
#include "_gemm_isa.h"  /* (which undefines these parameters) */

/* --- AVX2 with FMA: 8 floats a vector, 16 registers; tiles of 4 rows by 24 columns --- */
#define TARGET __attribute__((target("avx2,fma")))

INLINE TARGET __m256
load_first_avx2(const float *p, int n)  /* masked lanes are neither read nor faulted */
{
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}

INLINE TARGET float
sum_avx2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#define SFX(name) name##_avx2
#define VEC __m256
#define LANES 8
#define MR 4
#define DR 3
/* Tuned on a Zen 3 guest (32 KB L1d, 512 KB L2): B is always copied to a panel of 256 k
 * by 24 columns, 24 KB, that stays in L1 (a 50-unit layer's B, 600 KB, does not fit
 * in L2); and C = A^T B copies A's columns of each ROWS_AT_ONCE rows first: A's rows
 * (3,072 floats apart in the first layer) put every k's line in one L1 set. Measured
 * in docs/performance.md. */
#define KC 256
#define WIDE 0
#define PACK_AT 1
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps((p), (v))
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VLOAD_FIRST(p, n) load_first_avx2((p), (n))
#define VLOAD_MR(p) _mm256_zextps128_ps256(_mm_loadu_ps(p))  /* MR = 4 floats */
#define VSUM(v) sum_avx2(v)
#include "_gemm_isa.h"

/* 2: AVX-512F, 1: AVX2 with FMA, 0: neither (BLAS runs the products) */
int
klayer_gemm_best(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

static int level_in_use = -1;  /* klayer_gemm_select's choice; -1: the best, once known */

int
klayer_gemm_level(void)
{
    if (level_in_use < 0) level_in_use = klayer_gemm_best();
    return level_in_use;
}

int
klayer_gemm_select(int level)
{
    if (level < 1 || level > klayer_gemm_best()) return 0;
    level_in_use = level;
    return 1;
}

int
klayer_gemm(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d, ptrdiff_t m,
            int trans_a, int trans_b, int threads)
{
    int level = klayer_gemm_level();
    if (!level || (trans_a && trans_b)) return 0;
    /* no more threads than asked for, and each with 16 rows and 2^20 multiply-adds at
     * least: waking a thread for less costs more than it saves */
    ptrdiff_t most = n / 16, work = (n * d * m) >> 20;
    most = work < most ? work : most;
    most = most > 1 ? most : 1;
    int parts = threads < 1 ? 1 : threads;
    parts = parts > most ? (int)most : parts;
    return level == 2 ? gemm_avx512(A, B, C, n, d, m, trans_a, trans_b, parts)
                      : gemm_avx2(A, B, C, n, d, m, trans_a, trans_b, parts);
}

#else  /* no kernels for this CPU or compiler: BLAS does the products */

int klayer_gemm_best(void) { return 0; }
int klayer_gemm_level(void) { return 0; }
int klayer_gemm_select(int level) { (void)level; return 0; }

int
klayer_gemm(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d, ptrdiff_t m,
            int trans_a, int trans_b, int threads)
{
    (void)A; (void)B; (void)C; (void)n; (void)d; (void)m; (void)trans_a; (void)trans_b;
    (void)threads;
    return 0;
}

#endif
