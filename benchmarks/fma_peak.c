/* The core's own single-precision peak: independent fused multiply-adds on registers
 * only (12 accumulators, no memory traffic), one thread, on the widest vectors that
 * -march=native gives: AVX-512 (16 floats) or else AVX2 (8). No matrix product can beat
 * this rate; docs/performance.md compares OpenBLAS's best with it.
 *
 *     gcc -O3 -march=native benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Needs a CPU with AVX2 and FMA at least. Run it twice: the first run may still be
 * clocking up.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#if defined(__AVX512F__)
#define ISA "AVX-512"
#define LANES 16
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define SUM _mm512_reduce_add_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA "AVX2"
#define LANES 8
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
static float SUM(__m256 v) {
    float f[8], s = 0;
    _mm256_storeu_ps(f, v);
    for (int i = 0; i < 8; i++) s += f[i];
    return s;
}
#else
#error "needs AVX-512F, or AVX2 with FMA: compile with -march=native on such a CPU"
#endif

int main(void) {
    vec a[12], b = SET1(1.0000001f), c = SET1(1e-7f);
    for (int i = 0; i < 12; i++) a[i] = SET1((float)i);
    long n = 200000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < n; k++)
        for (int i = 0; i < 12; i++) a[i] = FMA(a[i], b, c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    float sink = 0; /* keeps the loop from being optimized away */
    for (int i = 0; i < 12; i++) sink += SUM(a[i]);
    printf("%.1f GFLOP/s, %s (%.2f s; sink %g)\n", n * 12.0 * LANES * 2 / s / 1e9, ISA, s,
           sink);
    return 0;
}
