// Do the two vCPUs have their own vector units? A register-only probe, no memory traffic.
//
// Two loops of AVX2 vpmaddubsw (the instruction every int8 kernel here is built on):
//   throughput: 12 independent accumulators, so one thread can fill every port that runs it;
//   latency:    one dependency chain, so one thread uses a fraction of those ports.
// Each is run on one thread (cpu 0) and on two threads at once (cpu 0 and 1). On two separate
// cores both loops double with the second thread. On two hyper-threads of one core the latency
// loop still doubles (the ports were idle) but the throughput loop does not (they were full).
// Prints G instructions/s per configuration and the 2-thread / 1-thread ratio, interleaved
// over rounds; --json prints one object. Build: see bench/c/run.sh (or gcc -O2 -mavx2).
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ITERS 200000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static volatile int sink;

// 12 independent chains: 12 vpmaddubsw per iteration.
__attribute__((target("avx2"), noinline)) static long run_throughput(long iters, int seed) {
    __m256i b = _mm256_set1_epi8((char)(seed | 1));
    __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3);
    __m256i a3 = _mm256_set1_epi8(4), a4 = _mm256_set1_epi8(5), a5 = _mm256_set1_epi8(6);
    __m256i a6 = _mm256_set1_epi8(7), a7 = _mm256_set1_epi8(8), a8 = _mm256_set1_epi8(9);
    __m256i a9 = _mm256_set1_epi8(10), a10 = _mm256_set1_epi8(11), a11 = _mm256_set1_epi8(12);
    for (long i = 0; i < iters; i++) {
        a0 = _mm256_maddubs_epi16(a0, b); a1 = _mm256_maddubs_epi16(a1, b);
        a2 = _mm256_maddubs_epi16(a2, b); a3 = _mm256_maddubs_epi16(a3, b);
        a4 = _mm256_maddubs_epi16(a4, b); a5 = _mm256_maddubs_epi16(a5, b);
        a6 = _mm256_maddubs_epi16(a6, b); a7 = _mm256_maddubs_epi16(a7, b);
        a8 = _mm256_maddubs_epi16(a8, b); a9 = _mm256_maddubs_epi16(a9, b);
        a10 = _mm256_maddubs_epi16(a10, b); a11 = _mm256_maddubs_epi16(a11, b);
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
        __asm__ volatile("" : "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    __m256i s = _mm256_xor_si256(_mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)),
                                 _mm256_xor_si256(_mm256_xor_si256(a4, a5), _mm256_xor_si256(a6, a7)));
    s = _mm256_xor_si256(s, _mm256_xor_si256(_mm256_xor_si256(a8, a9), _mm256_xor_si256(a10, a11)));
    sink = _mm256_extract_epi32(s, 0);
    return iters * 12;
}

// One chain: each vpmaddubsw waits for the previous one.
__attribute__((target("avx2"), noinline)) static long run_latency(long iters, int seed) {
    __m256i b = _mm256_set1_epi8((char)(seed | 1)), a = _mm256_set1_epi8(1);
    for (long i = 0; i < iters; i++) {
        a = _mm256_maddubs_epi16(a, b); a = _mm256_maddubs_epi16(a, b);
        a = _mm256_maddubs_epi16(a, b); a = _mm256_maddubs_epi16(a, b);
        __asm__ volatile("" : "+x"(a));
    }
    sink = _mm256_extract_epi32(a, 0);
    return iters * 4;
}

typedef struct {
    int cpu, kind;
    long iters;
    pthread_barrier_t *bar;
    double ops_per_s;
} job_t;

static void *worker(void *p) {
    job_t *j = p;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(j->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    if (j->bar) pthread_barrier_wait(j->bar);
    double t0 = now();
    long ops = j->kind ? run_latency(j->iters / 4, j->cpu) : run_throughput(j->iters / 2, j->cpu);
    j->ops_per_s = ops / (now() - t0);
    return NULL;
}

// Total instructions/s of `threads` workers started together.
static double measure(int kind, int threads) {
    pthread_t th[2];
    job_t jobs[2];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, threads);
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){.cpu = t, .kind = kind, .iters = ITERS, .bar = &bar};
        pthread_create(&th[t], NULL, worker, &jobs[t]);
    }
    double total = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        total += jobs[t].ops_per_s;
    }
    pthread_barrier_destroy(&bar);
    return total;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int json = argc > 1 && !strcmp(argv[1], "--json");
    if (!__builtin_cpu_supports("avx2")) {
        fprintf(stderr, "ports: this CPU has no AVX2; the probe needs it\n");
        return 1;
    }
    enum { ROUNDS = 5 };
    double r[2][2][ROUNDS];  // [kind][threads-1][round]
    for (int k = 0; k < ROUNDS; k++)
        for (int kind = 0; kind < 2; kind++)
            for (int t = 1; t <= 2; t++) r[kind][t - 1][k] = measure(kind, t);
    double med[2][2];
    for (int kind = 0; kind < 2; kind++)
        for (int t = 0; t < 2; t++) {
            qsort(r[kind][t], ROUNDS, sizeof(double), cmp);
            med[kind][t] = r[kind][t][ROUNDS / 2];
        }
    const char *name[2] = {"throughput", "latency"};
    if (json) {
        printf("{");
        for (int kind = 0; kind < 2; kind++)
            printf("%s\"%s\": {\"gips_1t\": %.3f, \"gips_2t\": %.3f, \"scaling\": %.3f}", kind ? ", " : "",
                   name[kind], med[kind][0] / 1e9, med[kind][1] / 1e9, med[kind][1] / med[kind][0]);
        printf("}\n");
        return 0;
    }
    printf("vpmaddubsw ymm, register only, median of %d interleaved rounds\n", ROUNDS);
    printf("%-11s %12s %12s %10s\n", "loop", "1 thread", "2 threads", "2t / 1t");
    for (int kind = 0; kind < 2; kind++)
        printf("%-11s %8.2f G/s %8.2f G/s %9.2fx\n", name[kind], med[kind][0] / 1e9, med[kind][1] / 1e9,
               med[kind][1] / med[kind][0]);
    printf("separate cores: both ~2x; two hyper-threads of one core: latency ~2x, throughput ~1x\n");
    return 0;
}
