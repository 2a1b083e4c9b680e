/* klayer's own float32 matrix products (_gemm.c), called by _kernels.c. */
#ifndef KLAYER_GEMM_H
#define KLAYER_GEMM_H

#include <stddef.h>

/* C = A B, with A n x d, B d x m and C n x m; with trans_a, C = A^T B where A is stored
 * d x n; with trans_b, C = A B^T where B is stored m x d (not both). Every array
 * row-major and contiguous. threads >= 1 splits C among that many threads (a pool kept
 * between calls). Returns 0 without touching C when this CPU (or build) has no such
 * kernel: the caller uses BLAS. */
int klayer_gemm(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d,
                ptrdiff_t m, int trans_a, int trans_b, int threads);

/* The instruction sets klayer_gemm can run on: 2 AVX-512F, 1 AVX2 with FMA, 0 none.
 * best: what this CPU has; level: what klayer_gemm uses now (the best unless selected);
 * select: use `level` (1 .. best; for tests and benchmarks of the narrower kernels),
 * returning 0 and changing nothing for any other. Not for use while a product runs. */
int klayer_gemm_best(void);
int klayer_gemm_level(void);
int klayer_gemm_select(int level);

#endif
