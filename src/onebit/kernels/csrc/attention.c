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
 * AVX2/FMA/F16C and hd % 8 == 0, scores, softmax and the weighted sum of values use explicit AVX2
 * loops, over quantized caches straight from the codes; otherwise the plain loops below (both
 * checked against a float64 oracle). Heads sharing a kv head form one work item; a decode step
 * with few items splits its keys into ranges combined at the end (split-K). docs/kernels.md. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define OB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OB_CLONES
#endif

#define OB_ATTN_MAX_GROUP 64 /* query heads sharing one kv head in a work item, at most */

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

#ifdef OB_ATTN_AVX2
#include <immintrin.h>
#define FMA_ATTR OB_ATTN_TARGET

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
    for (; j < n; j++) { /* the 4-key pass's reduction tree, so a key's score does not depend on
                          * whether it falls in a block of 4 or in the tail (a prefill's query
                          * block scores more keys than its first rows keep): the same floats
                          * at any chunking of a prompt */
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(K + j * hd + i), a);
        __m256 h = _mm256_hadd_ps(a, a);
        h = _mm256_hadd_ps(h, h); /* lane 0: (a0 + a1) + (a2 + a3); lane 4: (a4 + a5) + (a6 + a7) */
        __m128 r = _mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        sc[j] = _mm_cvtss_f32(r) * scale;
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
                                             int64_t n, int64_t hd, float *y) { /* y [g][hd] */
    for (int64_t c = 0; c < hd; c += 64) {
        int64_t w = hd - c < 64 ? hd - c : 64;
        for (int64_t j0 = 0; j0 < n; j0 += 32) {
            int64_t j1 = j0 + 32 < n ? j0 + 32 : n;
            for (int64_t h = 0; h < g; h++) {
                float *yh = y + h * hd + c;
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


/* the numerators of a softmax (softmax_partial) with 8 lanes: max and exp as the scalar loop
 * (the same values), the sum in 8 partial sums (equal within float rounding) */
FMA_ATTR static float softmax_partial_avx2(float *sc, int64_t n, float *mx_out) {
    float mx = -INFINITY, sum = 0.0f;
    int64_t n8 = n / 8 * 8, j;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (j = 0; j < n8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sc + j));
    float m8[8];
    _mm256_storeu_ps(m8, mv);
    for (int l = 0; l < 8; l++) mx = m8[l] > mx ? m8[l] : mx;
    for (; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    __m256 mxv = _mm256_set1_ps(mx), sv = _mm256_setzero_ps();
    for (j = 0; j < n8; j += 8) {
        __m256 e = ob_expf_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mxv));
        _mm256_storeu_ps(sc + j, e);
        sv = _mm256_add_ps(sv, e);
    }
    float s8[8];
    _mm256_storeu_ps(s8, sv);
    for (int l = 0; l < 8; l++) sum += s8[l];
    for (; j < n; j++) sum += sc[j] = ob_expf_nonpos(sc[j] - mx);
    *mx_out = mx;
    return sum;
}

#endif

typedef struct {
    const float *q;          /* [T, H, hd], rotated */
    const float *ck, *cv;    /* [Hkv, cache_len, hd] (bits 32) */
    ob_kv_view qk, qv;       /* the compact caches (bits 16/8/4/3) */
    int bits;                /* 32: float32 caches */
    int64_t T, pos, H, Hkv, hd, cache_len;
    float *y;                /* [T, H * hd] */
    int simd;                /* explicit AVX2/FMA loops (not with ONEBIT_KERNELS=reference) */
    int64_t group;           /* query heads per work item: H/Hkv (share the KV reads), or 1 */
    int64_t rows;            /* query tokens per work item: 1, or ATTN_QB (float32 prefill) */
    int64_t nchunk;          /* key ranges per (token, head group): > 1 splits a decode step's
                              * few items so every thread gets work (split-K) */
    float *part;             /* nchunk > 1: [items][group][hd + 2] partial y, max, sum */
    float *scratch;          /* [nt][stride]: scores [group][pos + T], then (quantized) 2 x
                              * [KV_BLOCK][hd] dequantized K and V rows */
    int64_t stride;
} attn_job_t;

/* the numerators of a softmax over sc[0:n]: sc[j] = exp(sc[j] - max); returns the sum, *mx the
 * max (the caller divides, after adding up the key ranges of a split) */
static float softmax_partial(float *sc, int64_t n, float *mx_out, int simd) {
    float mx = -INFINITY, sum = 0.0f;
#ifdef OB_ATTN_AVX2
    if (simd) return softmax_partial_avx2(sc, n, mx_out);
#endif
    (void)simd;
    for (int64_t j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    for (int64_t j = 0; j < n; j++) sum += sc[j] = ob_expf_nonpos(sc[j] - mx);
    *mx_out = mx;
    return sum;
}

#define KV_BLOCK 64 /* cache rows dequantized at a time */
#define OB_ATTN_MAX_CHUNK 16 /* key ranges of a split, at most */

/* keys [j0, j1) of one work item over the quantized caches, y[h] = sum_j e^(s_j - mx[h]) v_j (not
 * yet divided by sum[h]). AVX2 (hd % 8 == 0): scores and values straight from the codes (kv.c),
 * the 3-bit cache's 4-bit row 0 dequantized; otherwise rows are dequantized KV_BLOCK at a time
 * into kb / vb (exactly quant.dequantize_kv's floats) and the plain float loops run on them. */
static void attn_quantized(const attn_job_t *J, const float *q, int64_t kvh, int64_t j0, int64_t j1,
                           float *sc, float *kb, float *y, float *mx, float *sum, float scale) {
    int64_t gs = J->group, S = J->pos + J->T, hd = J->hd, n = j1 - j0;
    float *vb = kb + KV_BLOCK * hd;
    for (int64_t h = 0; h < gs; h++) memset(y + h * hd, 0, (size_t)hd * sizeof(float));
#ifdef OB_ATTN_AVX2
    if (J->simd && hd % 8 == 0) {
        int64_t bos = j0 == 0 && J->bits == 3;
        ob_kv_scores_avx2(&J->qk, kvh, j0 + bos, n - bos, q, gs, hd, scale, sc + bos, S);
        if (bos) {
            ob_kv_get(&J->qk, kvh, 0, hd, kb, 1);
            scores_group_avx2(q, gs, kb, 1, hd, scale, sc, S);
        }
        for (int64_t h = 0; h < gs; h++) sum[h] = softmax_partial(sc + h * S, n, mx + h, 1);
        if (bos) {
            ob_kv_get(&J->qv, kvh, 0, hd, vb, 1);
            for (int64_t h = 0; h < gs; h++) axpy(y + h * hd, sc[h * S], vb, hd);
        }
        ob_kv_weighted_sum_avx2(&J->qv, kvh, j0 + bos, n - bos, sc + bos, gs, S, hd, y);
        return;
    }
#endif
    for (int64_t b0 = 0; b0 < n; b0 += KV_BLOCK) {
        int64_t nb = n - b0 < KV_BLOCK ? n - b0 : KV_BLOCK;
        for (int64_t j = 0; j < nb; j++) ob_kv_get(&J->qk, kvh, j0 + b0 + j, hd, kb + j * hd, 0);
        for (int64_t h = 0; h < gs; h++)
            for (int64_t j = 0; j < nb; j++) sc[h * S + b0 + j] = dot(q + h * hd, kb + j * hd, hd) * scale;
    }
    for (int64_t h = 0; h < gs; h++) sum[h] = softmax_partial(sc + h * S, n, mx + h, J->simd);
    for (int64_t b0 = 0; b0 < n; b0 += KV_BLOCK) {
        int64_t nb = n - b0 < KV_BLOCK ? n - b0 : KV_BLOCK;
        for (int64_t j = 0; j < nb; j++) ob_kv_get(&J->qv, kvh, j0 + b0 + j, hd, vb + j * hd, 0);
        for (int64_t h = 0; h < gs; h++)
            for (int64_t j = 0; j < nb; j++) axpy(y + h * hd, sc[h * S + b0 + j], vb + j * hd, hd);
    }
}

#define ATTN_QB 4 /* query tokens per work item of a float32 prefill (attn_float_block) */

#ifdef OB_ATTN_AVX2
/* A prefill over float32 caches (AVX2): the R query tokens t0..t0+R-1 with the gs heads of kv
 * head kvh in one work item, so each 4 K rows and each 32 V rows are read once from memory for
 * all R * gs queries and reused from L1 (one token per item re-read the whole cache for every
 * token: the prefill's attention was bound by those reads). Query row i = r * gs + h, gathered
 * into qb; row i scores keys 0..nmax-1 with the others, then keeps its causal 0..pos+t0+r (the
 * 0-3 keys past it get weight 0). The output rows are scaled by 1/sum as attn_task does. */
FMA_ATTR static void attn_float_block(const attn_job_t *J, int64_t t0, int64_t R, int64_t h0,
                                      int64_t kvh, float *sc, float scale) {
    int64_t gs = J->group, hd = J->hd, S = J->pos + J->T, G = R * gs, nmax = J->pos + t0 + R;
    float *qb = sc + ATTN_QB * gs * S, *yb = qb + ATTN_QB * gs * hd, sum[ATTN_QB * OB_ATTN_MAX_GROUP];
    for (int64_t r = 0; r < R; r++)
        memcpy(qb + r * gs * hd, J->q + ((t0 + r) * J->H + h0) * hd, (size_t)(gs * hd) * sizeof(float));
    const float *K = J->ck + kvh * J->cache_len * hd, *V = J->cv + kvh * J->cache_len * hd;
    scores_group_avx2(qb, G, K, nmax, hd, scale, sc, S);
    for (int64_t i = 0; i < G; i++) {
        int64_t n = J->pos + t0 + i / gs + 1;
        float mx;
        sum[i] = softmax_partial_avx2(sc + i * S, n, &mx);
        for (int64_t j = n; j < nmax; j++) sc[i * S + j] = 0.0f;
    }
    weighted_sum_group_avx2(sc, G, S, V, nmax, hd, yb);
    for (int64_t i = 0; i < G; i++) {
        float *y = J->y + ((t0 + i / gs) * J->H + h0 + i % gs) * hd, inv = 1.0f / sum[i];
        for (int64_t d = 0; d < hd; d++) y[d] = yb[i * hd + d] * inv;
    }
}
#endif

/* keys [j0, j1) of one work item over float32 caches (K, V: this kv head's rows), as above */
static void attn_float(const attn_job_t *J, const float *q, const float *K, const float *V,
                       int64_t j0, int64_t j1, float *sc, float *y, float *mx, float *sum,
                       float scale) {
    int64_t gs = J->group, S = J->pos + J->T, hd = J->hd, n = j1 - j0;
    K += j0 * hd;
    V += j0 * hd;
#ifdef OB_ATTN_AVX2
    if (J->simd && hd % 8 == 0) {
        scores_group_avx2(q, gs, K, n, hd, scale, sc, S);
        for (int64_t h = 0; h < gs; h++) sum[h] = softmax_partial(sc + h * S, n, mx + h, 1);
        weighted_sum_group_avx2(sc, gs, S, V, n, hd, y);
        return;
    }
#endif
    for (int64_t h = 0; h < gs; h++) {
        float *sh = sc + h * S, *yh = y + h * hd;
        for (int64_t j = 0; j < n; j++) sh[j] = dot(q + h * hd, K + j * hd, hd) * scale;
        sum[h] = softmax_partial(sh, n, mx + h, J->simd);
        memset(yh, 0, (size_t)hd * sizeof(float));
        for (int64_t j = 0; j < n; j++) axpy(yh, sh[j], V + j * hd, hd);
    }
}

static void attn_task(void *ctx, int t, int nt) {
    attn_job_t *J = (attn_job_t *)ctx;
    int64_t g = J->H / J->Hkv, gs = J->group, S = J->pos + J->T, hd = J->hd, nb = J->H / gs;
    int64_t NC = J->nchunk;
    float *sc = J->scratch + (int64_t)t * J->stride; /* [gs][S] */
    float scale = 1.0f / sqrtf((float)hd);
#ifdef OB_ATTN_AVX2
    if (J->rows > 1) { /* work item = (ATTN_QB tokens, gs heads of one kv head) */
        for (int64_t w = t; w < (J->T + ATTN_QB - 1) / ATTN_QB * nb; w += nt) {
            int64_t t0 = w / nb * ATTN_QB, h0 = w % nb * gs;
            attn_float_block(J, t0, J->T - t0 < ATTN_QB ? J->T - t0 : ATTN_QB, h0, h0 / g, sc, scale);
        }
        return;
    }
#endif
    /* work item = (token, gs heads of one kv head, key range c of NC) */
    for (int64_t w = t; w < J->T * nb * NC; w += nt) {
        int64_t c = w % NC, tok = w / NC / nb, h0 = (w / NC % nb) * gs, kvh = h0 / g;
        int64_t n = J->pos + tok + 1, j0 = n * c / NC, j1 = n * (c + 1) / NC;
        const float *q = J->q + (tok * J->H + h0) * hd;
        float mx[OB_ATTN_MAX_GROUP], sum[OB_ATTN_MAX_GROUP], *y, *pm, *ps;
        if (NC > 1) { /* partial results: [gs][hd] y, then gs maxima, gs sums */
            y = J->part + w * gs * (hd + 2);
            pm = y + gs * hd;
            ps = pm + gs;
        } else { /* the output rows of these heads */
            y = J->y + tok * J->H * hd + h0 * hd;
            pm = mx;
            ps = sum;
        }
        /* j1 > j0: ranges hold >= 256 keys (ob_attention_kv picks NC <= (pos + 1) / 256) */
        if (J->bits != 32)
            attn_quantized(J, q, kvh, j0, j1, sc, sc + gs * S, y, pm, ps, scale);
        else
            attn_float(J, q, J->ck + kvh * J->cache_len * hd, J->cv + kvh * J->cache_len * hd, j0, j1,
                       sc, y, pm, ps, scale);
        if (NC == 1)
            for (int64_t h = 0; h < gs; h++) {
                float inv = 1.0f / ps[h];
                for (int64_t i = 0; i < hd; i++) y[h * hd + i] *= inv;
            }
    }
}

/* y of every (token, head) from the NC key ranges: sum_c e^(m_c - M) y_c / sum_c e^(m_c - M) l_c */
static void attn_combine(const attn_job_t *J) {
    int64_t gs = J->group, hd = J->hd, nb = J->H / gs, NC = J->nchunk;
    for (int64_t tok = 0; tok < J->T; tok++)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t h = 0; h < gs; h++) {
                const float *p0 = J->part + (tok * nb + b) * NC * gs * (hd + 2);
                float M = -INFINITY, L = 0.0f, wgt[OB_ATTN_MAX_CHUNK];
                for (int64_t c = 0; c < NC; c++) {
                    float m = p0[c * gs * (hd + 2) + gs * hd + h];
                    M = m > M ? m : M;
                }
                for (int64_t c = 0; c < NC; c++) {
                    const float *pc = p0 + c * gs * (hd + 2);
                    float l = pc[gs * hd + gs + h];
                    wgt[c] = ob_expf_nonpos(pc[gs * hd + h] - M);
                    L += wgt[c] * l;
                }
                float *y = J->y + tok * J->H * hd + (b * gs + h) * hd;
                for (int64_t i = 0; i < hd; i++) {
                    float a = 0.0f;
                    for (int64_t c = 0; c < NC; c++) a += wgt[c] * p0[c * gs * (hd + 2) + h * hd + i];
                    y[i] = a / L;
                }
            }
}

int ob_attention(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H, int64_t Hkv,
                 int64_t hd, const float *rope_cos, const float *rope_sin, int64_t rope_len,
                 float *cache_k, float *cache_v, int64_t cache_len, float *y) {
    return ob_attention_kv(q, k, v, T, pos, H, Hkv, hd, rope_cos, rope_sin, rope_len, 32, cache_k,
                           cache_v, cache_len, y);
}

int ob_attention_kv(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H,
                    int64_t Hkv, int64_t hd, const float *rope_cos, const float *rope_sin,
                    int64_t rope_len, int kv_bits, void *cache_k, void *cache_v, int64_t cache_len,
                    float *y) {
    return ob_attention_kv_split(q, k, v, T, pos, H, Hkv, hd, rope_cos, rope_sin, rope_len, kv_bits,
                                 cache_k, cache_v, cache_len, y, 1);
}

int ob_attention_kv_split(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H,
                          int64_t Hkv, int64_t hd, const float *rope_cos, const float *rope_sin,
                          int64_t rope_len, int kv_bits, void *cache_k, void *cache_v,
                          int64_t cache_len, float *y, int allow_split) {
    if (!q || !k || !v || !rope_cos || !rope_sin || !cache_k || !cache_v || !y) return OB_ERR_NULL;
    if (T < 1 || pos < 0 || H < 1 || Hkv < 1 || H % Hkv || hd < 2 || hd % 2) return OB_ERR_SIZE;
    if (pos + T > cache_len || pos + T > rope_len) return OB_ERR_SIZE;
    int bits = kv_bits == 0 ? 32 : kv_bits;
    if (bits != 32 && bits != 16 && bits != 8 && bits != 4 && bits != 3) return OB_ERR_SIZE;
    ob_kv_view qk = {0}, qv = {0};
    if (bits != 32) {
        qk = ob_kv_view_of(cache_k, Hkv, cache_len, hd, bits);
        qv = ob_kv_view_of(cache_v, Hkv, cache_len, hd, bits);
    }
    float *ck = (float *)cache_k, *cv = (float *)cache_v;
    int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *cs = rope_cos + (pos + t) * half, *sn = rope_sin + (pos + t) * half;
        rope_rows(q + t * H * hd, H, hd, cs, sn);
        rope_rows(k + t * Hkv * hd, Hkv, hd, cs, sn);
        for (int64_t h = 0; h < Hkv; h++) {
            const float *kr = k + (t * Hkv + h) * hd, *vr = v + (t * Hkv + h) * hd;
            if (bits == 32) {
                memcpy(ck + (h * cache_len + pos + t) * hd, kr, (size_t)hd * 4);
                memcpy(cv + (h * cache_len + pos + t) * hd, vr, (size_t)hd * 4);
                continue;
            }
            float mk = ob_kv_row_absmax(kr, hd), mv = ob_kv_row_absmax(vr, hd);
            if (mk < 0.0f || mv < 0.0f) return OB_ERR_VALUE;
            ob_kv_put(&qk, h, pos + t, kr, mk, hd);
            ob_kv_put(&qv, h, pos + t, vr, mv, hd);
        }
    }
    int64_t work = T * H * (pos + T) * hd, want = work / (1 << 14);
    int nt = want < 1 ? 1 : (want > 256 ? 256 : (int)want);
    if (nt > ob_get_num_threads()) nt = ob_get_num_threads();
    /* group the heads of a KV head (each K/V row read once for all of them) when there are
     * enough items to balance the threads, or when the context is long enough that reading the
     * cache H/Hkv times costs more than an uneven split */
    int64_t group = (T * Hkv >= 4 * (int64_t)nt || pos + T >= 256) && H / Hkv <= OB_ATTN_MAX_GROUP
                        ? H / Hkv : 1;
    int simd = ob_kv_simd();
    /* a float32 prefill with enough (token block, head group) items: blocks of ATTN_QB tokens */
    int64_t rows = bits == 32 && simd && hd % 8 == 0 && T > 1 &&
                           (T + ATTN_QB - 1) / ATTN_QB * (H / group) >= 4 * (int64_t)nt
                       ? ATTN_QB : 1;
    /* split the keys when there are too few work items for the threads (decode with few kv
     * heads), keeping >= 256 keys per range */
    int64_t items = T * (H / group), nchunk = 1;
    if (allow_split && rows == 1 && items < 4 * (int64_t)nt) {
        nchunk = (4 * (int64_t)nt + items - 1) / items;
        int64_t most = (pos + 1) / 256;
        nchunk = nchunk < most ? nchunk : most;
        nchunk = nchunk < OB_ATTN_MAX_CHUNK ? nchunk : OB_ATTN_MAX_CHUNK;
        nchunk = nchunk > 1 ? nchunk : 1;
    }
    int64_t stride = rows > 1 ? ATTN_QB * group * (pos + T + 2 * hd) /* scores, qb, yb */
                              : group * (pos + T) + (bits == 32 ? 0 : 2 * KV_BLOCK * hd);
    size_t part = nchunk > 1 ? (size_t)(items * nchunk * group * (hd + 2)) : 0;
    float *scratch = (float *)malloc(((size_t)nt * (size_t)stride + part) * sizeof(float));
    if (!scratch) return OB_ERR_NOMEM;
    attn_job_t J = {q, ck, cv, qk, qv, bits, T, pos, H, Hkv, hd, cache_len, y, simd, group, rows,
                    nchunk, scratch + (size_t)nt * (size_t)stride, scratch, stride};
    ob_parallel(attn_task, &J, nt);
    if (nchunk > 1) attn_combine(&J);
    free(scratch);
    return OB_OK;
}
