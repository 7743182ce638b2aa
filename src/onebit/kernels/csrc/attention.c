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

/* ---- quantized KV rows (docs/formats.md §10) ------------------------------------------------
 * One row = hd values of one kv head at one position; b bits, h = 2^(b-1):
 *   m = max(max|x|, 1e-5); step = fp16(min(m / h, 65504)); r = 1 / (float)step;
 *   c = clamp(floor(x * r) + h, 0, 2h - 1), packed as an LSB-first bit string (ceil(hd*b/8) B);
 *   value = (c - (h - 1/2)) * step.  All float32, as onebit.quant.kv_quant_codes. */

/* IEEE binary32 -> binary16, round to nearest even (numpy's / torch's .half()), incl. subnormals,
 * overflow to inf, NaN kept NaN. */
uint16_t ob_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);      /* NaN */
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);     /* >= 65520 (or inf): inf */
    if (ax <= 0x33000000u) return (uint16_t)sign;                 /* <= 2^-25: ties to even, 0 */
    int e = (int)(ax >> 23) - 127;
    uint32_t q, rem, halfway;
    if (e < -14) { /* subnormal half: units of 2^-24, value = man * 2^(e-23) */
        uint32_t man = (ax & 0x7FFFFFu) | 0x800000u;
        int s = -(e + 1); /* 14..24 */
        q = man >> s;
        rem = man & ((1u << s) - 1);
        halfway = 1u << (s - 1);
    } else { /* rebias the exponent, drop 13 mantissa bits (a carry moves into the exponent) */
        uint32_t t = ax - ((uint32_t)(127 - 15) << 23);
        q = t >> 13;
        rem = t & 0x1FFFu;
        halfway = 0x1000u;
    }
    if (rem > halfway || (rem == halfway && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

int64_t ob_kv_row_bytes(int64_t hd, int bits) {
    if (hd < 1 || (bits != 8 && bits != 4 && bits != 3)) return 0;
    return (hd * bits + 7) / 8;
}

static void kv_quantize_row(const float *x, int64_t hd, int bits, float m, uint8_t *out,
                            uint16_t *step_out) {
    float hf = (float)(1 << (bits - 1)), top = 2.0f * hf - 1.0f;
    m = m > 1e-5f ? m : 1e-5f;
    float s = m / hf;
    s = s < 65504.0f ? s : 65504.0f;
    uint16_t hs = ob_float_to_half(s);
    float r = 1.0f / ob_half_to_float(hs);
    uint32_t acc = 0;
    int nb = 0;
    for (int64_t i = 0; i < hd; i++) {
        float c = floorf(x[i] * r) + hf;
        c = c < 0.0f ? 0.0f : (c > top ? top : c);
        acc |= (uint32_t)c << nb;
        for (nb += bits; nb >= 8; nb -= 8, acc >>= 8) *out++ = (uint8_t)acc;
    }
    if (nb) *out = (uint8_t)acc;
    *step_out = hs;
}

static void kv_dequantize_row(const uint8_t *in, uint16_t hs, int64_t hd, int bits, float *out) {
    float st = ob_half_to_float(hs), zero = (float)(1 << (bits - 1)) - 0.5f;
    uint32_t acc = 0, mask = (1u << bits) - 1;
    int nb = 0;
    for (int64_t i = 0; i < hd; i++) {
        for (; nb < bits; nb += 8) acc |= (uint32_t)*in++ << nb;
        out[i] = ((float)(acc & mask) - zero) * st;
        acc >>= bits;
        nb -= bits;
    }
}

/* max |x| of a row, or -1 if a value is NaN or inf */
static float row_absmax(const float *x, int64_t hd) {
    float m = 0.0f;
    for (int64_t i = 0; i < hd; i++) {
        float a = fabsf(x[i]);
        if (!(a <= 3.40282347e38f)) return -1.0f;
        m = a > m ? a : m;
    }
    return m;
}

int ob_kv_quantize_rows(const float *x, int64_t n, int64_t hd, int bits, uint8_t *out,
                        uint16_t *step) {
    if (!x || !out || !step) return OB_ERR_NULL;
    int64_t rb = ob_kv_row_bytes(hd, bits);
    if (n < 1 || rb < 1) return OB_ERR_SIZE;
    for (int64_t r = 0; r < n; r++) {
        float m = row_absmax(x + r * hd, hd);
        if (m < 0.0f) return OB_ERR_VALUE;
        kv_quantize_row(x + r * hd, hd, bits, m, out + r * rb, step + r);
    }
    return OB_OK;
}


/* One sequence's K (or V) cache of one layer at kv_bits 8/4/3, one block (onebit_kernels.h):
 *   steps uint16 [Hkv][cache_len] | codes uint8 [Hkv][cache_len][rb(bits)] | bits 3 only:
 *   bos uint8 [Hkv][rb(4)], the 4-bit position-0 rows (their 3-bit slots in codes stay unused). */
typedef struct {
    uint16_t *steps;
    uint8_t *codes, *bos;
    int64_t rb, rb_bos, cache_len;
    int bits;
} kv_view;

static kv_view kv_view_of(void *block, int64_t Hkv, int64_t cache_len, int64_t hd, int bits) {
    kv_view c;
    c.steps = (uint16_t *)block;
    c.codes = (uint8_t *)block + Hkv * cache_len * 2;
    c.rb = ob_kv_row_bytes(hd, bits);
    c.rb_bos = ob_kv_row_bytes(hd, 4);
    c.bos = c.codes + Hkv * cache_len * c.rb;
    c.cache_len = cache_len;
    c.bits = bits;
    return c;
}

int64_t ob_kv_cache_bytes(int64_t Hkv, int64_t cache_len, int64_t hd, int bits) {
    if (Hkv < 1 || cache_len < 1 || hd < 1) return 0;
    if (bits == 0 || bits == 32) return Hkv * cache_len * hd * 4;
    int64_t rb = ob_kv_row_bytes(hd, bits);
    if (!rb) return 0;
    return Hkv * cache_len * (2 + rb) + (bits == 3 ? Hkv * ob_kv_row_bytes(hd, 4) : 0);
}

/* row (h, p) of a quantized cache: write x (kv_get_any reads it) */
static void kv_put(const kv_view *c, int64_t h, int64_t p, const float *x, float m, int64_t hd) {
    uint16_t *st = c->steps + h * c->cache_len + p;
    if (p == 0 && c->bits == 3) kv_quantize_row(x, hd, 4, m, c->bos + h * c->rb_bos, st);
    else kv_quantize_row(x, hd, c->bits, m, c->codes + (h * c->cache_len + p) * c->rb, st);
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
#define FMA_ATTR __attribute__((target("avx2,fma,f16c")))

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
                                             int64_t n, int64_t hd, float *y, int64_t ldy,
                                             int acc_in) { /* acc_in: add to y, don't overwrite */
    for (int64_t c = 0; c < hd; c += 64) {
        int64_t w = hd - c < 64 ? hd - c : 64;
        for (int64_t j0 = 0; j0 < n; j0 += 32) {
            int64_t j1 = j0 + 32 < n ? j0 + 32 : n;
            for (int64_t h = 0; h < g; h++) {
                float *yh = y + h * ldy + c;
                const float *ph = p + h * S;
                __m256 acc[8];
                for (int i = 0; i < 8; i++)
                    acc[i] = 8 * i < w && (j0 || acc_in) ? _mm256_loadu_ps(yh + 8 * i) : _mm256_setzero_ps();
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


/* the 8 codes of values i..i+7 of a row (hd % 8 == 0) minus the zero point z = 2^(bits-1) - 1/2,
 * as floats (exact: small integers minus a half), not yet times the row's step. 8 codes are 8
 * bytes (8-bit), one 32-bit word (4-bit) or 3 bytes (3-bit, LSB first), broadcast and shifted
 * lane by lane (vpsrlvd). */
FMA_ATTR static inline __attribute__((always_inline)) __m256 kv_codes8_avx2(const uint8_t *in, int64_t i, int64_t hd, int bits) {
    __m256i c;
    if (bits == 8) {
        c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(in + i)));
    } else if (bits == 4) {
        uint32_t w;
        memcpy(&w, in + i / 2, 4);
        c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)w),
                                               _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                             _mm256_set1_epi32(15));
    } else {
        const uint8_t *b = in + i / 8 * 3;
        uint32_t w;
        if (i + 8 < hd) memcpy(&w, b, 4); /* 4 bytes where the row goes on */
        else w = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
        c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)w),
                                               _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
                             _mm256_set1_epi32(7));
    }
    return _mm256_sub_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps((float)(1 << (bits - 1)) - 0.5f));
}

/* kv_codes8_avx2 for values i..i+7 with more of the row after them (i + 8 < hd): a 3-bit group
 * loads 4 bytes without the end-of-row test */
FMA_ATTR static inline __attribute__((always_inline)) __m256 kv_codes8_mid_avx2(const uint8_t *in,
                                                                               int64_t i, int bits) {
    return kv_codes8_avx2(in, i, i + 16, bits);
}

/* kv_dequantize_row for hd % 8 == 0, 8 values per step, bit-identical to it (the same float32
 * subtract and multiply per value) */
FMA_ATTR static void kv_dequantize_row_avx2(const uint8_t *in, uint16_t hs, int64_t hd, int bits,
                                            float *out) {
    const __m256 st = _mm256_set1_ps(_cvtsh_ss(hs));
    for (int64_t i = 0; i < hd; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(kv_codes8_avx2(in, i, hd, bits), st));
}

/* 4 horizontal sums in one vector: lane l = sum of a[l] */
FMA_ATTR static inline __m128 hsum4_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Scores straight from a quantized K cache, without dequantizing rows first: for keys at cache
 * positions p0..p0+n-1 of kv head kvh (none of them the 3-bit cache's 4-bit row 0) and query
 * heads h < gs,  sc[h * S + j] = (q_h . (c_j - z)) * step_j * scale  (value = (c - z) * step).
 * Each key's codes are unpacked once per 4 heads; two keys per pass. */
FMA_ATTR static inline __attribute__((always_inline)) void
scores_quant_bits(const kv_view *c, int64_t kvh, int64_t p0, int64_t n, const float *q, int64_t gs,
                  int64_t hd, float scale, float *sc, int64_t S, const int bits) {
    const int64_t rb = c->rb;
    const uint8_t *rows = c->codes + (kvh * c->cache_len + p0) * rb;
    const uint16_t *steps = c->steps + kvh * c->cache_len + p0;
    for (int64_t j = 0; j < n; j += 2) {
        int two = j + 1 < n;
        const uint8_t *r0 = rows + j * rb, *r1 = two ? r0 + rb : r0;
        float st0 = _cvtsh_ss(steps[j]) * scale, st1 = two ? _cvtsh_ss(steps[j + 1]) * scale : 0.0f;
        for (int64_t h0 = 0; h0 < gs; h0 += 4) {
            int64_t nh = gs - h0 < 4 ? gs - h0 : 4;
            __m256 a[4][2];
            for (int k = 0; k < 4; k++) a[k][0] = a[k][1] = _mm256_setzero_ps();
            if (nh == 4) { /* named accumulators, fixed trip counts: all 8 stay in registers */
                const float *q0 = q + h0 * hd;
                __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00,
                       s21 = s00, s30 = s00, s31 = s00;
#define SQ_STEP(c0, c1, i)                                                                         \
    do {                                                                                           \
        __m256 q_ = _mm256_loadu_ps(q0 + (i));                                                     \
        s00 = _mm256_fmadd_ps(q_, c0, s00), s01 = _mm256_fmadd_ps(q_, c1, s01);                    \
        q_ = _mm256_loadu_ps(q0 + hd + (i));                                                       \
        s10 = _mm256_fmadd_ps(q_, c0, s10), s11 = _mm256_fmadd_ps(q_, c1, s11);                    \
        q_ = _mm256_loadu_ps(q0 + 2 * hd + (i));                                                   \
        s20 = _mm256_fmadd_ps(q_, c0, s20), s21 = _mm256_fmadd_ps(q_, c1, s21);                    \
        q_ = _mm256_loadu_ps(q0 + 3 * hd + (i));                                                   \
        s30 = _mm256_fmadd_ps(q_, c0, s30), s31 = _mm256_fmadd_ps(q_, c1, s31);                    \
    } while (0)
                int64_t i = 0;
                for (; i + 8 < hd; i += 8) {
                    __m256 c0 = kv_codes8_mid_avx2(r0, i, bits), c1 = kv_codes8_mid_avx2(r1, i, bits);
                    SQ_STEP(c0, c1, i);
                }
                __m256 c0 = kv_codes8_avx2(r0, i, hd, bits), c1 = kv_codes8_avx2(r1, i, hd, bits);
                SQ_STEP(c0, c1, i);
#undef SQ_STEP
                a[0][0] = s00, a[0][1] = s01, a[1][0] = s10, a[1][1] = s11;
                a[2][0] = s20, a[2][1] = s21, a[3][0] = s30, a[3][1] = s31;
            } else {
                for (int64_t i = 0; i < hd; i += 8) {
                    __m256 c0 = kv_codes8_avx2(r0, i, hd, bits), c1 = kv_codes8_avx2(r1, i, hd, bits);
                    for (int k = 0; k < nh; k++) {
                        __m256 qv = _mm256_loadu_ps(q + (h0 + k) * hd + i);
                        a[k][0] = _mm256_fmadd_ps(qv, c0, a[k][0]);
                        a[k][1] = _mm256_fmadd_ps(qv, c1, a[k][1]);
                    }
                }
            }
            float d0[4], d1[4];
            _mm_storeu_ps(d0, hsum4_avx2(a[0][0], a[1][0], a[2][0], a[3][0]));
            _mm_storeu_ps(d1, hsum4_avx2(a[0][1], a[1][1], a[2][1], a[3][1]));
            for (int k = 0; k < nh; k++) {
                sc[(h0 + k) * S + j] = d0[k] * st0;
                if (two) sc[(h0 + k) * S + j + 1] = d1[k] * st1;
            }
        }
    }
}

/* scores_quant_bits with the bit width a constant (no per-chunk branch on it) */
FMA_ATTR static void scores_quant_avx2(const kv_view *c, int64_t kvh, int64_t p0, int64_t n,
                                       const float *q, int64_t gs, int64_t hd, float scale,
                                       float *sc, int64_t S) {
    if (c->bits == 8) scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 8);
    else if (c->bits == 4) scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 4);
    else scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 3);
}

/* y[h * ldy + 0:hd] += sum_j p[h * S + j] * value_j for values at cache positions p0..p0+n-1 of
 * kv head kvh (not the 3-bit cache's 4-bit row 0), straight from the codes: with
 * value = (c - z) * step that is  sum_j w_j (c_j - z),  w_j = p_j * step_j (written over p). Rows
 * go in blocks that stay in L1; 16 output values x 4 heads of accumulators per pass. */
#define WSQ_ROWS 256
FMA_ATTR static inline __attribute__((always_inline)) void
weighted_sum_quant_bits(const kv_view *c, int64_t kvh, int64_t p0, int64_t n, float *p, int64_t gs,
                        int64_t S, int64_t hd, float *y, int64_t ldy, const int bits) {
    const int64_t rb = c->rb;
    const uint8_t *rows = c->codes + (kvh * c->cache_len + p0) * rb;
    const uint16_t *steps = c->steps + kvh * c->cache_len + p0;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) { /* 8 fp16 steps at a time (exact conversion) */
        __m256 st = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(steps + j)));
        for (int64_t h = 0; h < gs; h++)
            _mm256_storeu_ps(p + h * S + j, _mm256_mul_ps(_mm256_loadu_ps(p + h * S + j), st));
    }
    for (; j < n; j++)
        for (int64_t h = 0; h < gs; h++) p[h * S + j] *= _cvtsh_ss(steps[j]);
    for (int64_t j0 = 0; j0 < n; j0 += WSQ_ROWS) {
        int64_t j1 = j0 + WSQ_ROWS < n ? j0 + WSQ_ROWS : n;
        for (int64_t h0 = 0; h0 < gs; h0 += 4) {
            int64_t nh = gs - h0 < 4 ? gs - h0 : 4;
            for (int64_t d = 0; d < hd; d += 16) {
                int wide = d + 16 <= hd; /* else the last 8 values */
                __m256 a[4][2];
                for (int k = 0; k < 4; k++) a[k][0] = a[k][1] = _mm256_setzero_ps();
                const float *w0 = p + h0 * S;
                if (nh == 4 && d + 16 < hd) { /* named accumulators: all 8 in registers */
                    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00,
                           s21 = s00, s30 = s00, s31 = s00;
                    for (int64_t j = j0; j < j1; j++) {
                        const uint8_t *r = rows + j * rb;
                        __m256 c0 = kv_codes8_mid_avx2(r, d, bits), c1 = kv_codes8_mid_avx2(r, d + 8, bits);
                        __m256 wv = _mm256_broadcast_ss(w0 + j);
                        s00 = _mm256_fmadd_ps(wv, c0, s00), s01 = _mm256_fmadd_ps(wv, c1, s01);
                        wv = _mm256_broadcast_ss(w0 + S + j);
                        s10 = _mm256_fmadd_ps(wv, c0, s10), s11 = _mm256_fmadd_ps(wv, c1, s11);
                        wv = _mm256_broadcast_ss(w0 + 2 * S + j);
                        s20 = _mm256_fmadd_ps(wv, c0, s20), s21 = _mm256_fmadd_ps(wv, c1, s21);
                        wv = _mm256_broadcast_ss(w0 + 3 * S + j);
                        s30 = _mm256_fmadd_ps(wv, c0, s30), s31 = _mm256_fmadd_ps(wv, c1, s31);
                    }
                    a[0][0] = s00, a[0][1] = s01, a[1][0] = s10, a[1][1] = s11;
                    a[2][0] = s20, a[2][1] = s21, a[3][0] = s30, a[3][1] = s31;
                } else {
                    for (int64_t j = j0; j < j1; j++) {
                        const uint8_t *r = rows + j * rb;
                        __m256 c0 = kv_codes8_avx2(r, d, hd, bits);
                        __m256 c1 = wide ? kv_codes8_avx2(r, d + 8, hd, bits) : _mm256_setzero_ps();
                        for (int k = 0; k < nh; k++) {
                            __m256 wv = _mm256_broadcast_ss(w0 + k * S + j);
                            a[k][0] = _mm256_fmadd_ps(wv, c0, a[k][0]);
                            a[k][1] = _mm256_fmadd_ps(wv, c1, a[k][1]);
                        }
                    }
                }
                for (int k = 0; k < nh; k++) {
                    float *yh = y + (h0 + k) * ldy + d;
                    _mm256_storeu_ps(yh, _mm256_add_ps(_mm256_loadu_ps(yh), a[k][0]));
                    if (wide) _mm256_storeu_ps(yh + 8, _mm256_add_ps(_mm256_loadu_ps(yh + 8), a[k][1]));
                }
            }
        }
    }
}

/* weighted_sum_quant_bits with the bit width a constant */
FMA_ATTR static void weighted_sum_quant_avx2(const kv_view *c, int64_t kvh, int64_t p0, int64_t n,
                                             float *p, int64_t gs, int64_t S, int64_t hd, float *y,
                                             int64_t ldy) {
    if (c->bits == 8) weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, ldy, 8);
    else if (c->bits == 4) weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, ldy, 4);
    else weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, ldy, 3);
}

/* ob_expf_nonpos on 8 lanes: the same operations in the same order (mul, then add: no FMA), so
 * every value equals the scalar one; lanes below -87 give 0. */
FMA_ATTR static __m256 expf_nonpos_avx2(__m256 x) {
    __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                             _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), y);
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
        __m256 e = expf_nonpos_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mxv));
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


/* explicit AVX2/FMA loops: where the CPU has them and ONEBIT_KERNELS is not "reference" */
static int attn_simd(void) {
#ifdef OB_ATTN_AVX2
    return strcmp(ob_isa(), "reference") != 0 && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* kv_dequantize_row, with the AVX2 unpacking where it applies (same floats) */
static void kv_dequantize_row_any(const uint8_t *in, uint16_t hs, int64_t hd, int bits, float *out,
                                  int simd) {
#ifdef OB_ATTN_AVX2
    if (simd && hd % 8 == 0) {
        kv_dequantize_row_avx2(in, hs, hd, bits, out);
        return;
    }
#endif
    (void)simd;
    kv_dequantize_row(in, hs, hd, bits, out);
}

/* row (h, p) of a quantized cache into out (kv_get) */
static void kv_get_any(const kv_view *c, int64_t h, int64_t p, int64_t hd, float *out, int simd) {
    uint16_t st = c->steps[h * c->cache_len + p];
    if (p == 0 && c->bits == 3) kv_dequantize_row_any(c->bos + h * c->rb_bos, st, hd, 4, out, simd);
    else kv_dequantize_row_any(c->codes + (h * c->cache_len + p) * c->rb, st, hd, c->bits, out, simd);
}

int ob_kv_dequantize_rows(const uint8_t *in, const uint16_t *step, int64_t n, int64_t hd, int bits,
                          float *out) {
    if (!in || !step || !out) return OB_ERR_NULL;
    int64_t rb = ob_kv_row_bytes(hd, bits);
    if (n < 1 || rb < 1) return OB_ERR_SIZE;
    int simd = attn_simd();
    for (int64_t r = 0; r < n; r++) kv_dequantize_row_any(in + r * rb, step[r], hd, bits, out + r * hd, simd);
    return OB_OK;
}


typedef struct {
    const float *q;          /* [T, H, hd], rotated */
    const float *ck, *cv;    /* [Hkv, cache_len, hd] (bits 32) */
    kv_view qk, qv;          /* the quantized caches (bits 8/4/3) */
    int bits;                /* 32: float32 caches */
    int64_t T, pos, H, Hkv, hd, cache_len;
    float *y;                /* [T, H * hd] */
    int simd;                /* explicit AVX2/FMA loops (not with ONEBIT_KERNELS=reference) */
    int64_t group;           /* query heads per work item: H/Hkv (share the KV reads), or 1 */
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

/* keys [j0, j1) of one work item over the quantized caches: rows are dequantized KV_BLOCK at a
 * time into kb / vb (exactly quant.dequantize_kv's floats), then the float32 loops run on them.
 * y[h] = sum_j e^(s_j - mx[h]) v_j (not yet divided by sum[h]). */
static void attn_quantized(const attn_job_t *J, const float *q, int64_t kvh, int64_t j0, int64_t j1,
                           float *sc, float *kb, float *y, int64_t ldy, float *mx, float *sum,
                           float scale) {
    int64_t gs = J->group, S = J->pos + J->T, hd = J->hd, n = j1 - j0;
    float *vb = kb + KV_BLOCK * hd;
    int64_t k0 = 0; /* keys scored straight from the codes (AVX2), all but a 3-bit row 0 */
#ifdef OB_ATTN_AVX2
    if (J->simd && hd % 8 == 0) {
        k0 = n;
        int64_t bos = j0 == 0 && J->bits == 3; /* the 4-bit row 0: dequantized as below */
        scores_quant_avx2(&J->qk, kvh, j0 + bos, n - bos, q, gs, hd, scale, sc + bos, S);
        if (bos) {
            kv_get_any(&J->qk, kvh, 0, hd, kb, 1);
            scores_group_avx2(q, gs, kb, 1, hd, scale, sc, S);
        }
    }
#endif
    for (int64_t b0 = 0; b0 < n - k0; b0 += KV_BLOCK) { /* the rest: dequantize, then float loops */
        int64_t nb = n - b0 < KV_BLOCK ? n - b0 : KV_BLOCK;
        for (int64_t j = 0; j < nb; j++) kv_get_any(&J->qk, kvh, j0 + b0 + j, hd, kb + j * hd, J->simd);
        for (int64_t h = 0; h < gs; h++)
            for (int64_t j = 0; j < nb; j++) sc[h * S + b0 + j] = dot(q + h * hd, kb + j * hd, hd) * scale;
    }
    for (int64_t h = 0; h < gs; h++) sum[h] = softmax_partial(sc + h * S, n, mx + h, J->simd);
    for (int64_t h = 0; h < gs; h++) memset(y + h * ldy, 0, (size_t)hd * sizeof(float));
#ifdef OB_ATTN_AVX2
    if (J->simd && hd % 8 == 0) { /* straight from the codes; a 3-bit row 0 dequantized */
        int64_t bos = j0 == 0 && J->bits == 3;
        if (bos) {
            kv_get_any(&J->qv, kvh, 0, hd, vb, 1);
            for (int64_t h = 0; h < gs; h++) axpy(y + h * ldy, sc[h * S], vb, hd);
        }
        weighted_sum_quant_avx2(&J->qv, kvh, j0 + bos, n - bos, sc + bos, gs, S, hd, y, ldy);
        return;
    }
#endif
    for (int64_t b0 = 0; b0 < n; b0 += KV_BLOCK) {
        int64_t nb = n - b0 < KV_BLOCK ? n - b0 : KV_BLOCK;
        for (int64_t j = 0; j < nb; j++) kv_get_any(&J->qv, kvh, j0 + b0 + j, hd, vb + j * hd, J->simd);
#ifdef OB_ATTN_AVX2
        if (J->simd && hd % 8 == 0) {
            weighted_sum_group_avx2(sc + b0, gs, S, vb, nb, hd, y, ldy, 1);
            continue;
        }
#endif
        for (int64_t h = 0; h < gs; h++)
            for (int64_t j = 0; j < nb; j++) axpy(y + h * ldy, sc[h * S + b0 + j], vb + j * hd, hd);
    }
}

/* keys [j0, j1) of one work item over float32 caches (K, V: this kv head's rows), as above */
static void attn_float(const attn_job_t *J, const float *q, const float *K, const float *V,
                       int64_t j0, int64_t j1, float *sc, float *y, int64_t ldy, float *mx,
                       float *sum, float scale) {
    int64_t gs = J->group, S = J->pos + J->T, hd = J->hd, n = j1 - j0;
    K += j0 * hd;
    V += j0 * hd;
#ifdef OB_ATTN_AVX2
    if (J->simd && hd % 8 == 0) {
        scores_group_avx2(q, gs, K, n, hd, scale, sc, S);
        for (int64_t h = 0; h < gs; h++) sum[h] = softmax_partial(sc + h * S, n, mx + h, 1);
        weighted_sum_group_avx2(sc, gs, S, V, n, hd, y, ldy, 0);
        return;
    }
#endif
    for (int64_t h = 0; h < gs; h++) {
        float *sh = sc + h * S, *yh = y + h * ldy;
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
    /* work item = (token, gs heads of one kv head, key range c of NC) */
    for (int64_t w = t; w < J->T * nb * NC; w += nt) {
        int64_t c = w % NC, tok = w / NC / nb, h0 = (w / NC % nb) * gs, kvh = h0 / g;
        int64_t n = J->pos + tok + 1, j0 = n * c / NC, j1 = n * (c + 1) / NC;
        const float *q = J->q + (tok * J->H + h0) * hd;
        float mx[OB_ATTN_MAX_GROUP], sum[OB_ATTN_MAX_GROUP], *y, *pm, *ps;
        int64_t ldy;
        if (NC > 1) { /* partial results: [gs][hd] y, then gs maxima, gs sums */
            y = J->part + w * gs * (hd + 2);
            ldy = hd;
            pm = y + gs * hd;
            ps = pm + gs;
        } else {
            y = J->y + tok * J->H * hd + h0 * hd;
            ldy = hd;
            pm = mx;
            ps = sum;
        }
        if (j1 <= j0) { /* an empty key range (n < NC): contributes nothing */
            for (int64_t h = 0; h < gs; h++) pm[h] = -INFINITY, ps[h] = 0.0f;
            memset(y, 0, (size_t)(gs * hd) * sizeof(float));
            continue;
        }
        if (J->bits != 32)
            attn_quantized(J, q, kvh, j0, j1, sc, sc + gs * S, y, ldy, pm, ps, scale);
        else
            attn_float(J, q, J->ck + kvh * J->cache_len * hd, J->cv + kvh * J->cache_len * hd, j0, j1,
                       sc, y, ldy, pm, ps, scale);
        if (NC == 1)
            for (int64_t h = 0; h < gs; h++) {
                float inv = 1.0f / ps[h];
                for (int64_t i = 0; i < hd; i++) y[h * ldy + i] *= inv;
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
                    wgt[c] = l > 0.0f ? ob_expf_nonpos(pc[gs * hd + h] - M) : 0.0f;
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
    if (!q || !k || !v || !rope_cos || !rope_sin || !cache_k || !cache_v || !y) return OB_ERR_NULL;
    if (T < 1 || pos < 0 || H < 1 || Hkv < 1 || H % Hkv || hd < 2 || hd % 2) return OB_ERR_SIZE;
    if (pos + T > cache_len || pos + T > rope_len) return OB_ERR_SIZE;
    int bits = kv_bits == 0 ? 32 : kv_bits;
    if (bits != 32 && bits != 8 && bits != 4 && bits != 3) return OB_ERR_SIZE;
    kv_view qk = {0}, qv = {0};
    if (bits != 32) {
        qk = kv_view_of(cache_k, Hkv, cache_len, hd, bits);
        qv = kv_view_of(cache_v, Hkv, cache_len, hd, bits);
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
            float mk = row_absmax(kr, hd), mv = row_absmax(vr, hd);
            if (mk < 0.0f || mv < 0.0f) return OB_ERR_VALUE;
            kv_put(&qk, h, pos + t, kr, mk, hd);
            kv_put(&qv, h, pos + t, vr, mv, hd);
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
    /* split the keys when there are too few work items for the threads (decode with few kv
     * heads), keeping >= 256 keys per range */
    int64_t items = T * (H / group), nchunk = 1;
    if (items < 4 * (int64_t)nt) {
        nchunk = (4 * (int64_t)nt + items - 1) / items;
        int64_t most = (pos + 1) / 256;
        nchunk = nchunk < most ? nchunk : most;
        nchunk = nchunk < OB_ATTN_MAX_CHUNK ? nchunk : OB_ATTN_MAX_CHUNK;
        nchunk = nchunk > 1 ? nchunk : 1;
    }
    int64_t stride = group * (pos + T) + (bits == 32 ? 0 : 2 * KV_BLOCK * hd);
    size_t part = nchunk > 1 ? (size_t)(items * nchunk * group * (hd + 2)) : 0;
    float *scratch = (float *)malloc(((size_t)nt * (size_t)stride + part) * sizeof(float));
    if (!scratch) return OB_ERR_NOMEM;
    int simd = attn_simd();
    attn_job_t J = {q, ck, cv, qk, qv, bits, T, pos, H, Hkv, hd, cache_len, y, simd, group, nchunk,
                    scratch + (size_t)nt * (size_t)stride, scratch, stride};
    ob_parallel(attn_task, &J, nt);
    if (nchunk > 1) attn_combine(&J);
    free(scratch);
    return OB_OK;
}
