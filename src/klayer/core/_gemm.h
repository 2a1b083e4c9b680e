/* klayer's own float32 matrix products (_gemm.c), called by _kernels.c. */
#ifndef KLAYER_GEMM_H
#define KLAYER_GEMM_H

#include <stddef.h>

/* C = A B (trans_a = 0: A is n x d) or C = A^T B (trans_a = 1: A is d x n, stored so),
 * with B d x m and C n x m; every array row-major and contiguous. threads >= 1 splits
 * C's rows among that many threads (a pool kept between calls). Returns 0 without
 * touching C when this CPU (or build) has no such kernel: the caller uses BLAS. */
int klayer_gemm(const float *A, const float *B, float *C, ptrdiff_t n, ptrdiff_t d,
                ptrdiff_t m, int trans_a, int threads);

/* 1 when klayer_gemm runs on this CPU. */
int klayer_gemm_available(void);

#endif
