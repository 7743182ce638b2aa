/* Parity harness for the GEMM kernels, through the public C ABI (onebit_kernels.h).
 *
 * Links the kernel sources directly (dispatch.c threads.c ref.c x86.c lut.c arm.c pack.c; the
 * files of the other architecture compile to nothing). For every variant this CPU runs, checks
 * ob_gemm_i2 / ob_gemm_t1_6 against ob_set_isa("reference") -- and the reference against a naive
 * sum over the unpacked codes, computed here -- on random weights packed with ob_pack:
 *   - awkward shapes: m x k x n over {1,2,3,4,5,8,9,17} x {1,5,127,128,129,160,300,2560} x
 *     {1,3,16,17,64}, activation row stride ldx = k or k + a few, thread counts 1 and 3;
 *   - extremes: all weights -1 or +1 against activations all -128 or all 127 (the largest
 *     partial sums a kernel can see, for int16/int32 overflow), long k;
 *   - corrupt bytes: every one of the 256 byte values planted once in a packed row (padding
 *     included), expecting OB_ERR_CORRUPT exactly when the reference rejects the byte, and the
 *     reference's result otherwise; plus planted bad bytes in the share of the second thread;
 *   - buffer lengths: a w_bytes that does not fit n, k and the layout is OB_ERR_BUFFER.
 * Prints a summary; exit status 0 only if everything matched.
 *
 * Usage: parity [--seed N] [--expect-neon dot|base] [--variants a,b,..] [--expect-auto NAME]
 *   --expect-neon: on AArch64, fail unless the "neon" variant takes that path (sdot / smlal).
 *   --variants: check only these variants (the reference is always the oracle); fail if this CPU
 *     does not run one of them (so an emulated run cannot pass without exercising it).
 *   --expect-auto: fail unless CPU detection (ONEBIT_KERNELS unset) picks NAME. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "onebit_kernels.h"

#if defined(__aarch64__)
int ob_neon_uses_dotprod(void); /* arm.c, hidden: which path the neon variant takes */
#endif

static const char *CANDIDATES[] = {"reference", "neon", "avx2", "avx2_lut", "avx512vnni", "avx512vnni_zmm"};
#define N_CAND ((int)(sizeof(CANDIDATES) / sizeof(CANDIDATES[0])))
static const char *LAYOUT_NAME[2] = {"i2", "t1_6"};

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* xorshift64* */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}
static int64_t rnd_below(int64_t n) { return (int64_t)(rnd() % (uint64_t)n); }

static long g_checks = 0, g_fail = 0;
static const char *g_variants[N_CAND];
static int g_nvar = 0;
static long g_var_checks[N_CAND][2];

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static int gemm(int layout, const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                int64_t ldx, int32_t *acc) {
    int64_t w_bytes = n * ob_packed_row_bytes(k, layout); /* the buffers here hold exactly w */
    return layout == OB_LAYOUT_I2 ? ob_gemm_i2(w, w_bytes, n, k, x, m, ldx, acc)
                                  : ob_gemm_t1_6(w, w_bytes, n, k, x, m, ldx, acc);
}

static void fail(const char *what, const char *variant, int layout, int64_t m, int64_t k, int64_t n,
                 int threads, const char *detail) {
    g_fail++;
    if (g_fail <= 20)
        fprintf(stderr, "MISMATCH %s: variant=%s layout=%s m=%lld k=%lld n=%lld threads=%d: %s\n",
                what, variant, LAYOUT_NAME[layout], (long long)m, (long long)k, (long long)n, threads,
                detail);
}

/* acc from every variant (threads 1 and 3) must equal want (status OK) */
static void check_all(const char *what, int layout, const uint8_t *w, int64_t n, int64_t k,
                      const int8_t *x, int64_t m, int64_t ldx, const int32_t *want) {
    int32_t *acc = xmalloc((size_t)(m * n) * sizeof(int32_t));
    for (int v = 0; v < g_nvar; v++) {
        if (ob_set_isa(g_variants[v]) != OB_OK) {
            fail(what, g_variants[v], layout, m, k, n, 0, "ob_set_isa failed");
            continue;
        }
        for (int t = 1; t <= 3; t += 2) {
            ob_set_num_threads(t);
            for (int64_t i = 0; i < m * n; i++) acc[i] = (int32_t)0x5A5A5A5A; /* poison */
            int st = gemm(layout, w, n, k, x, m, ldx, acc);
            g_checks++;
            g_var_checks[v][layout]++;
            char msg[200];
            if (st != OB_OK) {
                snprintf(msg, sizeof msg, "status %d, want OB_OK", st);
                fail(what, g_variants[v], layout, m, k, n, t, msg);
                continue;
            }
            for (int64_t i = 0; i < m * n; i++)
                if (acc[i] != want[i]) {
                    snprintf(msg, sizeof msg, "acc[row %lld][col %lld] = %ld, want %ld",
                             (long long)(i / n), (long long)(i % n), (long)acc[i], (long)want[i]);
                    fail(what, g_variants[v], layout, m, k, n, t, msg);
                    break;
                }
        }
    }
    free(acc);
}

/* every variant (threads 1 and 3) must return want_st; if OB_OK, also acc == want */
static void check_status(const char *what, int layout, const uint8_t *w, int64_t n, int64_t k,
                         const int8_t *x, int64_t m, int64_t ldx, int want_st, const int32_t *want) {
    int32_t *acc = xmalloc((size_t)(m * n) * sizeof(int32_t));
    for (int v = 0; v < g_nvar; v++) {
        ob_set_isa(g_variants[v]);
        for (int t = 1; t <= 3; t += 2) {
            ob_set_num_threads(t);
            int st = gemm(layout, w, n, k, x, m, ldx, acc);
            g_checks++;
            g_var_checks[v][layout]++;
            char msg[200];
            if (st != want_st) {
                snprintf(msg, sizeof msg, "status %d, want %d", st, want_st);
                fail(what, g_variants[v], layout, m, k, n, t, msg);
            } else if (st == OB_OK && want && memcmp(acc, want, (size_t)(m * n) * sizeof(int32_t))) {
                fail(what, g_variants[v], layout, m, k, n, t, "acc differs from the reference");
            }
        }
    }
    free(acc);
}

/* codes [n, k] -> packed [n, rb] */
static uint8_t *pack(const int8_t *codes, int64_t n, int64_t k, int layout) {
    int64_t rb = ob_packed_row_bytes(k, layout);
    uint8_t *w = xmalloc((size_t)(n * rb));
    if (ob_pack(codes, n, k, k, layout, w) != OB_OK) {
        fprintf(stderr, "ob_pack failed\n");
        exit(2);
    }
    return w;
}

/* the reference's result, itself checked against a naive sum over the codes */
static int32_t *reference(const char *what, int layout, const uint8_t *w, const int8_t *codes,
                          int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx) {
    int32_t *ref = xmalloc((size_t)(m * n) * sizeof(int32_t));
    ob_set_isa("reference");
    ob_set_num_threads(1);
    int st = gemm(layout, w, n, k, x, m, ldx, ref);
    g_checks++;
    if (st != OB_OK) fail(what, "reference", layout, m, k, n, 1, "reference failed");
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            int64_t s = 0;
            for (int64_t e = 0; e < k; e++) s += (int64_t)codes[j * k + e] * x[r * ldx + e];
            if (ref[r * n + j] != (int32_t)s) {
                char msg[200];
                snprintf(msg, sizeof msg, "reference acc[%lld][%lld] = %ld, naive %lld",
                         (long long)r, (long long)j, (long)ref[r * n + j], (long long)s);
                fail(what, "reference", layout, m, k, n, 1, msg);
                r = m;
                break;
            }
        }
    return ref;
}

static void random_case(int layout, int64_t m, int64_t k, int64_t n) {
    int64_t ldx = k + (rnd_below(3) == 0 ? 0 : 1 + rnd_below(40));
    int8_t *codes = xmalloc((size_t)(n * k)), *x = xmalloc((size_t)(m * ldx));
    int sparse = (int)rnd_below(4); /* 0: uniform ternary; else biased towards one code */
    for (int64_t i = 0; i < n * k; i++)
        codes[i] = (int8_t)(sparse && rnd_below(4) ? sparse - 2 : rnd_below(3) - 1);
    for (int64_t i = 0; i < m * ldx; i++) x[i] = (int8_t)(rnd() >> 56); /* full int8 range */
    uint8_t *w = pack(codes, n, k, layout);
    int32_t *ref = reference("random", layout, w, codes, n, k, x, m, ldx);
    check_all("random", layout, w, n, k, x, m, ldx, ref);
    free(ref);
    free(w);
    free(x);
    free(codes);
}

static void extreme_case(int layout, int64_t m, int64_t k, int64_t n, int wv, int xv) {
    int8_t *codes = xmalloc((size_t)(n * k)), *x = xmalloc((size_t)(m * k));
    memset(codes, wv, (size_t)(n * k));
    memset(x, xv, (size_t)(m * k));
    uint8_t *w = pack(codes, n, k, layout);
    int32_t *ref = reference("extreme", layout, w, codes, n, k, x, m, k);
    check_all("extreme", layout, w, n, k, x, m, k, ref);
    free(ref);
    free(w);
    free(x);
    free(codes);
}

/* Each byte value 0..255 planted at a random byte (padding included) of a random row. */
static void byte_sweep(int layout, int64_t m, int64_t k, int64_t n) {
    int64_t rb = ob_packed_row_bytes(k, layout);
    int8_t *codes = xmalloc((size_t)(n * k)), *x = xmalloc((size_t)(m * k));
    for (int64_t i = 0; i < n * k; i++) codes[i] = (int8_t)(rnd_below(3) - 1);
    for (int64_t i = 0; i < m * k; i++) x[i] = (int8_t)(rnd() >> 56);
    uint8_t *w = pack(codes, n, k, layout);
    int32_t *ref = xmalloc((size_t)(m * n) * sizeof(int32_t));
    int invalid = 0;
    for (int b = 0; b < 256; b++) {
        int64_t pos = rnd_below(n) * rb + (b & 1 ? rb - 1 - rnd_below(32) : rnd_below(rb));
        uint8_t saved = w[pos];
        w[pos] = (uint8_t)b;
        ob_set_isa("reference");
        ob_set_num_threads(1);
        int st = gemm(layout, w, n, k, x, m, k, ref);
        int want_invalid = layout == OB_LAYOUT_I2 ? ((b & (b >> 1) & 0x55) != 0) : -1;
        if (st != OB_OK && st != OB_ERR_CORRUPT) fail("byte sweep", "reference", layout, m, k, n, 1, "bad status");
        if (want_invalid >= 0 && want_invalid != (st == OB_ERR_CORRUPT))
            fail("byte sweep", "reference", layout, m, k, n, 1, "i2 validity differs from the spec");
        invalid += st == OB_ERR_CORRUPT;
        check_status("byte sweep", layout, w, n, k, x, m, k, st, st == OB_OK ? ref : NULL);
        w[pos] = saved;
    }
    /* i2: bytes with some lane == 3: 256 - 3^4 = 175; t1_6: the 13 unused bytes */
    int want_count = layout == OB_LAYOUT_I2 ? 175 : 13;
    if (invalid != want_count) {
        char msg[100];
        snprintf(msg, sizeof msg, "reference rejects %d byte values, want %d", invalid, want_count);
        fail("byte sweep", "reference", layout, m, k, n, 1, msg);
    }
    free(ref);
    free(w);
    free(x);
    free(codes);
}

/* A bad byte in rows only a later thread computes (n = 64: threads get 32-column shares). */
static void corrupt_in_share(int layout, int64_t m, int64_t k) {
    const int64_t n = 64;
    int64_t rb = ob_packed_row_bytes(k, layout);
    int8_t *codes = xmalloc((size_t)(n * k)), *x = xmalloc((size_t)(m * k));
    for (int64_t i = 0; i < n * k; i++) codes[i] = (int8_t)(rnd_below(3) - 1);
    for (int64_t i = 0; i < m * k; i++) x[i] = (int8_t)(rnd() >> 56);
    uint8_t *w = pack(codes, n, k, layout);
    const int64_t rows[3] = {0, 40, 63};
    for (int i = 0; i < 3; i++) {
        int64_t pos = rows[i] * rb + (i == 2 ? rb - 1 : rnd_below(rb)); /* last: a padding byte */
        uint8_t saved = w[pos];
        w[pos] = layout == OB_LAYOUT_I2 ? (uint8_t)(saved | 0xC0) : 0xED;
        check_status("corrupt in a thread's share", layout, w, n, k, x, m, k, OB_ERR_CORRUPT, NULL);
        w[pos] = saved;
    }
    free(w);
    free(x);
    free(codes);
}

/* A buffer length (w_bytes) that is not n * row_bytes(k) -- one byte short or long, or the
 * other layout's size (a t1_6 matrix read as i2) -- is OB_ERR_BUFFER from every variant before any
 * weight byte is read: w is NULL-free but points at a 1-byte buffer, so a read would be caught by
 * ASan/valgrind, and the status must not depend on its contents. */
static void buffer_lengths(int layout) {
    const int64_t n = 3, k = 300, m = 2;
    int64_t rb = ob_packed_row_bytes(k, layout), other = ob_packed_row_bytes(k, 1 - layout);
    uint8_t one = 0x55;
    int8_t x[2 * 300] = {0};
    int32_t acc[6];
    const int64_t bad[] = {n * rb - 1, n * rb + 1, n * other, 0, -1};
    for (int v = 0; v < g_nvar; v++) {
        ob_set_isa(g_variants[v]);
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
            int st = layout == OB_LAYOUT_I2 ? ob_gemm_i2(&one, bad[i], n, k, x, m, k, acc)
                                            : ob_gemm_t1_6(&one, bad[i], n, k, x, m, k, acc);
            g_checks++;
            g_var_checks[v][layout]++;
            if (st != OB_ERR_BUFFER) {
                char msg[100];
                snprintf(msg, sizeof msg, "w_bytes %lld: status %d, want OB_ERR_BUFFER",
                         (long long)bad[i], st);
                fail("buffer length", g_variants[v], layout, m, k, n, 1, msg);
            }
        }
    }
}

/* 1 if name is an entry of the comma-separated list */
static int in_list(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return 1;
        p += len + (e != NULL);
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *expect_neon = NULL, *only = NULL, *expect_auto = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) g_rng = strtoull(argv[++i], NULL, 0) | 1;
        else if (!strcmp(argv[i], "--expect-neon") && i + 1 < argc) expect_neon = argv[++i];
        else if (!strcmp(argv[i], "--variants") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--expect-auto") && i + 1 < argc) expect_auto = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--seed N] [--expect-neon dot|base] [--variants a,b,..] "
                            "[--expect-auto NAME]\n", argv[0]);
            return 2;
        }
    }
    uint64_t seed = g_rng;
    int path_ok = 1;
    /* first use: the variant CPU detection (or ONEBIT_KERNELS) picks */
    printf("parity: auto-selected variant: %s\n", ob_isa());
    if (expect_auto && strcmp(ob_isa(), expect_auto)) {
        fprintf(stderr, "FAIL: CPU detection picked %s, expected %s\n", ob_isa(), expect_auto);
        path_ok = 0;
    }
    if (only) {
        for (const char *p = only; *p;) {
            const char *e = strchr(p, ',');
            size_t len = e ? (size_t)(e - p) : strlen(p);
            int known = 0;
            for (int i = 0; i < N_CAND; i++)
                known |= strlen(CANDIDATES[i]) == len && !strncmp(p, CANDIDATES[i], len);
            if (!known) {
                fprintf(stderr, "FAIL: --variants: unknown variant '%.*s'\n", (int)len, p);
                path_ok = 0;
            }
            p += len + (e != NULL);
        }
    }
    for (int i = 0; i < N_CAND; i++) {
        if (only && !in_list(only, CANDIDATES[i])) continue;
        if (ob_isa_supported(CANDIDATES[i])) g_variants[g_nvar++] = CANDIDATES[i];
        else if (only) {
            fprintf(stderr, "FAIL: --variants names %s, which this CPU/build does not run\n", CANDIDATES[i]);
            path_ok = 0;
        }
    }
    printf("parity: seed %#llx, variants:", (unsigned long long)seed);
    for (int v = 0; v < g_nvar; v++) printf(" %s", g_variants[v]);
    printf("\n");

#if defined(__aarch64__)
    const char *path = ob_neon_uses_dotprod() ? "dot" : "base";
    printf("parity: neon path: %s (%s)\n", path,
           !strcmp(path, "dot") ? "sdot, ARMv8.2 dotprod" : "smlal, baseline Advanced SIMD");
    if (!ob_isa_supported("neon")) {
        fprintf(stderr, "FAIL: this AArch64 build does not run the neon variant\n");
        path_ok = 0;
    }
    if (expect_neon && strcmp(expect_neon, path)) {
        fprintf(stderr, "FAIL: expected the neon %s path, got %s\n", expect_neon, path);
        path_ok = 0;
    }
#else
    if (expect_neon) {
        fprintf(stderr, "FAIL: --expect-neon on a build that is not AArch64\n");
        path_ok = 0;
    }
#endif

    static const int64_t MS[] = {1, 2, 3, 4, 5, 8, 9, 13, 17};
    static const int64_t KS[] = {1, 5, 127, 128, 129, 160, 300, 2560};
    static const int64_t NS[] = {1, 3, 16, 17, 33, 64};
    for (int layout = 0; layout < 2; layout++) {
        for (size_t a = 0; a < sizeof MS / sizeof *MS; a++)
            for (size_t b = 0; b < sizeof KS / sizeof *KS; b++)
                for (size_t c = 0; c < sizeof NS / sizeof *NS; c++) random_case(layout, MS[a], KS[b], NS[c]);
        /* extremes: row kernel (m 1, 4) and panel GEMM (m 9), k past several flush intervals */
        static const int64_t EM[] = {1, 4, 9};
        for (size_t a = 0; a < 3; a++)
            for (int wv = -1; wv <= 1; wv += 2) {
                extreme_case(layout, EM[a], 4133, 5, wv, -128);
                extreme_case(layout, EM[a], 4133, 5, wv, 127);
            }
        extreme_case(layout, 2, 70001, 3, 1, -128);
        byte_sweep(layout, 1, 300, 3);  /* row kernel, pairs of weight rows */
        byte_sweep(layout, 3, 129, 5);  /* row kernel, one weight row x 3 activation rows */
        byte_sweep(layout, 9, 300, 17); /* panel GEMM, edge panel */
        corrupt_in_share(layout, 4, 2560);
        corrupt_in_share(layout, 9, 2560);
        buffer_lengths(layout);
    }
    ob_set_isa(NULL);

    for (int v = 0; v < g_nvar; v++)
        printf("parity: %-10s i2 %5ld checks, t1_6 %5ld checks\n", g_variants[v],
               g_var_checks[v][0], g_var_checks[v][1]);
    if (g_fail || !path_ok) {
        printf("parity: FAILED: %ld of %ld checks\n", g_fail, g_checks);
        return 1;
    }
    printf("parity: OK, %ld checks passed\n", g_checks);
    return 0;
}
