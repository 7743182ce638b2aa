/* The compact KV cache (kv_bits 16 = IEEE float16, 8/4/3 quantized): its rows (docs/formats.md §10), written and read by
 * ob_attention_kv, and the AVX2 loops that read them inside attention (scores and weighted sums
 * straight from the codes, bit widths as compile-time constants). The scalar row functions are
 * the spec; tests/test_kv_engine.py pins them against onebit.quant byte for byte and the
 * attention over them against a float64 oracle. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

#ifdef OB_ATTN_AVX2
#include <immintrin.h>
#define FMA_ATTR OB_ATTN_TARGET
#endif

/* ---- quantized KV rows (docs/formats.md §10) ------------------------------------------------
 * One row = hd values of one kv head at one position; b bits, h = 2^(b-1):
 *   m = max(max|x|, 1e-5); step = fp16(min(m / h, 65504)); r = 1 / (float)step;
 *   c = clamp(floor(x * r) + h, 0, 2h - 1), packed as an LSB-first bit string (ceil(hd*b/8) B);
 *   value = (c - (h - 1/2)) * step.  All float32, as onebit.quant.kv_quant_codes.
 * kv_bits 16: the hd values as IEEE float16 (round to nearest even, saturating at +-65504: a
 * finite value stays finite), 2*hd bytes, little-endian; the step is 1.0 and there is no zero
 * point, so that every width shares the readers below. A 16-bit cache block holds no steps
 * (ob_kv_view_of): it is exactly the float16 cache of llama.cpp, 2 bytes per value. */

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
    if (hd < 1 || (bits != 16 && bits != 8 && bits != 4 && bits != 3)) return 0;
    return (hd * bits + 7) / 8;
}

static void kv_quantize_row(const float *x, int64_t hd, int bits, float m, uint8_t *out,
                            uint16_t *step_out) {
    if (bits == 16) {
        for (int64_t i = 0; i < hd; i++) {
            float v = x[i] > 65504.0f ? 65504.0f : (x[i] < -65504.0f ? -65504.0f : x[i]);
            uint16_t h = ob_float_to_half(v);
            out[2 * i] = (uint8_t)h, out[2 * i + 1] = (uint8_t)(h >> 8);
        }
        *step_out = 0x3C00u; /* 1.0 */
        return;
    }
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
    if (bits == 16) { /* the step is 1.0 */
        for (int64_t i = 0; i < hd; i++) out[i] = ob_half_to_float((uint16_t)(in[2 * i] | in[2 * i + 1] << 8));
        return;
    }
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
float ob_kv_row_absmax(const float *x, int64_t hd) {
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
        float m = ob_kv_row_absmax(x + r * hd, hd);
        if (m < 0.0f) return OB_ERR_VALUE;
        kv_quantize_row(x + r * hd, hd, bits, m, out + r * rb, step + r);
    }
    return OB_OK;
}

/* the block layout: ob_kv_view in internal.h (also onebit_kernels.h) */
ob_kv_view ob_kv_view_of(void *block, int64_t Hkv, int64_t cache_len, int64_t hd, int bits) {
    ob_kv_view c;
    c.steps = bits == 16 ? NULL : (uint16_t *)block;
    c.codes = (uint8_t *)block + (bits == 16 ? 0 : Hkv * cache_len * 2);
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
    if (bits == 16) return Hkv * cache_len * hd * 2;
    int64_t rb = ob_kv_row_bytes(hd, bits);
    if (!rb) return 0;
    return Hkv * cache_len * (2 + rb) + (bits == 3 ? Hkv * ob_kv_row_bytes(hd, 4) : 0);
}

/* row (h, p) of a quantized cache: write x (ob_kv_get reads it) */
void ob_kv_put(const ob_kv_view *c, int64_t h, int64_t p, const float *x, float m, int64_t hd) {
    uint16_t one, *st = c->steps ? c->steps + h * c->cache_len + p : &one; /* 16-bit: no steps */
    if (p == 0 && c->bits == 3) kv_quantize_row(x, hd, 4, m, c->bos + h * c->rb_bos, st);
    else kv_quantize_row(x, hd, c->bits, m, c->codes + (h * c->cache_len + p) * c->rb, st);
}

#ifdef OB_ATTN_AVX2

/* the 8 codes of values i..i+7 of a row (hd % 8 == 0) minus the zero point z = 2^(bits-1) - 1/2,
 * as floats (exact: small integers minus a half), not yet times the row's step. 8 codes are 8
 * bytes (8-bit), one 32-bit word (4-bit) or 3 bytes (3-bit, LSB first), broadcast and shifted
 * lane by lane (vpsrlvd); at 16 bits, 8 float16 values converted exactly (vcvtph2ps). */
FMA_ATTR static inline __attribute__((always_inline)) __m256 kv_codes8_avx2(const uint8_t *in, int64_t i, int64_t hd, int bits) {
    __m256i c;
    if (bits == 16) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + 2 * i)));
    } else if (bits == 8) {
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
scores_quant_bits(const ob_kv_view *c, int64_t kvh, int64_t p0, int64_t n, const float *q, int64_t gs,
                  int64_t hd, float scale, float *sc, int64_t S, const int bits) {
    const int64_t rb = c->rb;
    const uint8_t *rows = c->codes + (kvh * c->cache_len + p0) * rb;
    const uint16_t *steps = c->steps ? c->steps + kvh * c->cache_len + p0 : NULL; /* 16-bit: none */
    for (int64_t j = 0; j < n; j += 2) {
        int two = j + 1 < n;
        const uint8_t *r0 = rows + j * rb, *r1 = two ? r0 + rb : r0;
        float st0 = bits == 16 ? scale : _cvtsh_ss(steps[j]) * scale;
        float st1 = !two ? 0.0f : (bits == 16 ? scale : _cvtsh_ss(steps[j + 1]) * scale);
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
FMA_ATTR void ob_kv_scores_avx2(const ob_kv_view *c, int64_t kvh, int64_t p0, int64_t n,
                                       const float *q, int64_t gs, int64_t hd, float scale,
                                       float *sc, int64_t S) {
    if (c->bits == 16) scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 16);
    else if (c->bits == 8) scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 8);
    else if (c->bits == 4) scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 4);
    else scores_quant_bits(c, kvh, p0, n, q, gs, hd, scale, sc, S, 3);
}

/* y[h * hd + 0:hd] += sum_j p[h * S + j] * value_j for values at cache positions p0..p0+n-1 of
 * kv head kvh (not the 3-bit cache's 4-bit row 0), straight from the codes: with
 * value = (c - z) * step that is  sum_j w_j (c_j - z),  w_j = p_j * step_j (written over p). Rows
 * go in blocks that stay in L1; 16 output values x 4 heads of accumulators per pass. */
#define WSQ_ROWS 256
FMA_ATTR static inline __attribute__((always_inline)) void
weighted_sum_quant_bits(const ob_kv_view *c, int64_t kvh, int64_t p0, int64_t n, float *p, int64_t gs,
                        int64_t S, int64_t hd, float *y, const int bits) {
    const int64_t rb = c->rb;
    const uint8_t *rows = c->codes + (kvh * c->cache_len + p0) * rb;
    const uint16_t *steps = c->steps ? c->steps + kvh * c->cache_len + p0 : NULL; /* 16-bit: none */
    int64_t j = bits == 16 ? n : 0; /* 16-bit rows: no steps (1.0) */
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
                    float *yh = y + (h0 + k) * hd + d;
                    _mm256_storeu_ps(yh, _mm256_add_ps(_mm256_loadu_ps(yh), a[k][0]));
                    if (wide) _mm256_storeu_ps(yh + 8, _mm256_add_ps(_mm256_loadu_ps(yh + 8), a[k][1]));
                }
            }
        }
    }
}

/* weighted_sum_quant_bits with the bit width a constant */
FMA_ATTR void ob_kv_weighted_sum_avx2(const ob_kv_view *c, int64_t kvh, int64_t p0, int64_t n,
                                             float *p, int64_t gs, int64_t S, int64_t hd, float *y) {
    if (c->bits == 16) weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, 16);
    else if (c->bits == 8) weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, 8);
    else if (c->bits == 4) weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, 4);
    else weighted_sum_quant_bits(c, kvh, p0, n, p, gs, S, hd, y, 3);
}

#endif

/* the explicit AVX2/FMA/F16C loops of kv.c and attention.c: where the CPU has them and
 * ONEBIT_KERNELS is not "reference" */
int ob_kv_simd(void) {
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

/* row (h, p) of a quantized cache, dequantized into out (the AVX2 unpacking where simd) */
void ob_kv_get(const ob_kv_view *c, int64_t h, int64_t p, int64_t hd, float *out, int simd) {
    uint16_t st = c->steps ? c->steps[h * c->cache_len + p] : 0x3C00u; /* 16-bit: 1.0 */
    if (p == 0 && c->bits == 3) kv_dequantize_row_any(c->bos + h * c->rb_bos, st, hd, 4, out, simd);
    else kv_dequantize_row_any(c->codes + (h * c->cache_len + p) * c->rb, st, hd, c->bits, out, simd);
}

int ob_kv_dequantize_rows(const uint8_t *in, const uint16_t *step, int64_t n, int64_t hd, int bits,
                          float *out) {
    if (!in || !step || !out) return OB_ERR_NULL;
    int64_t rb = ob_kv_row_bytes(hd, bits);
    if (n < 1 || rb < 1) return OB_ERR_SIZE;
    int simd = ob_kv_simd();
    for (int64_t r = 0; r < n; r++) kv_dequantize_row_any(in + r * rb, step[r], hd, bits, out + r * hd, simd);
    return OB_OK;
}
