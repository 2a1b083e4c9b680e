/* The core's own single-precision peak: independent AVX-512 fused multiply-adds on
 * registers only (12 accumulators, no memory traffic), one thread. No matrix product
 * can beat this rate; docs/performance.md compares OpenBLAS's best with it.
 *
 *     gcc -O3 -march=native benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Needs a CPU with AVX-512F. Run it twice: the first run may still be clocking up.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

int main(void) {
    __m512 a[12], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
    long n = 200000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < n; k++)
        for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    float sink = 0; /* keeps the loop from being optimized away */
    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(a[i]);
    printf("%.1f GFLOP/s (%.2f s; sink %g)\n", n * 12.0 * 16 * 2 / s / 1e9, s, sink);
    return 0;
}
