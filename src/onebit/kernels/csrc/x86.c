/* x86 SIMD variants: AVX2 (vpmaddubsw) and AVX-512 VNNI (vpdpbusd on 256-bit vectors).
 *
 * All use  sum_e (c_e - 1) * x_e = sum_e c_e * x_e - xsum  with the stored code c in {0,1,2} as
 * the unsigned operand and the int8 activation as the signed one (no sign trick needed). The
 * activations arrive zero-padded to whole blocks (dispatch.c), so padding weights meet x = 0 and
 * no loop has a tail. Compiled without -march: each function carries its own target attribute.
 *
 * Two shapes of kernel, chosen by the number of activation rows m:
 *  - row kernels (m < OB_GEMM_MIN_M = 24, decode and batched decode): a 32-byte block load gives one vector of 32
 *    consecutive codes per lane (docs/formats.md §1); vpmaddubsw products are summed in int16 for
 *    8 blocks (|sum| <= 8 * lanes * 512 < 2^15) before widening, so the inner loop is decode +
 *    multiply + add. For m = 1 two weight rows share each activation load.
 *  - panel GEMM (m >= OB_GEMM_MIN_M, prefill): a panel of 16 output columns x KC inputs is decoded
 *    once into int8 codes interleaved as [KC/4][16][4] (an 8x8 dword transpose of the decoded
 *    vectors) and reused by every activation row: a 6x16 register tile multiplies 4 broadcast
 *    activation bytes by 8 columns x 4 codes per instruction, int16 accumulation for 32 steps.
 *    The tile's 6 activation rows come interleaved in one stream (ob_gemm_args.xt). */
#include "internal.h"

#ifdef OB_HAVE_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

/* From this many activation rows on, the panel GEMM; below, row kernels (4 rows share each decoded
 * weight row). A batched decode step has one row per stream: at 8-23 rows the panel's decode +
 * transpose is shared by too few rows. Measured on Zen 4, 2 threads, decode steps of the 2B4T
 * shape (avx512vnni_zmm): 8 streams 146-159 ms with row kernels vs 212-216 ms with the panel
 * (700M: 47 vs 58 ms; avx2: 40 vs 74 ms); 16 streams 203-211 vs 226-229 ms; 24 streams 303-319
 * vs 277-279 ms (the panel wins). (xt is still built from OB_XT_MIN_M = 8 rows on; the row
 * kernels read x.) */
#ifndef OB_GEMM_MIN_M
#define OB_GEMM_MIN_M 24
#endif
#define TILE 4          /* activation rows sharing one decode in the row kernel */
#ifndef OB_CHECK
#define OB_CHECK 1
#endif
#ifndef SPLIT
#define SPLIT 1 /* GEMV: pair row j with row j + half (two weight streams per thread) */
#endif
#ifndef OB_PF_HINT
#define OB_PF_HINT _MM_HINT_T0
#endif
#ifndef OB_PREFETCH
#define OB_PREFETCH 2048 /* bytes ahead of the weight stream (0: none) */
#endif
#define FLUSH 8         /* blocks summed in int16 before widening (row kernel) */
#define NR 16           /* panel width (output columns) */
#define MR OB_XT_ROWS   /* activation rows of the GEMM register tile (12 accumulators + 2 + 2) */
#define KSTEPS 32       /* k4-steps summed in int16 before widening (GEMM) */

static inline AVX2 int32_t hsum_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* i2: lane j of byte m is (byte >> 2j) & 3. Shifts are 16-bit; the 0x03 mask drops bits that
 * crossed from the neighbour byte. bad |= v & (v >> 1): a lane holds code 3 iff an even bit of
 * it is set there (I2_BAD masks the even bits once, at the end; odd bits are noise). */
#define I2_LANES 4
#define I2_DECODE(v, c, bad)                                                    \
    do {                                                                        \
        const __m256i m3_ = _mm256_set1_epi8(3);                                \
        c[0] = _mm256_and_si256(v, m3_);                                        \
        c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3_);                  \
        c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3_);                  \
        c[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3_);                  \
        if (OB_CHECK) bad = _mm256_or_si256(bad, _mm256_and_si256(v, _mm256_srli_epi16(v, 1))); \
    } while (0)
#define I2_BAD(bad) _mm256_and_si256(bad, _mm256_set1_epi8(0x55))

/* t1_6: digit j = (b_j * 3) >> 8 with b_j = byte * 3^j mod 256 (byte-wise adds wrap mod 256);
 * (b*3) >> 8 = (b > 85) + (b > 170), unsigned compares done as signed after flipping bit 7.
 * bad |= bytes among the 13 unused values: bitmap lookup, bit (hi & 7) of table[hi >> 3][lo]. */
#define T16_LANES 5
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
#define T16_BAD(bad) (bad)

/* Products of codes and activations. AVX2: u8 x s8 -> int16 pair sums (|.| <= 2*2*128, never
 * saturates), summed in int16 and widened by FLUSH16 (madd with ones). VNNI: straight to int32. */
#define MUL16_AVX2(c, x) _mm256_maddubs_epi16(c, x)
#define ADD16_AVX2(a, b) _mm256_add_epi16(a, b)
#define FLUSH16_AVX2(acc32, acc16) \
    acc32 = _mm256_add_epi32(acc32, _mm256_madd_epi16(acc16, _mm256_set1_epi16(1)))
/* VNNI keeps everything in int32: "acc16" is already int32 and flushing adds it. */
#define MUL16_VNNI(c, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, x)
#define ADD16_VNNI(a, b) _mm256_add_epi32(a, b)
#define FLUSH16_VNNI(acc32, acc16) acc32 = _mm256_add_epi32(acc32, acc16)
/* acc += products: MAC_<MUL>(acc, c, x). VNNI adds in the same instruction (vpdpbusd acc, c, x);
 * a separate zero-accumulator vpdpbusd plus vpaddd, as first written, doubled its instructions. */
#define MAC_MUL16_AVX2(a, c, x) ADD16_AVX2(a, MUL16_AVX2(c, x))
#define MAC_MUL16_VNNI(a, c, x) _mm256_dpbusd_epi32(a, c, x)

/* ---- row kernel: WR weight rows x R activation rows, whole k ------------------------------ */
#define DEFINE_ROW_KERNEL(NAME, ATTR, DECODE, LANES, BLOCK, MUL, ADD, FLUSH16)                   \
    INLINE ATTR void NAME(const uint8_t *w, int64_t rb, int WR, const int8_t *xp, int64_t ldxp,   \
                          const int32_t *xsum, int R, int32_t *out, int64_t ldc, __m256i *bad) {   \
        int64_t nblk = rb / OB_BLOCK_BYTES;                                                       \
        __m256i acc[2][TILE];                                                                     \
        for (int i = 0; i < WR; i++)                                                              \
            for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_si256();                       \
        for (int64_t b0 = 0; b0 < nblk; b0 += FLUSH) {                                            \
            int64_t b1 = b0 + FLUSH < nblk ? b0 + FLUSH : nblk;                                   \
            __m256i s[2][TILE];                                                                   \
            for (int i = 0; i < WR; i++)                                                          \
                for (int r = 0; r < R; r++) s[i][r] = _mm256_setzero_si256();                     \
            for (int64_t b = b0; b < b1; b++) {                                                   \
                __m256i c[2][LANES];                                                              \
                for (int i = 0; i < WR; i++) {                                                    \
                    if (OB_PREFETCH && (b & 1) == 0)                                              \
                        _mm_prefetch((const char *)(w + i * rb + b * OB_BLOCK_BYTES) + OB_PREFETCH, OB_PF_HINT); \
                    __m256i v = _mm256_loadu_si256((const __m256i *)(w + i * rb + b * OB_BLOCK_BYTES)); \
                    DECODE(v, c[i], *bad);                                                        \
                }                                                                                 \
                for (int r = 0; r < R; r++) {                                                     \
                    const int8_t *xb = xp + r * ldxp + b * BLOCK;                                 \
                    for (int j = 0; j < LANES; j++) {                                             \
                        __m256i xv = _mm256_load_si256((const __m256i *)(xb + 32 * j));           \
                        for (int i = 0; i < WR; i++) s[i][r] = MAC_##MUL(s[i][r], c[i][j], xv);  \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (int i = 0; i < WR; i++)                                                          \
                for (int r = 0; r < R; r++) FLUSH16(acc[i][r], s[i][r]);                          \
        }                                                                                         \
        for (int i = 0; i < WR; i++)                                                              \
            for (int r = 0; r < R; r++) /* mod 2^32: lanes may wrap near OB_MAX_K */           \
                out[r * ldc + i] = (int32_t)((uint32_t)hsum_avx2(acc[i][r]) - (uint32_t)xsum[r]); \
    }

/* Two weight rows x one activation row through the generic row kernel. */
#define DEFINE_GEMV2_FROM_ROW(NAME, ATTR, ROW)                                                    \
    INLINE ATTR void NAME(const uint8_t *w, const uint8_t *w1, int64_t rb, const int8_t *x,       \
                          int32_t xsum, int32_t *out, int32_t *out1, __m256i *bad) {               \
        if (w1 == w + rb && out1 == out + 1) {                                                    \
            ROW(w, rb, 2, x, 0, &xsum, 1, out, 0, bad);                                           \
        } else {                                                                                  \
            ROW(w, rb, 1, x, 0, &xsum, 1, out, 0, bad);                                           \
            ROW(w1, rb, 1, x, 0, &xsum, 1, out1, 0, bad);                                         \
        }                                                                                         \
    }

/* i2 GEMV, two weight rows per pass, with a 5-instruction decode: the 16-bit shift by 4 serves
 * lanes 2 and 3, and lanes 1 and 3 are masked in place (0x0C: the code times 4), so their
 * products land 4x too large in a second int16 accumulator that is shifted back (exactly: it
 * only holds multiples of 4) when widened. Bounds per 8 blocks: A in [-8192, 8128], B in
 * [-32768, 32512] — both int16. */
#define DEFINE_GEMV2_I2(NAME, CHECK, PF)                                                           \
INLINE AVX2 void NAME(const uint8_t *w, const uint8_t *w1, int64_t rb, const int8_t *x,             \
                      int32_t xsum, int32_t *out, int32_t *out1, __m256i *bad,                     \
                      const char *p0, const char *p1) {                                            \
    const __m256i m3 = _mm256_set1_epi8(3), mc = _mm256_set1_epi8(0x0C), ones = _mm256_set1_epi16(1); \
    int64_t nblk = rb / OB_BLOCK_BYTES;                                                            \
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, bd = *bad;                                 \
    for (int64_t b0 = 0; b0 < nblk; b0 += FLUSH) {                                                 \
        int64_t b1 = b0 + FLUSH < nblk ? b0 + FLUSH : nblk;                                        \
        __m256i a0 = _mm256_setzero_si256(), q0 = a0, a1 = a0, q1 = a0;                            \
        for (int64_t b = b0; b < b1; b++) {                                                        \
            if (PF > 0 && (b & 1) == 0) {                                                          \
                _mm_prefetch((const char *)(w + b * OB_BLOCK_BYTES) + PF, OB_PF_HINT);             \
                _mm_prefetch((const char *)(w1 + b * OB_BLOCK_BYTES) + PF, OB_PF_HINT);            \
            } else if (PF < 0 && (b & 1) == 0) { /* other rows' same line (row lists) */           \
                _mm_prefetch(p0 + b * OB_BLOCK_BYTES, OB_PF_HINT);                                 \
                _mm_prefetch(p1 + b * OB_BLOCK_BYTES, OB_PF_HINT);                                 \
            }                                                                                      \
            const int8_t *xb = x + b * OB_I2_BLOCK;                                                \
            __m256i x0 = _mm256_load_si256((const __m256i *)xb);                                   \
            __m256i x1 = _mm256_load_si256((const __m256i *)(xb + 32));                            \
            __m256i x2 = _mm256_load_si256((const __m256i *)(xb + 64));                            \
            __m256i x3 = _mm256_load_si256((const __m256i *)(xb + 96));                            \
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + b * OB_BLOCK_BYTES));             \
            __m256i u = _mm256_srli_epi16(v, 4);                                                   \
            if (CHECK) bd = _mm256_or_si256(bd, _mm256_and_si256(v, _mm256_srli_epi16(v, 1)));     \
            a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_and_si256(v, m3), x0));          \
            q0 = _mm256_add_epi16(q0, _mm256_maddubs_epi16(_mm256_and_si256(v, mc), x1));          \
            a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_and_si256(u, m3), x2));          \
            q0 = _mm256_add_epi16(q0, _mm256_maddubs_epi16(_mm256_and_si256(u, mc), x3));          \
            v = _mm256_loadu_si256((const __m256i *)(w1 + b * OB_BLOCK_BYTES));                    \
            u = _mm256_srli_epi16(v, 4);                                                           \
            if (CHECK) bd = _mm256_or_si256(bd, _mm256_and_si256(v, _mm256_srli_epi16(v, 1)));     \
            a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(v, m3), x0));          \
            q1 = _mm256_add_epi16(q1, _mm256_maddubs_epi16(_mm256_and_si256(v, mc), x1));          \
            a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(u, m3), x2));          \
            q1 = _mm256_add_epi16(q1, _mm256_maddubs_epi16(_mm256_and_si256(u, mc), x3));          \
        }                                                                                          \
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_add_epi16(a0, _mm256_srai_epi16(q0, 2)), ones)); \
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_add_epi16(a1, _mm256_srai_epi16(q1, 2)), ones)); \
    }                                                                                              \
    out[0] = (int32_t)((uint32_t)hsum_avx2(acc0) - (uint32_t)xsum);                                \
    out1[0] = (int32_t)((uint32_t)hsum_avx2(acc1) - (uint32_t)xsum);                               \
    *bad = bd;                                                                                     \
}

DEFINE_GEMV2_I2(gemv2_i2_avx2_chk, 1, OB_PREFETCH)
DEFINE_GEMV2_I2(gemv2_i2_avx2_nochk, 0, OB_PREFETCH)
DEFINE_GEMV2_I2(gemv2_i2_avx2_list, 0, -1) /* row lists: prefetches rows p0, p1 line by line */

/* checked unless the caller vouched for the weights (ob_linear_i2_unchecked) */
#define gemv2_i2_avx2(w, w1, rb, x, xsum, out, out1, bad)                                        \
    (a->check ? gemv2_i2_avx2_chk(w, w1, rb, x, xsum, out, out1, bad, NULL, NULL)                 \
              : gemv2_i2_avx2_nochk(w, w1, rb, x, xsum, out, out1, bad, NULL, NULL))

/* ---- panel GEMM ------------------------------------------------------------------------------ */

/* 8x8 transpose of 32-bit elements: in[c] = 8 dwords (k4-steps) of column c -> out[s] = column
 * 0..7 dwords of step s. */
INLINE AVX2 void transpose8x8_epi32(__m256i *r) {
    __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

/* Decodes packed rows j..j+nc-1 (nc <= NR; missing columns get code 0), blocks [b0, b1), into
 * panel[(b - b0) * BLOCK/4 + s][NR][4]. */
#define DEFINE_PANEL(NAME, ATTR, DECODE, LANES, BLOCK)                                            \
    INLINE ATTR void NAME(const uint8_t *w, int64_t rb, int nc, int64_t b0, int64_t b1,          \
                          int8_t *panel, __m256i *bad) {                                           \
        for (int64_t b = b0; b < b1; b++) {                                                       \
            int8_t *pb = panel + (b - b0) * (BLOCK / 4) * NR * 4;                                 \
            for (int half = 0; half < NR / 8; half++) {                                           \
                __m256i c[8][LANES];                                                              \
                for (int q = 0; q < 8; q++) {                                                     \
                    int col = half * 8 + q;                                                       \
                    if (col < nc) {                                                               \
                        __m256i v = _mm256_loadu_si256(                                           \
                            (const __m256i *)(w + col * rb + b * OB_BLOCK_BYTES));                \
                        DECODE(v, c[q], *bad);                                                    \
                    } else                                                                        \
                        for (int j = 0; j < LANES; j++) c[q][j] = _mm256_setzero_si256();        \
                }                                                                                 \
                for (int j = 0; j < LANES; j++) {                                                 \
                    __m256i t[8];                                                                 \
                    for (int q = 0; q < 8; q++) t[q] = c[q][j];                                   \
                    transpose8x8_epi32(t);                                                        \
                    for (int s = 0; s < 8; s++) /* lane j holds elements 32j + 4s' */            \
                        _mm256_store_si256((__m256i *)(pb + ((j * 8 + s) * NR + half * 8) * 4), t[s]); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* c_r[0:16] += x_r[0 : steps*4] . panel for the 6 activation rows r of one tile, x interleaved
 * as xt[s][6][4] (named variables: GCC keeps the 12 int16 accumulators in registers this way, not
 * with arrays). */
#define BCAST4(p) _mm256_set1_epi32(load_i32(p))
#define MA_INTRIN(MUL, ADD, S_, r, acc0, acc1)                                                        \
    do {                                                                                          \
        __m256i b = BCAST4(xt + (S_) * 4 * MR + 4 * (r));                                        \
        acc0 = MAC_##MUL(acc0, w0, b);                                                            \
        acc1 = MAC_##MUL(acc1, w1, b);                                                            \
    } while (0)
#define STEP_INTRIN(MUL, ADD, S_)                                                                 \
    do {                                                                                          \
        MA_INTRIN(MUL, ADD, S_, 0, a00, a01);                                                         \
        MA_INTRIN(MUL, ADD, S_, 1, a10, a11);                                                         \
        MA_INTRIN(MUL, ADD, S_, 2, a20, a21);                                                         \
        MA_INTRIN(MUL, ADD, S_, 3, a30, a31);                                                         \
        MA_INTRIN(MUL, ADD, S_, 4, a40, a41);                                                         \
        MA_INTRIN(MUL, ADD, S_, 5, a50, a51);                                                         \
    } while (0)
#if defined(__GNUC__)
/* The same step in inline asm, all 16 ymm registers (12 accumulators, 2 panel vectors, the
 * broadcast and a product): with intrinsics GCC 12 schedules the multiplies first, runs out of
 * registers and carries accumulators through the stack (a store-forwarding chain that halves the
 * speed). AT&T order: vpmaddubsw signed, unsigned, dst. */
#define MA_ASM(off, acc0, acc1)                                                                   \
    "vpbroadcastd " #off "(%[x]), %[b]\n\t"                                                       \
    "vpmaddubsw %[b], %[w0], %[t]\n\tvpaddw %[t], %[" #acc0 "], %[" #acc0 "]\n\t"                 \
    "vpmaddubsw %[b], %[w1], %[t]\n\tvpaddw %[t], %[" #acc1 "], %[" #acc1 "]\n\t"
#if defined(__SANITIZE_ADDRESS__)
/* ASan cannot see loads inside inline asm: in the sanitized build (scripts/check_sanitizers.sh)
 * the 24 activation bytes a step broadcasts from are first read by an instrumented memcpy. */
#define ASAN_READ_XT(p)                                                                           \
    do {                                                                                          \
        int8_t seen_[24];                                                                         \
        memcpy(seen_, (p), sizeof seen_);                                                         \
        __asm__ volatile("" : : "r"(seen_) : "memory");                                           \
    } while (0)
#else
#define ASAN_READ_XT(p) ((void)0)
#endif
#define STEP_AVX2(MUL, ADD, S_)                                                                   \
    do {                                                                                          \
        __m256i b_, t_;                                                                           \
        ASAN_READ_XT(xt + (S_) * 4 * MR);                                                         \
        __asm__(MA_ASM(0, a00, a01) MA_ASM(4, a10, a11) MA_ASM(8, a20, a21)                       \
                MA_ASM(12, a30, a31) MA_ASM(16, a40, a41) MA_ASM(20, a50, a51)                    \
                : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11),            \
                  [a20] "+x"(a20), [a21] "+x"(a21), [a30] "+x"(a30), [a31] "+x"(a31),            \
                  [a40] "+x"(a40), [a41] "+x"(a41), [a50] "+x"(a50), [a51] "+x"(a51),            \
                  [b] "=&x"(b_), [t] "=&x"(t_)                                                    \
                : [w0] "x"(w0), [w1] "x"(w1), [x] "r"(xt + (S_) * 4 * MR)                         \
                : "memory");                                                                      \
    } while (0)
#else
#define STEP_AVX2 STEP_INTRIN
#endif
#define DEFINE_MICRO(NAME, ATTR, MUL, ADD, FLUSH16, STEP)                                         \
    INLINE ATTR void flush_##NAME(int32_t *c, __m256i lo, __m256i hi) {                          \
        __m256i c0 = _mm256_loadu_si256((const __m256i *)c);                                      \
        __m256i c1 = _mm256_loadu_si256((const __m256i *)(c + 8));                                \
        FLUSH16(c0, lo);                                                                          \
        FLUSH16(c1, hi);                                                                          \
        _mm256_storeu_si256((__m256i *)c, c0);                                                    \
        _mm256_storeu_si256((__m256i *)(c + 8), c1);                                              \
    }                                                                                             \
    INLINE ATTR void NAME(const int8_t *panel, int64_t steps, const int8_t *xt, int32_t *c,       \
                          int64_t ldc) {                                                          \
        for (int64_t s0 = 0; s0 < steps; s0 += KSTEPS) {                                          \
            int64_t s1 = s0 + KSTEPS < steps ? s0 + KSTEPS : steps;                               \
            __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;                \
            __m256i a20 = a00, a21 = a00, a30 = a00, a31 = a00, a40 = a00, a41 = a00;             \
            __m256i a50 = a00, a51 = a00;                                                         \
            for (int64_t s = s0; s < s1; s++) {                                                   \
                __m256i w0 = _mm256_load_si256((const __m256i *)(panel + s * NR * 4));            \
                __m256i w1 = _mm256_load_si256((const __m256i *)(panel + s * NR * 4 + 32));       \
                STEP(MUL, ADD, s);                                                                \
            }                                                                                     \
            flush_##NAME(c, a00, a01);                                                            \
            flush_##NAME(c + ldc, a10, a11);                                                      \
            flush_##NAME(c + 2 * ldc, a20, a21);                                                  \
            flush_##NAME(c + 3 * ldc, a30, a31);                                                  \
            flush_##NAME(c + 4 * ldc, a40, a41);                                                  \
            flush_##NAME(c + 5 * ldc, a50, a51);                                                  \
        }                                                                                         \
    }

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* KC = blocks per panel: 8 (i2: 1024 inputs, 16 KiB panel; t1_6: 1280 inputs, 20 KiB). */
#define KC_BLOCKS 8

#define DEFINE_GEMM(NAME, ATTR, ROW, GEMV2, PANEL, MICRO, BLOCK, BADF)                           \
    ATTR int NAME(const ob_gemm_args *a, int64_t j0, int64_t j1) {                               \
        __m256i bad = _mm256_setzero_si256();                                                     \
        int64_t m = a->m, rb = a->rb, nblk = rb / OB_BLOCK_BYTES;                                 \
        if (m < OB_GEMM_MIN_M) {                                                                  \
            for (int64_t r0 = 0; r0 < m; r0 += TILE) {                                            \
                int R = (int)(m - r0 < TILE ? m - r0 : TILE);                                     \
                const int8_t *xt = a->xp + r0 * a->ldxp;                                          \
                int32_t *o = a->acc + r0 * a->ldc;                                                \
                const int32_t *xs = a->xsum + r0;                                                 \
                int64_t j = j0;                                                                   \
                if (R == 1 && SPLIT) { /* rows j and j + half: two distant weight streams */  \
                    int64_t half = (j1 - j0) / 2;                                                 \
                    for (int64_t p = 0; p < half; p++)                                            \
                        GEMV2(a->w + (j0 + p) * rb, a->w + (j0 + half + p) * rb, rb, xt, xs[0],   \
                              o + j0 + p, o + j0 + half + p, &bad);                               \
                    j = j0 + 2 * half;                                                            \
                } else if (R == 1)                                                                \
                    for (; j + 1 < j1; j += 2)                                                    \
                        GEMV2(a->w + j * rb, a->w + (j + 1) * rb, rb, xt, xs[0], o + j, o + j + 1, &bad); \
                for (; j < j1; j++) {                                                             \
                    const uint8_t *wr = a->w + j * rb;                                            \
                    if (R == 4) ROW(wr, rb, 1, xt, a->ldxp, xs, 4, o + j, a->ldc, &bad);          \
                    else if (R == 3) ROW(wr, rb, 1, xt, a->ldxp, xs, 3, o + j, a->ldc, &bad);     \
                    else if (R == 2) ROW(wr, rb, 1, xt, a->ldxp, xs, 2, o + j, a->ldc, &bad);     \
                    else ROW(wr, rb, 1, xt, a->ldxp, xs, 1, o + j, a->ldc, &bad);                 \
                }                                                                                 \
            }                                                                                     \
        } else {                                                                                  \
            _Alignas(64) int8_t panel[KC_BLOCKS * BLOCK * NR];                                    \
            _Alignas(64) int32_t cbuf[MR * NR]; /* edge tiles work in here */                    \
            for (int64_t jp = j0; jp < j1; jp += NR) {                                            \
                int nc = (int)(j1 - jp < NR ? j1 - jp : NR);                                      \
                for (int64_t r = 0; r < m; r++)                                                   \
                    for (int q = 0; q < nc; q++) a->acc[r * a->ldc + jp + q] = (int32_t)(0u - (uint32_t)a->xsum[r]); \
                for (int64_t b0 = 0; b0 < nblk; b0 += KC_BLOCKS) {                                \
                    int64_t b1 = b0 + KC_BLOCKS < nblk ? b0 + KC_BLOCKS : nblk;                   \
                    PANEL(a->w + jp * rb, rb, nc, b0, b1, panel, &bad);                           \
                    int64_t steps = (b1 - b0) * BLOCK / 4;                                        \
                    for (int64_t r0 = 0; r0 < m; r0 += MR) {                                      \
                        int R = (int)(m - r0 < MR ? m - r0 : MR);                                 \
                        const int8_t *xt = a->xt + r0 * a->kp + b0 * BLOCK * MR;                  \
                        if (R == MR && nc == NR) {                                                \
                            MICRO(panel, steps, xt, a->acc + r0 * a->ldc + jp, a->ldc);           \
                            continue;                                                             \
                        }                                                                         \
                        for (int r = 0; r < MR; r++) /* rows past m: zero activations */         \
                            for (int q = 0; q < NR; q++)                                          \
                                cbuf[r * NR + q] = r < R && q < nc ? a->acc[(r0 + r) * a->ldc + jp + q] : 0; \
                        MICRO(panel, steps, xt, cbuf, NR);                                        \
                        for (int r = 0; r < R; r++)                                               \
                            for (int q = 0; q < nc; q++)                                          \
                                a->acc[(r0 + r) * a->ldc + jp + q] = cbuf[r * NR + q];            \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        bad = BADF(bad);                                                                          \
        return _mm256_testz_si256(bad, bad) ? OB_OK : OB_ERR_CORRUPT;                             \
    }

DEFINE_ROW_KERNEL(row_i2_avx2, AVX2, I2_DECODE, I2_LANES, OB_I2_BLOCK, MUL16_AVX2, ADD16_AVX2, FLUSH16_AVX2)
DEFINE_ROW_KERNEL(row_t16_avx2, AVX2, T16_DECODE, T16_LANES, OB_T1_6_BLOCK, MUL16_AVX2, ADD16_AVX2, FLUSH16_AVX2)
DEFINE_ROW_KERNEL(row_i2_vnni, VNNI, I2_DECODE, I2_LANES, OB_I2_BLOCK, MUL16_VNNI, ADD16_VNNI, FLUSH16_VNNI)
DEFINE_ROW_KERNEL(row_t16_vnni, VNNI, T16_DECODE, T16_LANES, OB_T1_6_BLOCK, MUL16_VNNI, ADD16_VNNI, FLUSH16_VNNI)
DEFINE_GEMV2_FROM_ROW(gemv2_t16_avx2, AVX2, row_t16_avx2)
DEFINE_GEMV2_FROM_ROW(gemv2_i2_vnni, VNNI, row_i2_vnni)
DEFINE_GEMV2_FROM_ROW(gemv2_t16_vnni, VNNI, row_t16_vnni)
DEFINE_PANEL(panel_i2_avx2, AVX2, I2_DECODE, I2_LANES, OB_I2_BLOCK)
DEFINE_PANEL(panel_t16_avx2, AVX2, T16_DECODE, T16_LANES, OB_T1_6_BLOCK)
DEFINE_PANEL(panel_i2_vnni, VNNI, I2_DECODE, I2_LANES, OB_I2_BLOCK)
DEFINE_PANEL(panel_t16_vnni, VNNI, T16_DECODE, T16_LANES, OB_T1_6_BLOCK)
DEFINE_MICRO(micro_avx2, AVX2, MUL16_AVX2, ADD16_AVX2, FLUSH16_AVX2, STEP_AVX2)
DEFINE_MICRO(micro_vnni, VNNI, MUL16_VNNI, ADD16_VNNI, FLUSH16_VNNI, STEP_INTRIN)

DEFINE_GEMM(ob_avx2_gemm_i2, AVX2, row_i2_avx2, gemv2_i2_avx2, panel_i2_avx2, micro_avx2, OB_I2_BLOCK, I2_BAD)
DEFINE_GEMM(ob_avx2_gemm_t1_6, AVX2, row_t16_avx2, gemv2_t16_avx2, panel_t16_avx2, micro_avx2, OB_T1_6_BLOCK, T16_BAD)
DEFINE_GEMM(ob_avx512vnni_gemm_i2, VNNI, row_i2_vnni, gemv2_i2_vnni, panel_i2_vnni, micro_vnni, OB_I2_BLOCK, I2_BAD)
DEFINE_GEMM(ob_avx512vnni_gemm_t1_6, VNNI, row_t16_vnni, gemv2_t16_vnni, panel_t16_vnni, micro_vnni, OB_T1_6_BLOCK, T16_BAD)

/* ---- 512-bit VNNI ("avx512vnni_zmm"): vpdpbusd on zmm, 32 registers -----------------------------
 *
 * Row kernels (m < OB_GEMM_MIN_M), i2: a 32-byte block is broadcast to both halves of a zmm
 * (vbroadcasti64x4 from memory), and lanes (0 | 1) and (2 | 3) are masked in place, 0x03 | 0x0C and
 * 0x30 | 0xC0: the codes of lane j sit at 4^j times their value, and lanes 0-1 (2-3) need the 64
 * activations x[128b : 128b + 64] (x[128b + 64 : 128b + 128]) as they are, so a block costs one
 * load, two ANDs and two vpdpbusd per weight row, with no shifts and no rearranged activations.
 * Each dword lane of an accumulator holds one scale (the low 8 dwords lane 0 or 2, the high 8
 * lane 1 or 3), removed exactly by a per-lane arithmetic shift (vpsravd: every sum is a multiple
 * of its scale) when the accumulators are flushed, every ZFLUSH blocks: a lane-3 product is at
 * most 64 * 2 * 128 and a dword adds 4 per instruction, so 2 x 4096 instructions stay < 2^31.
 * Two blocks per iteration go to two sets of accumulators (vpdpbusd's latency is 4-5 cycles).
 * t1_6 rows keep the 256-bit VNNI row kernel (its base-3 decode is the cost, not the multiply).
 *
 * GEMM (m >= OB_GEMM_MIN_M): the 16-column panels of the AVX2 GEMM ([KC/4][16][4] int8 codes, one
 * zmm per k4-step), two side by side (32 columns), times a 12-row register tile whose activation
 * bytes are broadcast from memory inside vpdpbusd ({1to16}): 24 int32 accumulators, 2 panel
 * vectors, nothing else, so one vpdpbusd per 64 products and no int16 flushes. The 12 rows are two
 * consecutive 6-row tiles of ob_gemm_args.xt; edges (rows past m: zero activations; columns past
 * the panel: masked loads and stores of acc) need no copy. */
#define Z512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define ZFLUSH 8192       /* blocks between flushes of the scaled accumulators (row kernel) */
#define ZMR 12            /* activation rows of the GEMM register tile (two xt tiles) */
#define ZKC_BLOCKS 4      /* blocks per panel: 2 x 16 columns x 512 (i2) inputs = 16 KiB */

INLINE Z512 int32_t hsum_z(__m512i v) { return _mm512_reduce_add_epi32(v); }

/* The 4 scaled accumulators of one (weight row, activation row) pair to a true int32 sum */
INLINE Z512 __m512i unscale_z(__m512i a, __m512i b) {
    const __m512i sa = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i sb = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    return _mm512_add_epi32(_mm512_srav_epi32(a, sa), _mm512_srav_epi32(b, sb));
}

/* WR (1 or 2) weight rows x R (1..4) activation rows, i2, whole k. out[r * ldc + i]. */
INLINE Z512 void rowz_i2(const uint8_t *const *wr, int WR, int64_t nblk, const int8_t *xp,
                         int64_t ldxp, const int32_t *xsum, int R, int32_t *out, int64_t ldc,
                         __m512i *bad, int check) {
    const __m512i m01 = _mm512_inserti64x4(_mm512_set1_epi8(0x03), _mm256_set1_epi8(0x0C), 1);
    const __m512i m23 = _mm512_inserti64x4(_mm512_set1_epi8(0x30), _mm256_set1_epi8((char)0xC0), 1);
    __m512i tot[2][TILE], bd = *bad;
    for (int i = 0; i < WR; i++)
        for (int r = 0; r < R; r++) tot[i][r] = _mm512_setzero_si512();
    for (int64_t f0 = 0; f0 < nblk; f0 += ZFLUSH) {
        int64_t f1 = f0 + ZFLUSH < nblk ? f0 + ZFLUSH : nblk;
        __m512i a[2][2][TILE], q[2][2][TILE]; /* [block parity][weight row][activation row] */
        for (int p = 0; p < 2; p++)
            for (int i = 0; i < WR; i++)
                for (int r = 0; r < R; r++) a[p][i][r] = q[p][i][r] = _mm512_setzero_si512();
#define ZBLOCK(p, b)                                                                              \
    do {                                                                                          \
        __m512i c01[2], c23[2];                                                                   \
        for (int i = 0; i < WR; i++) {                                                            \
            const uint8_t *wb = wr[i] + (b) * OB_BLOCK_BYTES;                                     \
            if (OB_PREFETCH && (p) == 0) _mm_prefetch((const char *)wb + OB_PREFETCH, OB_PF_HINT); \
            __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)wb));          \
            if (check) bd = _mm512_or_si512(bd, _mm512_and_si512(v, _mm512_srli_epi16(v, 1)));   \
            c01[i] = _mm512_and_si512(v, m01);                                                    \
            c23[i] = _mm512_and_si512(v, m23);                                                    \
        }                                                                                         \
        for (int r = 0; r < R; r++) {                                                             \
            const int8_t *xb = xp + r * ldxp + (b) * OB_I2_BLOCK;                                 \
            __m512i x01 = _mm512_load_si512((const void *)xb);                                    \
            __m512i x23 = _mm512_load_si512((const void *)(xb + 64));                             \
            for (int i = 0; i < WR; i++) {                                                        \
                a[p][i][r] = _mm512_dpbusd_epi32(a[p][i][r], c01[i], x01);                        \
                q[p][i][r] = _mm512_dpbusd_epi32(q[p][i][r], c23[i], x23);                        \
            }                                                                                     \
        }                                                                                         \
    } while (0)
        int64_t b = f0;
        for (; b + 1 < f1; b += 2) {
            ZBLOCK(0, b);
            ZBLOCK(1, b + 1);
        }
        if (b < f1) ZBLOCK(0, b);
#undef ZBLOCK
        for (int i = 0; i < WR; i++)
            for (int r = 0; r < R; r++)
                tot[i][r] = _mm512_add_epi32(tot[i][r], _mm512_add_epi32(unscale_z(a[0][i][r], q[0][i][r]),
                                                                         unscale_z(a[1][i][r], q[1][i][r])));
    }
    for (int i = 0; i < WR; i++)
        for (int r = 0; r < R; r++) /* mod 2^32: lanes may wrap near OB_MAX_K */
            out[r * ldc + i] = (int32_t)((uint32_t)hsum_z(tot[i][r]) - (uint32_t)xsum[r]);
    *bad = bd;
}

/* GEMM micro tile: c[r][0:NW*16] += x_r . panels for ZMR rows (x rows 0-5 from xa, 6-11 from xb,
 * both [steps][6][4]); ncol (1..NW*16) valid columns, nrow (1..ZMR) valid rows of c. */
#define ZMA(r, xs)                                                                                \
    do {                                                                                          \
        __m512i b_ = _mm512_set1_epi32(load_i32(xs));                                             \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, w0, b_);                                           \
        if (nw > 1) c##r##1 = _mm512_dpbusd_epi32(c##r##1, w1, b_);                               \
    } while (0)
#define ZSTORE(r)                                                                                 \
    do {                                                                                          \
        if (r < nrow) {                                                                           \
            int32_t *o_ = c + (r) * ldc;                                                          \
            _mm512_mask_storeu_epi32(o_, k0, _mm512_add_epi32(_mm512_maskz_loadu_epi32(k0, o_), c##r##0)); \
            if (nw > 1)                                                                           \
                _mm512_mask_storeu_epi32(o_ + 16, k1, _mm512_add_epi32(_mm512_maskz_loadu_epi32(k1, o_ + 16), c##r##1)); \
        }                                                                                         \
    } while (0)
#define DEFINE_ZMICRO(NAME, NW)                                                                   \
    INLINE Z512 void NAME(const int8_t *pa, const int8_t *pb, int64_t steps, const int8_t *xa,    \
                          const int8_t *xb, int32_t *c, int64_t ldc, int nrow, int ncol) {        \
        const int nw = NW;                                                                        \
        __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00; \
        __m512i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;                 \
        __m512i c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;                 \
        __m512i c90 = c00, c91 = c00, c100 = c00, c101 = c00, c110 = c00, c111 = c00;             \
        for (int64_t s = 0; s < steps; s++) {                                                     \
            __m512i w0 = _mm512_load_si512((const void *)(pa + s * 64)), w1 = w0;                 \
            if (nw > 1) w1 = _mm512_load_si512((const void *)(pb + s * 64));                      \
            const int8_t *x0 = xa + s * 4 * MR, *x1 = xb + s * 4 * MR;                            \
            ZMA(0, x0); ZMA(1, x0 + 4); ZMA(2, x0 + 8); ZMA(3, x0 + 12); ZMA(4, x0 + 16);          \
            ZMA(5, x0 + 20);                                                                      \
            if (nrow > 6) {                                                                       \
                ZMA(6, x1); ZMA(7, x1 + 4); ZMA(8, x1 + 8); ZMA(9, x1 + 12); ZMA(10, x1 + 16);     \
                ZMA(11, x1 + 20);                                                                  \
            }                                                                                     \
        }                                                                                         \
        __mmask16 k0 = (__mmask16)(ncol >= 16 ? 0xFFFF : (1u << ncol) - 1);                       \
        __mmask16 k1 = (__mmask16)(ncol >= 32 ? 0xFFFF : ncol <= 16 ? 0 : (1u << (ncol - 16)) - 1); \
        ZSTORE(0); ZSTORE(1); ZSTORE(2); ZSTORE(3); ZSTORE(4); ZSTORE(5);                         \
        ZSTORE(6); ZSTORE(7); ZSTORE(8); ZSTORE(9); ZSTORE(10); ZSTORE(11);                         \
    }
DEFINE_ZMICRO(zmicro2, 2)
DEFINE_ZMICRO(zmicro1, 1)

#define DEFINE_ZGEMM(NAME, PANEL, BLOCK, BADF, CHECKROW)                                                \
    Z512 int NAME(const ob_gemm_args *a, int64_t j0, int64_t j1) {                                \
        int64_t m = a->m, rb = a->rb, nblk = rb / OB_BLOCK_BYTES;                                 \
        if (m < OB_GEMM_MIN_M) {                                                                  \
            CHECKROW;                                                                             \
        }                                                                                         \
        __m256i bad = _mm256_setzero_si256();                                                     \
        _Alignas(64) int8_t panel[2][ZKC_BLOCKS * BLOCK * 16];                                    \
        for (int64_t jp = j0; jp < j1; jp += 32) {                                                \
            int nc = (int)(j1 - jp < 32 ? j1 - jp : 32);                                          \
            for (int64_t r = 0; r < m; r++)                                                       \
                for (int q = 0; q < nc; q++) a->acc[r * a->ldc + jp + q] = (int32_t)(0u - (uint32_t)a->xsum[r]); \
            for (int64_t b0 = 0; b0 < nblk; b0 += ZKC_BLOCKS) {                                   \
                int64_t b1 = b0 + ZKC_BLOCKS < nblk ? b0 + ZKC_BLOCKS : nblk;                     \
                PANEL(a->w + jp * rb, rb, nc < 16 ? nc : 16, b0, b1, panel[0], &bad);             \
                if (nc > 16) PANEL(a->w + (jp + 16) * rb, rb, nc - 16, b0, b1, panel[1], &bad);   \
                int64_t steps = (b1 - b0) * BLOCK / 4;                                            \
                for (int64_t r0 = 0; r0 < m; r0 += ZMR) {                                         \
                    int R = (int)(m - r0 < ZMR ? m - r0 : ZMR);                                   \
                    const int8_t *xa = a->xt + r0 * a->kp + b0 * BLOCK * MR;                      \
                    const int8_t *xb = R > MR ? xa + a->kp * MR : xa;                             \
                    int32_t *c = a->acc + r0 * a->ldc + jp;                                       \
                    if (nc > 16) zmicro2(panel[0], panel[1], steps, xa, xb, c, a->ldc, R, nc);    \
                    else zmicro1(panel[0], panel[0], steps, xa, xb, c, a->ldc, R, nc);            \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        bad = BADF(bad);                                                                          \
        return _mm256_testz_si256(bad, bad) ? OB_OK : OB_ERR_CORRUPT;                             \
    }

/* i2 rows: m = 1 pairs row j with row j + half (two weight streams, as the AVX2 GEMV) */
INLINE Z512 int rows_i2_z(const ob_gemm_args *a, int64_t j0, int64_t j1) {
    __m512i bad = _mm512_setzero_si512();
    int64_t nblk = a->rb / OB_BLOCK_BYTES, rb = a->rb;
    for (int64_t r0 = 0; r0 < a->m; r0 += TILE) {
        int R = (int)(a->m - r0 < TILE ? a->m - r0 : TILE);
        const int8_t *x = a->xp + r0 * a->ldxp;
        int32_t *o = a->acc + r0 * a->ldc;
        const int32_t *xs = a->xsum + r0;
        int64_t j = j0;
        if (R == 1) {
            int64_t half = (j1 - j0) / 2;
            for (int64_t p = 0; p < half; p++) {
                const uint8_t *w2[2] = {a->w + (j0 + p) * rb, a->w + (j0 + half + p) * rb};
                int32_t o2[2];
                rowz_i2(w2, 2, nblk, x, 0, xs, 1, o2, 0, &bad, a->check);
                o[j0 + p] = o2[0];
                o[j0 + half + p] = o2[1];
            }
            j = j0 + 2 * half;
        }
        for (; j < j1; j++) { /* R rows of activations share each decoded weight row */
            const uint8_t *w1[1] = {a->w + j * rb};
            if (R == 4) rowz_i2(w1, 1, nblk, x, a->ldxp, xs, 4, o + j, a->ldc, &bad, a->check);
            else if (R == 3) rowz_i2(w1, 1, nblk, x, a->ldxp, xs, 3, o + j, a->ldc, &bad, a->check);
            else if (R == 2) rowz_i2(w1, 1, nblk, x, a->ldxp, xs, 2, o + j, a->ldc, &bad, a->check);
            else rowz_i2(w1, 1, nblk, x, a->ldxp, xs, 1, o + j, a->ldc, &bad, a->check);
        }
    }
    bad = _mm512_and_si512(bad, _mm512_set1_epi8(0x55));
    return _mm512_test_epi64_mask(bad, bad) ? OB_ERR_CORRUPT : OB_OK;
}

DEFINE_ZGEMM(ob_avx512vnni_zmm_gemm_i2, panel_i2_avx2, OB_I2_BLOCK, I2_BAD, return rows_i2_z(a, j0, j1))
DEFINE_ZGEMM(ob_avx512vnni_zmm_gemm_t1_6, panel_t16_avx2, OB_T1_6_BLOCK, T16_BAD,
             return ob_avx512vnni_gemm_t1_6(a, j0, j1))

/* The LM-head kernels (int8, 4-bit, float16) take the activation rows in groups of OB_HEAD_ROWS
 * inside the loop over weight rows: a batched decode step's 8-16 rows share each weight row read
 * from memory (rows outermost, the whole head was streamed once per row). Each (row, column) is
 * the same sum in the same order as before: the results are unchanged, bit for bit. */
#define OB_HEAD_ROWS 16

/* int8 x int8 (8-bit LM head) on zmm: vpdpbusd multiplies unsigned by signed bytes, so it takes
 * x + 128 (x ^ 0x80: x is never -128) times w and subtracts 128 * sum(w), the sum from a second
 * vpdpbusd of w with bytes of 1; int32 lanes wrap, the result is exact wherever ob_linear_i8's is
 * (|sum| < 2^31). Two weight rows per pass (j and j + half, two streams) share each activation
 * load; the row tails are masked loads (zero weights). 64 bytes of a row: 1 load, 2 vpdpbusd,
 * against 5 instructions per 32 bytes on AVX2. */
Z512 void ob_zmm_linear_i8(const ob_i8_args *a, int64_t j0, int64_t j1) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), ones = _mm512_set1_epi8(1);
    int64_t k = a->k, k64 = k / 64 * 64;
    __mmask64 tail = k > k64 ? (__mmask64)(~0ull >> (64 - (k - k64))) : 0;
    int64_t half = (j1 - j0 + 1) / 2;
    for (int64_t r0 = 0; r0 < a->m; r0 += OB_HEAD_ROWS) {
        int64_t r1 = r0 + OB_HEAD_ROWS < a->m ? r0 + OB_HEAD_ROWS : a->m;
        for (int64_t p = 0; p < half; p++) {
            int64_t j = j0 + p, jb = j + half;
            int two = jb < j1;
            const int8_t *w0 = a->w + j * k, *w1 = two ? a->w + jb * k : w0;
            uint32_t cs0 = 0, cs1 = 0; /* 128 * sum(w) of each weight row: from the group's first row */
            for (int64_t r = r0; r < r1; r++) { /* the two weight rows stay in L1 */
                const int8_t *x = a->x + r * a->ldx;
                __m512i s0 = _mm512_setzero_si512(), s1 = s0;
                if (r == r0) {
                    __m512i c0 = s0, c1 = s0;
                    for (int64_t e = 0; e < k64; e += 64) {
                        _mm_prefetch((const char *)(w0 + e) + 1024, _MM_HINT_T0);
                        _mm_prefetch((const char *)(w1 + e) + 1024, _MM_HINT_T0);
                        __m512i xu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(x + e)), flip);
                        __m512i a0 = _mm512_loadu_si512((const void *)(w0 + e));
                        __m512i a1 = _mm512_loadu_si512((const void *)(w1 + e));
                        s0 = _mm512_dpbusd_epi32(s0, xu, a0);
                        c0 = _mm512_dpbusd_epi32(c0, ones, a0);
                        s1 = _mm512_dpbusd_epi32(s1, xu, a1);
                        c1 = _mm512_dpbusd_epi32(c1, ones, a1);
                    }
                    if (tail) {
                        __m512i xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, x + k64), flip);
                        __m512i a0 = _mm512_maskz_loadu_epi8(tail, w0 + k64);
                        __m512i a1 = _mm512_maskz_loadu_epi8(tail, w1 + k64);
                        s0 = _mm512_dpbusd_epi32(s0, xu, a0);
                        c0 = _mm512_dpbusd_epi32(c0, ones, a0);
                        s1 = _mm512_dpbusd_epi32(s1, xu, a1);
                        c1 = _mm512_dpbusd_epi32(c1, ones, a1);
                    }
                    cs0 = 128u * (uint32_t)hsum_z(c0);
                    cs1 = 128u * (uint32_t)hsum_z(c1);
                } else {
                    for (int64_t e = 0; e < k64; e += 64) {
                        __m512i xu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(x + e)), flip);
                        s0 = _mm512_dpbusd_epi32(s0, xu, _mm512_loadu_si512((const void *)(w0 + e)));
                        s1 = _mm512_dpbusd_epi32(s1, xu, _mm512_loadu_si512((const void *)(w1 + e)));
                    }
                    if (tail) {
                        __m512i xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, x + k64), flip);
                        s0 = _mm512_dpbusd_epi32(s0, xu, _mm512_maskz_loadu_epi8(tail, w0 + k64));
                        s1 = _mm512_dpbusd_epi32(s1, xu, _mm512_maskz_loadu_epi8(tail, w1 + k64));
                    }
                }
                int32_t t0 = (int32_t)((uint32_t)hsum_z(s0) - cs0);
                a->out[r * a->n + j] = (float)t0 * a->w_scale[j] * a->x_scale[r];
                if (two) {
                    int32_t t1 = (int32_t)((uint32_t)hsum_z(s1) - cs1);
                    a->out[r * a->n + jb] = (float)t1 * a->w_scale[jb] * a->x_scale[r];
                }
            }
        }
    }
}

/* ---- sparse decode (sparse.c) -----------------------------------------------------------------
 * Row list: the GEMV's two-stream pairing over the listed rows (positions p and p + half). */
#ifndef ROWS_PF
#define ROWS_PF 2 /* pairs ahead whose rows are prefetched */
#endif
AVX2 void ob_avx2_rows(const ob_rows_args *a, int64_t i0, int64_t i1) {
    __m256i bad = _mm256_setzero_si256();
    int64_t half = (i1 - i0) / 2;
    for (int64_t p = 0; p < half; p++) {
        int64_t j = a->rows[i0 + p], jb = a->rows[i0 + half + p];
        int64_t q = p + ROWS_PF < half ? p + ROWS_PF : half - 1;
        const char *r0 = (const char *)(a->w + a->rows[i0 + q] * a->rb);
        const char *r1 = (const char *)(a->w + a->rows[i0 + half + q] * a->rb);
        if (a->layout == OB_LAYOUT_I2) { /* i2: the prefetches spread over the pair's blocks */
            gemv2_i2_avx2_list(a->w + j * a->rb, a->w + jb * a->rb, a->rb, a->xp, a->xsum,
                               a->acc + j, a->acc + jb, &bad, r0, r1);
        } else {
            if (q > p)
                for (int64_t off = 0; off < a->rb; off += 64) {
                    _mm_prefetch(r0 + off, _MM_HINT_T0);
                    _mm_prefetch(r1 + off, _MM_HINT_T0);
                }
            gemv2_t16_avx2(a->w + j * a->rb, a->w + jb * a->rb, a->rb, a->xp, a->xsum, a->acc + j,
                           a->acc + jb, &bad);
        }
    }
    if ((i1 - i0) & 1) {
        int64_t j = a->rows[i1 - 1];
        if (a->layout == OB_LAYOUT_I2)
            row_i2_avx2(a->w + j * a->rb, a->rb, 1, a->xp, 0, &a->xsum, 1, a->acc + j, 0, &bad);
        else
            row_t16_avx2(a->w + j * a->rb, a->rb, 1, a->xp, 0, &a->xsum, 1, a->acc + j, 0, &bad);
    }
}

/* Column-sparse i2 over a transposed copy: nonzero inputs (wt rows) two at a time, CS_G pairs per
 * pass over the sums. A pair's 32-byte blocks are byte-interleaved (unpacklo/hi), so each 16-bit
 * word holds (k1's byte, k2's byte) of one output position; a 16-bit shift by 2j and the 0x03 byte
 * mask give both codes of lane j at once, and vpmaddubsw with the broadcast pair (x1, x2) adds
 * c1*x1 + c2*x2 per output. The int16 sums of the thread's blocks (8 vectors per block, <= 8 KiB)
 * live in L1; each pass loads a block's 8 sums once, adds the CS_G pairs' products in registers
 * and stores them once (one pair per pass was bound by those stores: 18 cycles per pair and block
 * vs ~12 now). The rows of the group CS_PF groups ahead are prefetched one line per two blocks,
 * spread over the pass (a burst of whole rows at once was ~15% slower, cold). int16 holds up to
 * 63 pairs (|.| <= 63*2*2*128 < 2^15), then they are widened into acc. nnz is a multiple of
 * OB_CS_PAD = 2*CS_G (the driver pads with zero values). unpacklo holds byte positions 0-7 | 16-23, unpackhi
 * 8-15 | 24-31 (per 128-bit lane). */
#define CS_G (OB_CS_PAD / 2) /* pairs per pass */
#ifndef CS_PF
#define CS_PF 2      /* groups ahead to prefetch */
#endif
#ifndef CS_HINT
#define CS_HINT _MM_HINT_T0
#endif
#define CS_CHUNK 32  /* blocks per pass (32 x 256 B of int16 sums = 8 KiB) */
#define CS_LANE(v, sh) _mm256_and_si256(_mm256_srli_epi16(v, sh), m3)
AVX2 void ob_avx2_colsparse_i2(const ob_colsparse_args *a, int64_t b0, int64_t b1) {
    const __m256i m3 = _mm256_set1_epi8(3);
    int64_t ngroup = a->nnz / (2 * CS_G), per_flush = 63 / CS_G, rbt = a->rbt;
    _Alignas(32) __m256i s16[CS_CHUNK * 8];
    for (int64_t c0 = b0; c0 < b1; c0 += CS_CHUNK) {
        int64_t c1 = c0 + CS_CHUNK < b1 ? c0 + CS_CHUNK : b1, nbk = c1 - c0;
        const uint8_t *base = a->wt + c0 * OB_BLOCK_BYTES;
        memset(a->acc + c0 * OB_I2_BLOCK, 0, (size_t)(nbk * OB_I2_BLOCK) * sizeof(int32_t));
        for (int64_t g0 = 0; g0 < ngroup; g0 += per_flush) {
            int64_t g1 = g0 + per_flush < ngroup ? g0 + per_flush : ngroup;
            memset(s16, 0, (size_t)nbk * 8 * sizeof(__m256i));
            for (int64_t g = g0; g < g1; g++) {
                const int32_t *ix = a->idx + 2 * CS_G * g;
                const int8_t *xv = a->val + 2 * CS_G * g;
                const int32_t *fx = a->idx + 2 * CS_G * (g + CS_PF < ngroup ? g + CS_PF : ngroup - 1);
                const uint8_t *r[2 * CS_G];
                const char *f[2 * CS_G];
                __m256i bx[CS_G];
                for (int i = 0; i < 2 * CS_G; i++) {
                    r[i] = base + (int64_t)ix[i] * rbt;
                    f[i] = (const char *)(base + (int64_t)fx[i] * rbt);
                }
                for (int i = 0; i < CS_G; i++)
                    bx[i] = _mm256_set1_epi16((int16_t)(uint16_t)((uint8_t)xv[2 * i] |
                                                                  ((uint16_t)(uint8_t)xv[2 * i + 1] << 8)));
                for (int64_t b = 0; b < nbk; b++) {
                    if (!(b & 1))
                        for (int i = 0; i < 2 * CS_G; i++) _mm_prefetch(f[i] + b * OB_BLOCK_BYTES, CS_HINT);
                    __m256i *s = s16 + b * 8;
                    __m256i s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3], s4 = s[4], s5 = s[5], s6 = s[6], s7 = s[7];
                    for (int i = 0; i < CS_G; i++) {
                        __m256i v1 = _mm256_loadu_si256((const __m256i *)(r[2 * i] + b * OB_BLOCK_BYTES));
                        __m256i v2 = _mm256_loadu_si256((const __m256i *)(r[2 * i + 1] + b * OB_BLOCK_BYTES));
                        __m256i lo = _mm256_unpacklo_epi8(v1, v2), hi = _mm256_unpackhi_epi8(v1, v2);
                        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(lo, m3), bx[i]));
                        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(hi, m3), bx[i]));
                        s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(CS_LANE(lo, 2), bx[i]));
                        s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(CS_LANE(hi, 2), bx[i]));
                        s4 = _mm256_add_epi16(s4, _mm256_maddubs_epi16(CS_LANE(lo, 4), bx[i]));
                        s5 = _mm256_add_epi16(s5, _mm256_maddubs_epi16(CS_LANE(hi, 4), bx[i]));
                        s6 = _mm256_add_epi16(s6, _mm256_maddubs_epi16(CS_LANE(lo, 6), bx[i]));
                        s7 = _mm256_add_epi16(s7, _mm256_maddubs_epi16(CS_LANE(hi, 6), bx[i]));
                    }
                    s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3, s[4] = s4, s[5] = s5, s[6] = s6, s[7] = s7;
                }
            }
            for (int64_t b = 0; b < nbk; b++)
                for (int j = 0; j < 4; j++) { /* lane j: outputs 32j + position */
                    int32_t *o = a->acc + (c0 + b) * OB_I2_BLOCK + 32 * j;
                    __m256i lo = s16[b * 8 + 2 * j], hi = s16[b * 8 + 2 * j + 1];
#define CS_ADD(off, v16)                                                                           \
    _mm256_storeu_si256((__m256i *)(o + (off)), _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(o + (off))), \
                                                                _mm256_cvtepi16_epi32(v16)))
                    CS_ADD(0, _mm256_castsi256_si128(lo));
                    CS_ADD(16, _mm256_extracti128_si256(lo, 1));
                    CS_ADD(8, _mm256_castsi256_si128(hi));
                    CS_ADD(24, _mm256_extracti128_si256(hi, 1));
#undef CS_ADD
                }
        }
    }
}
#undef CS_LANE

/* ---- int8 x int8 (8-bit LM head) -------------------------------------------------------------
 * vpmaddubsw(|w|, sign(x, w)) = w*x pair sums (|.| <= 2*127*127 < 2^15: x is never -128), then
 * vpmaddwd to int32. Two weight rows per pass (j and j + half: two distant streams) share the
 * activation loads; tail bytes scalar. */
AVX2 void ob_avx2_linear_i8(const ob_i8_args *a, int64_t j0, int64_t j1) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t k = a->k, k32 = k / 32 * 32;
    int64_t half = (j1 - j0 + 1) / 2; /* rows j and j + half: two distant weight streams */
    for (int64_t r0 = 0; r0 < a->m; r0 += OB_HEAD_ROWS) {
        int64_t r1 = r0 + OB_HEAD_ROWS < a->m ? r0 + OB_HEAD_ROWS : a->m;
        for (int64_t p = 0; p < half; p++) {
            int64_t j = j0 + p, jb = j + half;
            int two = jb < j1;
            const int8_t *w0 = a->w + j * k, *w1 = two ? a->w + jb * k : w0;
            for (int64_t r = r0; r < r1; r++) { /* the two weight rows stay in L1 */
                const int8_t *x = a->x + r * a->ldx;
                __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
                for (int64_t e = 0; e < k32; e += 32) {
                    _mm_prefetch((const char *)(w0 + e) + 1024, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + e) + 1024, _MM_HINT_T0);
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(x + e));
                    __m256i a0 = _mm256_loadu_si256((const __m256i *)(w0 + e));
                    __m256i a1 = _mm256_loadu_si256((const __m256i *)(w1 + e));
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(
                        _mm256_sign_epi8(a0, a0), _mm256_sign_epi8(xv, a0)), ones));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(
                        _mm256_sign_epi8(a1, a1), _mm256_sign_epi8(xv, a1)), ones));
                }
                int32_t t0 = hsum_avx2(s0), t1 = hsum_avx2(s1);
                for (int64_t e = k32; e < k; e++) {
                    t0 += w0[e] * x[e];
                    t1 += w1[e] * x[e];
                }
                a->out[r * a->n + j] = (float)t0 * a->w_scale[j] * a->x_scale[r];
                if (two) a->out[r * a->n + jb] = (float)t1 * a->w_scale[jb] * a->x_scale[r];
            }
        }
    }
}

/* ---- 4-bit x int8 (4-bit LM head): u = q + 8 unsigned times signed x, minus 8 * sum(x) --------
 * Per 32-byte block: low nibbles x[0:32], high nibbles x[32:64]; int16 pair sums <= 2*15*127, four
 * blocks (8 products per lane) <= 30480 before widening. x arrives zero-padded to whole blocks. */
AVX2 void ob_avx2_linear_i4(const ob_i8_args *a, int64_t j0, int64_t j1) {
    const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const uint8_t *wb = (const uint8_t *)a->w;
    int64_t nblk = (a->k + 63) / 64, rb = nblk * 32;
    int64_t half = (j1 - j0 + 1) / 2; /* rows j and j + half: two distant weight streams */
    for (int64_t r0 = 0; r0 < a->m; r0 += OB_HEAD_ROWS) {
        int64_t r1 = r0 + OB_HEAD_ROWS < a->m ? r0 + OB_HEAD_ROWS : a->m;
        int32_t xsums[OB_HEAD_ROWS];
        for (int64_t r = r0; r < r1; r++) {
            int32_t xsum = 0;
            for (int64_t e = 0; e < a->k; e++) xsum += a->x[r * a->ldx + e];
            xsums[r - r0] = xsum;
        }
        for (int64_t p = 0; p < half; p++) {
            int64_t j = j0 + p, jb = j + half;
            int two = jb < j1;
            const uint8_t *w = wb + j * rb, *w1 = two ? wb + jb * rb : w;
            for (int64_t r = r0; r < r1; r++) { /* the two weight rows stay in L1 */
                const int8_t *x = a->x + r * a->ldx;
                int32_t xsum = xsums[r - r0];
                __m256i acc = _mm256_setzero_si256(), acc1 = acc;
                for (int64_t b0 = 0; b0 < nblk; b0 += 4) {
                    int64_t b1 = b0 + 4 < nblk ? b0 + 4 : nblk;
                    __m256i s16 = _mm256_setzero_si256(), t16 = s16;
                    for (int64_t b = b0; b < b1; b++) {
                        _mm_prefetch((const char *)(w + b * 32) + 1024, _MM_HINT_T0);
                        _mm_prefetch((const char *)(w1 + b * 32) + 1024, _MM_HINT_T0);
                        __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + b * 64));
                        __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + b * 64 + 32));
                        __m256i v = _mm256_loadu_si256((const __m256i *)(w + b * 32));
                        __m256i u = _mm256_loadu_si256((const __m256i *)(w1 + b * 32));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(v, m15), x0));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), m15), x1));
                        t16 = _mm256_add_epi16(t16, _mm256_maddubs_epi16(_mm256_and_si256(u, m15), x0));
                        t16 = _mm256_add_epi16(t16, _mm256_maddubs_epi16(
                            _mm256_and_si256(_mm256_srli_epi16(u, 4), m15), x1));
                    }
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16, ones));
                    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(t16, ones));
                }
                int32_t t = (int32_t)((uint32_t)hsum_avx2(acc) - 8u * (uint32_t)xsum);
                a->out[r * a->n + j] = (float)t * a->w_scale[j] * a->x_scale[r];
                if (two) {
                    int32_t t1 = (int32_t)((uint32_t)hsum_avx2(acc1) - 8u * (uint32_t)xsum);
                    a->out[r * a->n + jb] = (float)t1 * a->w_scale[jb] * a->x_scale[r];
                }
            }
        }
    }
}

/* ---- float16 x float32 (fp16 LM head): F16C widening, FMA, 4 accumulators per row ---------- */
__attribute__((target("avx2,fma,f16c"))) void ob_avx2_linear_f16(const ob_f16_args *a, int64_t j0,
                                                                 int64_t j1) {
    int64_t k = a->k, k32 = k / 32 * 32;
    for (int64_t r0 = 0; r0 < a->m; r0 += OB_HEAD_ROWS) {
        int64_t r1 = r0 + OB_HEAD_ROWS < a->m ? r0 + OB_HEAD_ROWS : a->m;
        for (int64_t j = j0; j < j1; j++) {
            const uint16_t *w = a->w + j * k;
            for (int64_t r = r0; r < r1; r++) { /* the weight row stays in L1 */
                const float *x = a->x + r * a->ldx;
                __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                for (int64_t e = 0; e < k32; e += 32) {
                    _mm_prefetch((const char *)(w + e) + 1024, _MM_HINT_T0);
                    s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + e))),
                                         _mm256_loadu_ps(x + e), s0);
                    s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + e + 8))),
                                         _mm256_loadu_ps(x + e + 8), s1);
                    s2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + e + 16))),
                                         _mm256_loadu_ps(x + e + 16), s2);
                    s3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + e + 24))),
                                         _mm256_loadu_ps(x + e + 24), s3);
                }
                __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                float t = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
                for (int64_t e = k32; e < k; e++) t += ob_half_to_float(w[e]) * x[e];
                a->out[r * a->n + j] = t;
            }
        }
    }
}

/* ---- read probe: 128 bytes per step in four independent 256-bit loads ----------------------- */
AVX2 uint64_t ob_avx2_read_sum(const uint8_t *p, int64_t bytes) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 128 <= bytes; i += 128) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, s0);
    uint64_t s = v[0] + v[1] + v[2] + v[3];
    for (; i + 8 <= bytes; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        s += w;
    }
    return s;
}

/* ---- activation quantizer (RMSNorm + per-token absmax INT8), bit-identical to ref.c ---------- */

INLINE AVX2 __m256 load_tail(const float *p, int64_t n) { /* n < 8 floats, zeros after */
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx));
}

/* 1 / sqrt(mean(x^2) + eps) of a row, summed in lanes e mod 8 and combined as ob_sumsq_ref does */
INLINE AVX2 float inv_rms_avx2(const float *xr, int64_t k, float eps) {
    int64_t k8 = k / 8 * 8;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t e = 0; e < k8; e += 8) {
        __m256 v = _mm256_loadu_ps(xr + e);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    if (k8 < k) {
        __m256 v = load_tail(xr + k8, k - k8);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    __m128 t = _mm_add_ps(q, _mm_movehl_ps(q, q));
    float ss = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
    return 1.0f / sqrtf(ss / (float)k + eps);
}

/* o[e] = clamp(round_half_even(y[e] * s), lo, hi) for e < k, y = (x * inv_rms) * w (or x
 * without a norm weight): 32 at a time, then the tail as ref.c does it */
INLINE AVX2 void store_codes_avx2(const float *xr, const float *norm_weight, float inv_rms,
                                     float s, float lo_, float hi_, int64_t k, int8_t *o) {
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(lo_), hi = _mm256_set1_ps(hi_);
    const __m256 vinv = _mm256_set1_ps(inv_rms);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t e = 0;
    for (; e + 32 <= k; e += 32) {
        __m256i q[4];
        for (int i = 0; i < 4; i++) {
            __m256 y = _mm256_loadu_ps(xr + e + 8 * i);
            if (norm_weight) y = _mm256_mul_ps(_mm256_mul_ps(y, vinv), _mm256_loadu_ps(norm_weight + e + 8 * i));
            y = _mm256_round_ps(_mm256_mul_ps(y, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, lo), hi));
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(o + e), _mm256_permutevar8x32_epi32(p, order));
    }
    for (; e < k; e++) {
        float y = norm_weight ? (xr[e] * inv_rms) * norm_weight[e] : xr[e];
        float qf = nearbyintf(y * s);
        o[e] = (int8_t)(qf < lo_ ? lo_ : (qf > hi_ ? hi_ : qf));
    }
}

/* y of element e of a row as 8 lanes, RMSNorm'd when there is a norm weight (the quantizers) */
#define OB_YV(e, v) (norm_weight ? _mm256_mul_ps(_mm256_mul_ps(v, vinv), \
                                                 _mm256_loadu_ps(norm_weight + (e))) : (v))

AVX2 int ob_avx2_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                                 const float *norm_weight, float norm_eps, int8_t *out,
                                 float *out_scale) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    int64_t k8 = k / 8 * 8;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float inv_rms = norm_weight ? inv_rms_avx2(xr, k, norm_eps) : 1.0f;
        const __m256 vinv = _mm256_set1_ps(inv_rms);
        __m256 amax = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
        for (int64_t e = 0; e < k8; e += 8) {
            __m256 a = _mm256_and_ps(OB_YV(e, _mm256_loadu_ps(xr + e)), absmask);
            amax = _mm256_max_ps(amax, a);
            nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
        }
        float amax_s = 0.0f;
        for (int64_t e = k8; e < k; e++) {
            float y = norm_weight ? (xr[e] * inv_rms) * norm_weight[e] : xr[e];
            if (!isfinite(y)) return OB_ERR_VALUE;
            amax_s = fmaxf(amax_s, fabsf(y));
        }
        if (!_mm256_testz_ps(nonfinite, nonfinite)) return OB_ERR_VALUE;
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        amax_s = fmaxf(amax_s, _mm_cvtss_f32(h));
        float s = (1.0f / fmaxf(amax_s, 1e-5f)) * 127.0f;
        store_codes_avx2(xr, norm_weight, inv_rms, s, -128.0f, 127.0f, k, out + r * k);
        out_scale[r] = 1.0f / s;
    }
    return OB_OK;
}

/* BitNet a4.8's INT4 absmean quantizer (sparse.c's scalar loop is the spec), bit-identical to it:
 * the same RMSNorm (ob_sumsq_ref's lane order), mean|y| summed in double in lanes e mod 4
 * (ob_abssum4_ref's order), round half to even, clamp to [-8, 7]. */
AVX2 int ob_avx2_quantize_act_i4(const float *x, int64_t m, int64_t k, int64_t ldx,
                                 const float *norm_weight, float norm_eps, int8_t *out,
                                 float *out_scale) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    const float sqrt7 = (float)2.6457513110645907; /* (float)math.sqrt(7), as torch casts it */
    int64_t k8 = k / 8 * 8;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float inv_rms = norm_weight ? inv_rms_avx2(xr, k, norm_eps) : 1.0f;
        const __m256 vinv = _mm256_set1_ps(inv_rms);
        __m256d sum = _mm256_setzero_pd(); /* lane l: |y[e]| for e = l mod 4, in order */
        __m256 nonfinite = _mm256_setzero_ps();
        for (int64_t e = 0; e < k8; e += 8) {
            __m256 a = _mm256_and_ps(OB_YV(e, _mm256_loadu_ps(xr + e)), absmask);
            nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
        }
        if (!_mm256_testz_ps(nonfinite, nonfinite)) return OB_ERR_VALUE;
        double p[4];
        _mm256_storeu_pd(p, sum);
        for (int64_t e = k8; e < k; e++) { /* k8 is a multiple of 4: lane e mod 4 goes on */
            float y = norm_weight ? (xr[e] * inv_rms) * norm_weight[e] : xr[e];
            if (!isfinite(y)) return OB_ERR_VALUE;
            p[e % 4] += fabsf(y);
        }
        float beta = (float)((p[0] + p[2]) + (p[1] + p[3])) / (float)k;
        float s = (1.0f / (beta + 1e-5f)) * sqrt7;
        store_codes_avx2(xr, norm_weight, inv_rms, s, -8.0f, 7.0f, k, out + r * k);
        out_scale[r] = beta / sqrt7;
    }
    return OB_OK;
}
#undef OB_YV

#endif /* OB_HAVE_X86 */
