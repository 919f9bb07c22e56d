// The machine's f32 FMA peak: each thread runs 12 independent chains of vector fused
// multiply-adds (enough to cover the FMA latency on both FMA ports), so nothing but the FMA
// units limits it. Built by scripts/fma_peak.sh with AVX-512 where the CPU has it, else AVX2.
// Prints GFLOP/s for the thread count given (default 1), 2 flops per lane per FMA.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12
#define ITERS 200000000L
#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *chains(void *out) {
    vec acc[CHAINS];
    vec b = SET1(1.0000001f), c = SET1(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
    for (long it = 0; it < ITERS; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], b, c);
    }
    float lanes[LANES], sum = 0;
    for (int i = 0; i < CHAINS; i++) {
        STORE(lanes, acc[i]);
        for (int l = 0; l < LANES; l++) sum += lanes[l];
    }
    *(float *)out = sum; // keeps the chains live
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    if (n < 1 || n > 256) return 2;
    pthread_t threads[256];
    float sums[256];
    double t0 = now();
    for (int i = 0; i < n; i++) pthread_create(&threads[i], NULL, chains, &sums[i]);
    for (int i = 0; i < n; i++) pthread_join(threads[i], NULL);
    double secs = now() - t0;
    double flops = (double)n * ITERS * CHAINS * LANES * 2;
    printf("%d thread(s), %d-lane FMA: %.1f GFLOP/s (%.2f s; %g)\n", n, LANES, flops / secs * 1e-9, secs,
           sums[0]);
    return 0;
}
