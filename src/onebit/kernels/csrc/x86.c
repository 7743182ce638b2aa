/* x86 SIMD variants: AVX2 (vpmaddubsw) and AVX-512 VNNI (vpdpbusd on 256-bit vectors).
 *
 * Both use  sum_e (c_e - 1) * x_e = sum_e c_e * x_e - sum_e x_e  with the stored code c in {0,1,2}
 * as the unsigned operand and the int8 activation as the signed one, so no sign trick is needed;
 * sum x is computed once per activation row. A 32-byte block load gives one vector of 32
 * consecutive codes per lane (docs/formats.md §1). Activations are copied once into zero-padded
 * rows of padded_k bytes, so padding weights meet x = 0 and the block loop has no tail.
 * Compiled without -march: each function carries its own target attribute. */
#include "internal.h"

#ifdef OB_HAVE_X86
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define TILE 4 /* activation rows sharing one decode of a weight block */

/* xp [m, kp] zero-padded copy of x, xsum [m] = sum of each row. Caller frees *xp. */
static int pad_x(const int8_t *x, int64_t m, int64_t k, int64_t ldx, int64_t kp, int8_t **xp,
                 int32_t **xsum) {
    *xp = (int8_t *)calloc((size_t)(m * kp), 1);
    *xsum = (int32_t *)malloc((size_t)m * sizeof(int32_t));
    if (!*xp || !*xsum) {
        free(*xp);
        free(*xsum);
        return OB_ERR_NOMEM;
    }
    for (int64_t r = 0; r < m; r++) {
        int32_t s = 0;
        for (int64_t e = 0; e < k; e++) s += x[r * ldx + e];
        memcpy(*xp + r * kp, x + r * ldx, (size_t)k);
        (*xsum)[r] = s;
    }
    return OB_OK;
}

static inline AVX2 int32_t hsum_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* i2: lane j of byte m is (byte >> 2j) & 3. Shifts are 16-bit; the 0x03 mask drops bits that
 * crossed from the neighbour byte. bad |= lanes holding code 3 (both bits set). */
#define I2_DECODE(v, c, bad)                                                          \
    do {                                                                              \
        const __m256i m3_ = _mm256_set1_epi8(3);                                      \
        c[0] = _mm256_and_si256(v, m3_);                                              \
        c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3_);                        \
        c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3_);                        \
        c[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3_);                        \
        bad = _mm256_or_si256(bad, _mm256_and_si256(                                  \
            _mm256_and_si256(v, _mm256_srli_epi16(v, 1)), _mm256_set1_epi8(0x55)));   \
    } while (0)

/* t1_6: digit j = (b_j * 3) >> 8 with b_j = byte * 3^j mod 256 (byte-wise adds wrap mod 256);
 * (b*3) >> 8 = (b > 85) + (b > 170), unsigned compares done as signed after flipping bit 7.
 * bad |= bytes among the 13 unused values: bitmap lookup, bit (hi & 7) of table[hi >> 3][lo]. */
#define T16_DECODE(v, c, bad)                                                                    \
    do {                                                                                         \
        const __m256i flip_ = _mm256_set1_epi8((char)0x80);                                     \
        const __m256i t85_ = _mm256_set1_epi8(85 - 128), t170_ = _mm256_set1_epi8(170 - 128);   \
        __m256i b_ = v;                                                                          \
        for (int j_ = 0; j_ < 5; j_++) {                                                         \
            __m256i f_ = _mm256_xor_si256(b_, flip_);                                            \
            __m256i s_ = _mm256_add_epi8(_mm256_cmpgt_epi8(f_, t85_), _mm256_cmpgt_epi8(f_, t170_)); \
            c[j_] = _mm256_sub_epi8(_mm256_setzero_si256(), s_);                                 \
            b_ = _mm256_add_epi8(_mm256_add_epi8(b_, b_), b_);                                   \
        }                                                                                        \
        const __m256i tlo_ = _mm256_setr_epi8(0, 1, 0, 64, 2, 0, 0, (char)128, 4, 0, 0, 0, 8, 0, 0, 16, \
                                              0, 1, 0, 64, 2, 0, 0, (char)128, 4, 0, 0, 0, 8, 0, 0, 16); \
        const __m256i thi_ = _mm256_setr_epi8(0, 0, 8, 0, 0, 16, 0, 0, 0, 32, 1, 0, 0, 64, 2, 0,  \
                                              0, 0, 8, 0, 0, 16, 0, 0, 0, 32, 1, 0, 0, 64, 2, 0); \
        const __m256i bits_ = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, (char)128, 0, 0, 0, 0, 0, 0, 0, 0, \
                                               1, 2, 4, 8, 16, 32, 64, (char)128, 0, 0, 0, 0, 0, 0, 0, 0); \
        const __m256i m15_ = _mm256_set1_epi8(15);                                               \
        __m256i lo_ = _mm256_and_si256(v, m15_);                                                 \
        __m256i hi_ = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15_);                           \
        __m256i up_ = _mm256_cmpgt_epi8(hi_, _mm256_set1_epi8(7));                               \
        __m256i row_ = _mm256_blendv_epi8(_mm256_shuffle_epi8(tlo_, lo_),                        \
                                          _mm256_shuffle_epi8(thi_, lo_), up_);                  \
        __m256i bit_ = _mm256_shuffle_epi8(bits_, _mm256_and_si256(hi_, _mm256_set1_epi8(7)));   \
        bad = _mm256_or_si256(bad, _mm256_and_si256(row_, bit_));                                \
    } while (0)

/* One weight row against R (<= TILE) activation rows. DOT(acc, c, x) adds sum c*x to int32 lanes. */
#define DEFINE_ROW_KERNEL(NAME, ATTR, DECODE, LANES, BLOCK, DOT)                                 \
    static inline ATTR __attribute__((always_inline)) void NAME(                                 \
        const uint8_t *wr, int64_t nblk, const int8_t *xp, int64_t kp, const int32_t *xsum,      \
        int R, int32_t *out, int64_t ldo, __m256i *bad) {                                        \
        __m256i acc[TILE];                                                                       \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();                             \
        for (int64_t b = 0; b < nblk; b++) {                                                     \
            __m256i v = _mm256_loadu_si256((const __m256i *)(wr + b * OB_BLOCK_BYTES));          \
            __m256i c[LANES];                                                                    \
            DECODE(v, c, *bad);                                                                  \
            for (int r = 0; r < R; r++) {                                                        \
                const int8_t *xb = xp + r * kp + b * BLOCK;                                      \
                for (int j = 0; j < LANES; j++)                                                  \
                    DOT(acc[r], c[j], _mm256_loadu_si256((const __m256i *)(xb + 32 * j)));       \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R; r++) out[r * ldo] = hsum_avx2(acc[r]) - xsum[r];                  \
    }

/* AVX2: u8 x s8 -> int16 pairs (|.| <= 2*2*128, no saturation) -> int32 via madd with ones */
#define DOT_AVX2(acc, c, x) \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)))
#define DOT_VNNI(acc, c, x) acc = _mm256_dpbusd_epi32(acc, c, x)

DEFINE_ROW_KERNEL(row_i2_avx2, AVX2, I2_DECODE, 4, OB_I2_BLOCK, DOT_AVX2)
DEFINE_ROW_KERNEL(row_t16_avx2, AVX2, T16_DECODE, 5, OB_T1_6_BLOCK, DOT_AVX2)
DEFINE_ROW_KERNEL(row_i2_vnni, VNNI, I2_DECODE, 4, OB_I2_BLOCK, DOT_VNNI)
DEFINE_ROW_KERNEL(row_t16_vnni, VNNI, T16_DECODE, 5, OB_T1_6_BLOCK, DOT_VNNI)

/* GEMM driver: tiles of TILE activation rows; the row kernel is specialised per tile height. */
#define DEFINE_GEMM(NAME, ATTR, ROW, LAYOUT, BLOCK)                                              \
    ATTR int NAME(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,            \
                  int64_t ldx, int32_t *acc) {                                                   \
        int64_t rb = ob_packed_row_bytes(k, LAYOUT), nblk = rb / OB_BLOCK_BYTES;                 \
        int64_t kp = nblk * BLOCK;                                                               \
        int8_t *xp;                                                                              \
        int32_t *xsum;                                                                           \
        int st = pad_x(x, m, k, ldx, kp, &xp, &xsum);                                            \
        if (st) return st;                                                                       \
        __m256i bad = _mm256_setzero_si256();                                                    \
        for (int64_t r0 = 0; r0 < m; r0 += TILE) {                                               \
            int R = (int)(m - r0 < TILE ? m - r0 : TILE);                                        \
            const int8_t *xt = xp + r0 * kp;                                                     \
            for (int64_t j = 0; j < n; j++) {                                                    \
                int32_t *o = acc + r0 * n + j;                                                   \
                const uint8_t *wr = w + j * rb;                                                  \
                if (R == 4) ROW(wr, nblk, xt, kp, xsum + r0, 4, o, n, &bad);                     \
                else if (R == 3) ROW(wr, nblk, xt, kp, xsum + r0, 3, o, n, &bad);                \
                else if (R == 2) ROW(wr, nblk, xt, kp, xsum + r0, 2, o, n, &bad);                \
                else ROW(wr, nblk, xt, kp, xsum + r0, 1, o, n, &bad);                            \
            }                                                                                    \
        }                                                                                        \
        free(xp);                                                                                \
        free(xsum);                                                                              \
        return _mm256_testz_si256(bad, bad) ? OB_OK : OB_ERR_CORRUPT;                            \
    }

DEFINE_GEMM(ob_avx2_gemm_i2, AVX2, row_i2_avx2, OB_LAYOUT_I2, OB_I2_BLOCK)
DEFINE_GEMM(ob_avx2_gemm_t1_6, AVX2, row_t16_avx2, OB_LAYOUT_T1_6, OB_T1_6_BLOCK)
DEFINE_GEMM(ob_avx512vnni_gemm_i2, VNNI, row_i2_vnni, OB_LAYOUT_I2, OB_I2_BLOCK)
DEFINE_GEMM(ob_avx512vnni_gemm_t1_6, VNNI, row_t16_vnni, OB_LAYOUT_T1_6, OB_T1_6_BLOCK)

#endif /* OB_HAVE_X86 */
