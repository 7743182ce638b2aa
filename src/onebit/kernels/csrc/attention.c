/* Attention for the engine's decoder layer, float32: RoPE, KV-cache write, causal GQA softmax.
 *
 * One call per layer replaces a dozen numpy operations (the per-token Python overhead). Plain C
 * loops written to auto-vectorize; on x86-64 Linux GCC also builds an AVX2 clone of the hot
 * loops, picked at load time (target_clones), so the build still needs no -march. Heads are
 * split over the kernel thread pool. The math is the PyTorch model's (model.py), in float32:
 *   rope:    x[i] * cos[i] + (-x[i + hd/2]) * sin[i],  x[i + hd/2] * cos[i] + x[i] * sin[i]
 *   scores:  (q . k_j) * (1/sqrt(hd)) for keys j <= pos + t;  softmax with the max subtracted;
 *   y:       sum_j p_j v_j
 * exp is a Cephes-style polynomial (max rel. error ~2 ulp), so results equal PyTorch's within
 * float tolerance, not bit for bit (PyTorch's own kernels sum in another order). On x86 with
 * FMA and hd % 8 == 0, scores (4 keys per pass) and the weighted sum of values use explicit AVX2
 * FMA loops; otherwise the plain loops below (both checked against a float64 oracle). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define OB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OB_CLONES
#endif

/* expf for x <= 0 (softmax after max subtraction); exp(-inf) = 0. Range reduction by ln 2. */
static inline float ob_expf_nonpos(float x) {
    if (x < -87.0f) return 0.0f;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } u = {p};
    u.i += (int32_t)n << 23;
    return u.f;
}

OB_CLONES static void rope_rows(float *x, int64_t rows, int64_t hd, const float *cs, const float *sn) {
    int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++) {
        float *v = x + r * hd;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cs[i] + (-b) * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

OB_CLONES static float dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) s[l] += a[i + l] * b[i + l];
    float t = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

OB_CLONES static void axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OB_ATTN_AVX2 1
#define FMA_ATTR __attribute__((target("avx2,fma")))

/* scores[j] = (q . K[j]) * scale for j < n, four keys per pass (hd % 8 == 0). */
FMA_ATTR static void scores_avx2(const float *q, const float *K, int64_t n, int64_t hd, float scale,
                                 float *sc) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = K + j * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + hd + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * hd + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * hd + i), a3);
        }
        __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
        __m256 h = _mm256_hadd_ps(h01, h23); /* lanes: 0 1 2 3 | 0 1 2 3 (per 128-bit half) */
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(sc + j, _mm_mul_ps(r, _mm_set1_ps(scale)));
    }
    for (; j < n; j++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(K + j * hd + i), a);
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        sc[j] = _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps(r, r, 1))) * scale;
    }
}

/* The g query heads that share one KV head, together: each block of 4 keys is loaded once from
 * memory and reused from L1 by every head (GQA: a quarter of the KV traffic for 2B4T's g = 4).
 * sc[h * S + j] for head h. */
FMA_ATTR static void scores_group_avx2(const float *q, int64_t g, const float *K, int64_t n,
                                       int64_t hd, float scale, float *sc, int64_t S) {
    int64_t n4 = n / 4 * 4;
    for (int64_t j = 0; j < n4; j += 4)
        for (int64_t h = 0; h < g; h++) scores_avx2(q + h * hd, K + j * hd, 4, hd, scale, sc + h * S + j);
    if (n4 < n)
        for (int64_t h = 0; h < g; h++)
            scores_avx2(q + h * hd, K + n4 * hd, n - n4, hd, scale, sc + h * S + n4);
}

/* y_h[0:hd] = sum_j p_h[j] V[j] for the g heads: blocks of 32 value rows (8 KiB at hd = 64-wide
 * chunks) stay in L1 while every head accumulates them. */
FMA_ATTR static void weighted_sum_group_avx2(const float *p, int64_t g, int64_t S, const float *V,
                                             int64_t n, int64_t hd, float *y, int64_t ldy) {
    for (int64_t c = 0; c < hd; c += 64) {
        int64_t w = hd - c < 64 ? hd - c : 64;
        for (int64_t j0 = 0; j0 < n; j0 += 32) {
            int64_t j1 = j0 + 32 < n ? j0 + 32 : n;
            for (int64_t h = 0; h < g; h++) {
                float *yh = y + h * ldy + c;
                const float *ph = p + h * S;
                __m256 acc[8];
                for (int i = 0; i < 8; i++)
                    acc[i] = 8 * i < w && j0 ? _mm256_loadu_ps(yh + 8 * i) : _mm256_setzero_ps();
                for (int64_t j = j0; j < j1; j++) {
                    __m256 pj = _mm256_set1_ps(ph[j]);
                    const float *v = V + j * hd + c;
                    for (int i = 0; i < 8; i++)
                        if (8 * i < w) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * i), acc[i]);
                }
                for (int i = 0; i < 8; i++)
                    if (8 * i < w) _mm256_storeu_ps(yh + 8 * i, acc[i]);
            }
        }
    }
}

#endif

typedef struct {
    const float *q;          /* [T, H, hd], rotated */
    const float *ck, *cv;    /* [Hkv, cache_len, hd] */
    int64_t T, pos, H, Hkv, hd, cache_len;
    float *y;                /* [T, H * hd] */
    int simd;                /* explicit AVX2/FMA loops (not with ONEBIT_KERNELS=reference) */
    int64_t group;           /* query heads per work item: H/Hkv (share the KV reads), or 1 */
    float *scratch;          /* [nt][pos + T] scores per thread */
} attn_job_t;

static void softmax_row(float *sc, int64_t n) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    for (int64_t j = 0; j < n; j++) {
        sc[j] = ob_expf_nonpos(sc[j] - mx);
        sum += sc[j];
    }
    float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; j++) sc[j] *= inv;
}

static void attn_task(void *ctx, int t, int nt) {
    attn_job_t *J = (attn_job_t *)ctx;
    int64_t g = J->H / J->Hkv, gs = J->group, S = J->pos + J->T, hd = J->hd, nb = J->H / gs;
    float *sc = J->scratch + (int64_t)t * gs * S; /* [gs][S] */
    float scale = 1.0f / sqrtf((float)hd);
    for (int64_t w = t; w < J->T * nb; w += nt) { /* work item = (token, gs heads of one kv head) */
        int64_t tok = w / nb, h0 = (w % nb) * gs, kvh = h0 / g, n = J->pos + tok + 1;
        const float *q = J->q + (tok * J->H + h0) * hd;
        const float *K = J->ck + kvh * J->cache_len * hd, *V = J->cv + kvh * J->cache_len * hd;
        float *y = J->y + tok * J->H * hd + h0 * hd;
#ifdef OB_ATTN_AVX2
        if (J->simd && hd % 8 == 0) {
            scores_group_avx2(q, gs, K, n, hd, scale, sc, S);
            for (int64_t h = 0; h < gs; h++) softmax_row(sc + h * S, n);
            weighted_sum_group_avx2(sc, gs, S, V, n, hd, y, hd);
            continue;
        }
#endif
        for (int64_t h = 0; h < gs; h++) {
            float *sh = sc + h * S, *yh = y + h * hd;
            for (int64_t j = 0; j < n; j++) sh[j] = dot(q + h * hd, K + j * hd, hd) * scale;
            softmax_row(sh, n);
            memset(yh, 0, (size_t)hd * sizeof(float));
            for (int64_t j = 0; j < n; j++) axpy(yh, sh[j], V + j * hd, hd);
        }
    }
}

int ob_attention(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H, int64_t Hkv,
                 int64_t hd, const float *rope_cos, const float *rope_sin, int64_t rope_len,
                 float *cache_k, float *cache_v, int64_t cache_len, float *y) {
    if (!q || !k || !v || !rope_cos || !rope_sin || !cache_k || !cache_v || !y) return OB_ERR_NULL;
    if (T < 1 || pos < 0 || H < 1 || Hkv < 1 || H % Hkv || hd < 2 || hd % 2) return OB_ERR_SIZE;
    if (pos + T > cache_len || pos + T > rope_len) return OB_ERR_SIZE;
    int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *cs = rope_cos + (pos + t) * half, *sn = rope_sin + (pos + t) * half;
        rope_rows(q + t * H * hd, H, hd, cs, sn);
        rope_rows(k + t * Hkv * hd, Hkv, hd, cs, sn);
        for (int64_t h = 0; h < Hkv; h++) {
            memcpy(cache_k + (h * cache_len + pos + t) * hd, k + (t * Hkv + h) * hd, (size_t)hd * 4);
            memcpy(cache_v + (h * cache_len + pos + t) * hd, v + (t * Hkv + h) * hd, (size_t)hd * 4);
        }
    }
    int64_t work = T * H * (pos + T) * hd, want = work / (1 << 14);
    int nt = want < 1 ? 1 : (want > 256 ? 256 : (int)want);
    if (nt > ob_get_num_threads()) nt = ob_get_num_threads();
    /* group the heads of a KV head (each K/V row read once for all of them) when there are
     * enough items to balance the threads, or when the context is long enough that reading the
     * cache H/Hkv times costs more than an uneven split */
    int64_t group = T * Hkv >= 4 * (int64_t)nt || pos + T >= 256 ? H / Hkv : 1;
    float *scratch = (float *)malloc((size_t)nt * (size_t)group * (size_t)(pos + T) * sizeof(float));
    if (!scratch) return OB_ERR_NOMEM;
    int simd = 0;
#ifdef OB_ATTN_AVX2
    simd = strcmp(ob_isa(), "reference") != 0 && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
#endif
    attn_job_t J = {q, cache_k, cache_v, T, pos, H, Hkv, hd, cache_len, y, simd, group, scratch};
    ob_parallel(attn_task, &J, nt);
    free(scratch);
    return OB_OK;
}
