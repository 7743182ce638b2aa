/* Lookup-table variant "avx2_lut" (T-MAC / bitnet.cpp TL1-style, vpshufb), selected by name only.
 *
 * Scope: the i2 layout with m < 8 activation rows (decode / GEMV). For m >= 8 (prefill) and for
 * the t1_6 layout it delegates to the multiply-add kernels of x86.c (ob_avx2_gemm_i2/t1_6): a LUT
 * only pays off when one table serves many weight rows and few activation rows.
 *
 * Scheme (g = 2, exact int16 table split in two byte tables):
 *  - Group size 2: an i2 byte holds codes (c[p], c[p+32]) in its low nibble and (c[p+64],
 *    c[p+96]) in its high nibble, so each nibble, as it is on disk, is a 4-bit index n = ca + 4 cb
 *    (9 valid combinations; code 3 entries are never used for a valid row).
 *  - Table, per activation row and per pair of activations (xa, xb):
 *        v[n] = (ca - 1) xa + (cb - 1) xb,  |v| <= 256  (needs 10 bits: an int8 table would lose)
 *    stored exactly as two vpshufb byte tables  L = v & 31 (0..31)  and  H = v >> 5 (-8..8),
 *    v = 32 H + L.
 *  - vpshufb needs the 16 index bytes of a 128-bit lane to share one table (one activation pair),
 *    i.e. 16 *different weight rows* at the same k position. The on-disk i2 row is the opposite
 *    (32 consecutive k positions of one row), so the kernel transposes 16 rows x 32 bytes of a block
 *    in-lane (4 rounds of punpck{l,h}bw, 4 shuffles per output vector) into "LUT vectors": lane 0
 *    byte r = row r at byte p, lane 1 byte r = row r at byte p + 16 (p = 0..15). The four tables
 *    of a LUT vector are (L, H) x (low nibble, high nibble), each with lane 0 = table of pair
 *    (p, p+32) [(p+64, p+96) for the high nibble] and lane 1 = pair (p+16, p+48) [(p+80, p+112)].
 *  - Inner loop per LUT vector (16 rows x 128 weights): idx_lo = w & 15, idx_hi = (w >> 4) & 15,
 *    4 vpshufb, 4 byte adds into L/H accumulators. L (u8) sums 4 vectors (<= 4*62 = 248),
 *    H (s8) sums 4 vectors (|.| <= 64), then vpmaddubsw against (1,0)/(0,1) and (32,0)/(0,32)
 *    widens even/odd rows to int16 accumulators (multiplier ports are otherwise idle here), exact
 *    for 32 vectors (|.| <= 32 * 512); after each chunk of 2 blocks the int16 sums go to int32.
 *  - Loop order: chunks of blocks outer (8/4/2 blocks for m = 1/2/3+, so that the tables, 2 KiB
 *    per block and activation row, stay in L1), 16-row tiles inner (weights read in column walks);
 *    m = 2 rows share each weight load and index computation.
 *  - Code 3 is detected on the transposed bytes (v & v >> 1 & 0x55, as in x86.c).
 *
 * Measured (bench/lut_vs_mad.py, Zen 3 EPYC, 2 shared cores): slower than the multiply-add
 * kernel everywhere. As shipped (transposition in the call) 1.4-2.2x its time at m = 1 and
 * ~2.1-2.4x at m = 4; even with the transposition moved to load time (ob_avx2lut_repack_i2) the
 * inner loop is 1.10-1.19x at m = 1 and 1.7-2.1x at m = 4. Why: vpmaddubsw already does 32
 * multiply-adds per instruction on 2-bit codes decoded with one and/shift each, so a lookup saves
 * only the decode; an exact (two byte-table) lookup costs 2 vpshufb per 32 weight pairs per row,
 * the transposition 4 more shuffles per 128 weights, and every activation row needs its own
 * lookups and accumulators (MAD: 2 ops per 32 weights per extra row).
 *
 * Tables are built per call and per thread (each thread builds all of them: the ob_gemm_fn
 * contract has no shared per-call scratch), cost ~ 40 vector ops per 128 activations.
 *
 * For measurement only (bench/lut_vs_mad.py, not part of the ABI): ob_avx2lut_repack_i2 does the
 * transposition once, ahead of time, into chunk-major LUT vectors (checking every byte), and
 * ob_avx2lut_gemv_repacked runs the same inner loop on them without the in-call transposition
 * and code check: the speed a load-time repack would give. */
#include "internal.h"

#ifdef OB_HAVE_X86
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

#define LUT_MIN_M 8    /* from here on the panel GEMM of x86.c */
#define NT 16          /* weight rows per tile (bytes per 128-bit lane) */
#define CB 2           /* blocks per chunk: 32 LUT vectors, the int16 accumulators' limit */
#define VEC_PER_BLK 16 /* LUT vectors per block and tile */
#define TAB_BYTES 128  /* 4 tables x 32 bytes per LUT vector */

/* ---- tables -------------------------------------------------------------------------------- */

/* One pair's 16 entries as int16: v[n] = (n&3 - 1) xa + (n>>2 - 1) xb (code 3 acts as +1). */
INLINE AVX2 __m256i pair_entries(int xa, int xb) {
    const __m256i A = _mm256_setr_epi16(-1, 0, 1, 1, -1, 0, 1, 1, -1, 0, 1, 1, -1, 0, 1, 1);
    const __m256i B = _mm256_setr_epi16(-1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm256_add_epi16(_mm256_sign_epi16(_mm256_set1_epi16((short)xa), A),
                            _mm256_sign_epi16(_mm256_set1_epi16((short)xb), B));
}

/* Byte tables (lane 0: pair g0, lane 1: pair g1) for L = v & 31 and H = v >> 5. */
INLINE AVX2 void pair_tables(__m256i v0, __m256i v1, __m256i *tl, __m256i *th) {
    const __m256i m31 = _mm256_set1_epi16(31);
    __m256i l = _mm256_packs_epi16(_mm256_and_si256(v0, m31), _mm256_and_si256(v1, m31));
    __m256i h = _mm256_packs_epi16(_mm256_srai_epi16(v0, 5), _mm256_srai_epi16(v1, 5));
    *tl = _mm256_permute4x64_epi64(l, 0xD8);
    *th = _mm256_permute4x64_epi64(h, 0xD8);
}

/* tab[(b * 16 + p) * 4 + {L_lo, H_lo, L_hi, H_hi}] for the activation row x (kp values). */
static AVX2 void build_tables(const int8_t *x, int64_t nblk, __m256i *tab) {
    for (int64_t b = 0; b < nblk; b++) {
        const int8_t *xb = x + b * OB_I2_BLOCK;
        for (int p = 0; p < 16; p++) {
            __m256i *t = tab + (b * VEC_PER_BLK + p) * 4;
            pair_tables(pair_entries(xb[p], xb[p + 32]), pair_entries(xb[p + 16], xb[p + 48]), &t[0], &t[1]);
            pair_tables(pair_entries(xb[p + 64], xb[p + 96]), pair_entries(xb[p + 80], xb[p + 112]), &t[2], &t[3]);
        }
    }
}

/* ---- weights: 16 rows x 1 block -> 16 LUT vectors ------------------------------------------- */

/* One round of the perfect shuffle: out[2i], out[2i+1] = interleave(in[i], in[i + 8]). Four
 * rounds transpose each 16x16 byte lane: lane 0 of out[p] byte r = in[r] byte p, lane 1 = byte
 * p + 16. Written out so that the compiler keeps the 16 vectors in registers as far as it can. */
#define PS_ROUND(o, i)                                                                        \
    do {                                                                                      \
        o##0 = _mm256_unpacklo_epi8(i##0, i##8);   o##1 = _mm256_unpackhi_epi8(i##0, i##8);   \
        o##2 = _mm256_unpacklo_epi8(i##1, i##9);   o##3 = _mm256_unpackhi_epi8(i##1, i##9);   \
        o##4 = _mm256_unpacklo_epi8(i##2, i##10);  o##5 = _mm256_unpackhi_epi8(i##2, i##10);  \
        o##6 = _mm256_unpacklo_epi8(i##3, i##11);  o##7 = _mm256_unpackhi_epi8(i##3, i##11);  \
        o##8 = _mm256_unpacklo_epi8(i##4, i##12);  o##9 = _mm256_unpackhi_epi8(i##4, i##12);  \
        o##10 = _mm256_unpacklo_epi8(i##5, i##13); o##11 = _mm256_unpackhi_epi8(i##5, i##13); \
        o##12 = _mm256_unpacklo_epi8(i##6, i##14); o##13 = _mm256_unpackhi_epi8(i##6, i##14); \
        o##14 = _mm256_unpacklo_epi8(i##7, i##15); o##15 = _mm256_unpackhi_epi8(i##7, i##15); \
    } while (0)

/* 16 rows (row r at src + r * rb), one block -> 16 LUT vectors out[0..15]; bad |= code-3 bits. */
INLINE AVX2 void tile_block(const uint8_t *src, int64_t rb, __m256i *out, __m256i *bad) {
#define LD(r) _mm256_loadu_si256((const __m256i *)(src + (r) * rb))
    __m256i a0 = LD(0), a1 = LD(1), a2 = LD(2), a3 = LD(3), a4 = LD(4), a5 = LD(5), a6 = LD(6), a7 = LD(7);
    __m256i a8 = LD(8), a9 = LD(9), a10 = LD(10), a11 = LD(11), a12 = LD(12), a13 = LD(13), a14 = LD(14), a15 = LD(15);
#undef LD
    __m256i b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15;
    PS_ROUND(b, a);
    PS_ROUND(a, b);
    PS_ROUND(b, a);
    PS_ROUND(a, b);
    /* code 3 = both bits of a 2-bit field set; checked on the transposed bytes (same bytes) */
    __m256i t = _mm256_or_si256(
        _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(a0, _mm256_srli_epi16(a0, 1)), _mm256_and_si256(a1, _mm256_srli_epi16(a1, 1))),
                        _mm256_or_si256(_mm256_and_si256(a2, _mm256_srli_epi16(a2, 1)), _mm256_and_si256(a3, _mm256_srli_epi16(a3, 1)))),
        _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(a4, _mm256_srli_epi16(a4, 1)), _mm256_and_si256(a5, _mm256_srli_epi16(a5, 1))),
                        _mm256_or_si256(_mm256_and_si256(a6, _mm256_srli_epi16(a6, 1)), _mm256_and_si256(a7, _mm256_srli_epi16(a7, 1)))));
    t = _mm256_or_si256(t, _mm256_or_si256(
        _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(a8, _mm256_srli_epi16(a8, 1)), _mm256_and_si256(a9, _mm256_srli_epi16(a9, 1))),
                        _mm256_or_si256(_mm256_and_si256(a10, _mm256_srli_epi16(a10, 1)), _mm256_and_si256(a11, _mm256_srli_epi16(a11, 1)))),
        _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(a12, _mm256_srli_epi16(a12, 1)), _mm256_and_si256(a13, _mm256_srli_epi16(a13, 1))),
                        _mm256_or_si256(_mm256_and_si256(a14, _mm256_srli_epi16(a14, 1)), _mm256_and_si256(a15, _mm256_srli_epi16(a15, 1))))));
    *bad = _mm256_or_si256(*bad, t);
    _mm256_store_si256(out + 0, a0);   _mm256_store_si256(out + 1, a1);   _mm256_store_si256(out + 2, a2);
    _mm256_store_si256(out + 3, a3);   _mm256_store_si256(out + 4, a4);   _mm256_store_si256(out + 5, a5);
    _mm256_store_si256(out + 6, a6);   _mm256_store_si256(out + 7, a7);   _mm256_store_si256(out + 8, a8);
    _mm256_store_si256(out + 9, a9);   _mm256_store_si256(out + 10, a10); _mm256_store_si256(out + 11, a11);
    _mm256_store_si256(out + 12, a12); _mm256_store_si256(out + 13, a13); _mm256_store_si256(out + 14, a14);
    _mm256_store_si256(out + 15, a15);
}

/* Rows j..j+nr-1 (nr <= 16; missing rows read as 0x55 = all zeros), blocks [b0, b0+nb), into
 * out[(b - b0) * 16 + p]; bad |= invalid-code bits. */
static __attribute__((noinline)) AVX2 void load_tile(const uint8_t *w, int64_t rb, int nr, int64_t b0,
                                                     int nb, __m256i *out, __m256i *bad) {
    if (nr == NT) {
        for (int bi = 0; bi < nb; bi++)
            tile_block(w + (b0 + bi) * OB_BLOCK_BYTES, rb, out + bi * VEC_PER_BLK, bad);
        return;
    }
    _Alignas(32) uint8_t rows[NT * OB_BLOCK_BYTES]; /* edge tile: pad with zero rows */
    memset(rows, 0x55, sizeof rows);
    for (int bi = 0; bi < nb; bi++) {
        for (int r = 0; r < nr; r++)
            memcpy(rows + r * OB_BLOCK_BYTES, w + r * rb + (b0 + bi) * OB_BLOCK_BYTES, OB_BLOCK_BYTES);
        tile_block(rows, OB_BLOCK_BYTES, out + bi * VEC_PER_BLK, bad);
    }
}

/* ---- inner loop: one tile x R (1 or 2) activation rows x nvec (<= 32, multiple of 4) vectors - */

/* Adds the int16 even/odd-row sums of acc_e/acc_o (both lanes) to out[0..nr). */
INLINE AVX2 void store_rows(__m256i acc_e, __m256i acc_o, int32_t *out, int nr) {
    /* word i of acc_e: row 2i (lane 0: byte p, lane 1: byte p + 16); acc_o: row 2i + 1 */
    __m256i e = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_e)),
                                 _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_e, 1)));
    __m256i o = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_o)),
                                 _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_o, 1)));
    __m256i lo = _mm256_unpacklo_epi32(e, o), hi = _mm256_unpackhi_epi32(e, o); /* rows 0-3,8-11 | 4-7,12-15 */
    __m256i r0 = _mm256_permute2x128_si256(lo, hi, 0x20), r1 = _mm256_permute2x128_si256(lo, hi, 0x31);
    if (nr == NT) {
        _mm256_storeu_si256((__m256i *)out, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)out), r0));
        _mm256_storeu_si256((__m256i *)(out + 8), _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(out + 8)), r1));
    } else {
        _Alignas(32) int32_t tmp[NT];
        _mm256_store_si256((__m256i *)tmp, r0);
        _mm256_store_si256((__m256i *)(tmp + 8), r1);
        for (int r = 0; r < nr; r++) out[r] += tmp[r];
    }
}

/* One tile x R activation rows x nvec (<= 32, a multiple of 4) LUT vectors; tab[i]: the tables
 * of activation row i from the first vector on, out[i]: its 16 outputs. Not inlined: one
 * function per R gets its own register allocation (R = 2 shares the weight loads and indices). */
#define DEFINE_CORE(NAME, R)                                                                        \
    static __attribute__((noinline)) AVX2 void NAME(const __m256i *wv, const __m256i *const *tab,  \
                                                    int nvec, int32_t *const *out, int nr) {       \
        const __m256i m15 = _mm256_set1_epi8(15);                                                   \
        __m256i acc_e[R], acc_o[R];                                                                 \
        const __m256i *t[R];                                                                        \
        for (int i = 0; i < R; i++) {                                                               \
            acc_e[i] = acc_o[i] = _mm256_setzero_si256();                                           \
            t[i] = tab[i];                                                                          \
        }                                                                                           \
        for (int v = 0; v < nvec; v += 4) {                                                         \
            __m256i L[R], H[R];                                                                     \
            for (int i = 0; i < R; i++) L[i] = H[i] = _mm256_setzero_si256();                      \
            for (int u = 0; u < 4; u++) {                                                           \
                __m256i w = _mm256_load_si256(wv + v + u);                                          \
                __m256i ilo = _mm256_and_si256(w, m15);                                             \
                __m256i ihi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m15);                       \
                for (int i = 0; i < R; i++) {                                                       \
                    const __m256i *ti = t[i] + (v + u) * 4;                                         \
                    __m256i l = _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(ti + 0), ilo), \
                                                _mm256_shuffle_epi8(_mm256_load_si256(ti + 2), ihi)); \
                    __m256i h = _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(ti + 1), ilo), \
                                                _mm256_shuffle_epi8(_mm256_load_si256(ti + 3), ihi)); \
                    L[i] = _mm256_add_epi8(L[i], l);                                                \
                    H[i] = _mm256_add_epi8(H[i], h);                                                \
                }                                                                                   \
            }                                                                                       \
            for (int i = 0; i < R; i++) {                                                           \
                acc_e[i] = _mm256_add_epi16(acc_e[i], _mm256_add_epi16(                             \
                    _mm256_maddubs_epi16(L[i], _mm256_set1_epi16(0x0001)),                          \
                    _mm256_maddubs_epi16(_mm256_set1_epi16(0x0020), H[i])));                        \
                acc_o[i] = _mm256_add_epi16(acc_o[i], _mm256_add_epi16(                             \
                    _mm256_maddubs_epi16(L[i], _mm256_set1_epi16(0x0100)),                          \
                    _mm256_maddubs_epi16(_mm256_set1_epi16(0x2000), H[i])));                        \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < R; i++) store_rows(acc_e[i], acc_o[i], out[i], nr);                     \
    }
DEFINE_CORE(lut_core1, 1)
DEFINE_CORE(lut_core2, 2)

/* ---- driver -------------------------------------------------------------------------------- */

/* Columns [j0, j1) (j0 a multiple of 16 when pre is set) for m rows. pre: chunk-major LUT vectors
 * from ob_avx2lut_repack_i2 (NULL: transpose a->w in the call). */
static AVX2 int lut_gemv(const ob_gemm_args *a, int64_t j0, int64_t j1, const __m256i *pre) {
    int64_t m = a->m, rb = a->rb, nblk = rb / OB_BLOCK_BYTES, ntile_all = (a->n + NT - 1) / NT;
    size_t tab_vecs = (size_t)(nblk * VEC_PER_BLK * 4);
    __m256i *tab = (__m256i *)aligned_alloc(64, (size_t)m * tab_vecs * sizeof(__m256i));
    if (!tab) return OB_ERR_NOMEM;
    for (int64_t r = 0; r < m; r++) {
        build_tables(a->xp + r * a->ldxp, nblk, tab + r * tab_vecs);
        for (int64_t j = j0; j < j1; j++) a->acc[r * a->ldc + j] = 0;
    }
    __m256i bad = _mm256_setzero_si256();
    /* blocks per chunk: the tables of a chunk (m x chunk x 2 KiB) stay in L1; the repacked layout
     * is fixed at CB */
    int cbc = pre ? CB : (m == 1 ? 8 : m == 2 ? 4 : CB);
    _Alignas(64) __m256i buf[8 * VEC_PER_BLK];
    for (int64_t b0 = 0; b0 < nblk; b0 += cbc) {
        int nb = (int)(nblk - b0 < cbc ? nblk - b0 : cbc);
        for (int64_t j = j0; j < j1; j += NT) {
            int nr = (int)(j1 - j < NT ? j1 - j : NT);
            const __m256i *wv;
            if (pre) /* chunk-major: [chunk b0][tile][nb * 16 vectors] */
                wv = pre + (b0 * ntile_all + (j / NT) * nb) * VEC_PER_BLK;
            else {
                load_tile(a->w + j * rb, rb, nr, b0, nb, buf, &bad);
                wv = buf;
            }
            for (int sb = 0; sb < nb; sb += CB) { /* int16 accumulators: CB blocks at a time */
                int ns = nb - sb < CB ? nb - sb : CB;
                for (int64_t r = 0; r < m; r += 2) {
                    int R = m - r < 2 ? 1 : 2;
                    const __m256i *t[2];
                    int32_t *o[2];
                    for (int i = 0; i < R; i++) {
                        t[i] = tab + (r + i) * tab_vecs + (b0 + sb) * VEC_PER_BLK * 4;
                        o[i] = a->acc + (r + i) * a->ldc + j;
                    }
                    if (R == 2) lut_core2(wv + sb * VEC_PER_BLK, t, ns * VEC_PER_BLK, o, nr);
                    else lut_core1(wv + sb * VEC_PER_BLK, t, ns * VEC_PER_BLK, o, nr);
                }
            }
        }
    }
    free(tab);
    bad = _mm256_and_si256(bad, _mm256_set1_epi8(0x55));
    return _mm256_testz_si256(bad, bad) ? OB_OK : OB_ERR_CORRUPT;
}

AVX2 int ob_avx2lut_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1) {
    if (a->m >= LUT_MIN_M) return ob_avx2_gemm_i2(a, j0, j1); /* prefill: multiply-add panel GEMM */
    return lut_gemv(a, j0, j1, NULL);
}

/* t1_6 (5 trits per byte, no nibble structure): the multiply-add kernel. */
int ob_avx2lut_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1) { return ob_avx2_gemm_t1_6(a, j0, j1); }

/* ---- measurement entry points (bench/lut_vs_mad.py; not in onebit_kernels.h) ---------------- */

/* Bytes ob_avx2lut_repack_i2 writes for n rows of k inputs. */
int64_t ob_avx2lut_repacked_bytes(int64_t n, int64_t k) {
    return (n + NT - 1) / NT * NT * ob_packed_row_bytes(k, OB_LAYOUT_I2);
}

/* w [n, rb] on-disk i2 -> out (64-byte aligned, ob_avx2lut_repacked_bytes): chunk-major LUT
 * vectors. OB_ERR_CORRUPT if any byte holds code 3. */
AVX2 int ob_avx2lut_repack_i2(const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
    int64_t rb = ob_packed_row_bytes(k, OB_LAYOUT_I2), nblk = rb / OB_BLOCK_BYTES, ntile = (n + NT - 1) / NT;
    __m256i bad = _mm256_setzero_si256(), *o = (__m256i *)out;
    for (int64_t b0 = 0; b0 < nblk; b0 += CB) {
        int nb = (int)(nblk - b0 < CB ? nblk - b0 : CB);
        for (int64_t t = 0; t < ntile; t++) {
            int nr = (int)(n - t * NT < NT ? n - t * NT : NT);
            load_tile(w + t * NT * rb, rb, nr, b0, nb, o, &bad);
            o += nb * VEC_PER_BLK;
        }
    }
    bad = _mm256_and_si256(bad, _mm256_set1_epi8(0x55));
    return _mm256_testz_si256(bad, bad) ? OB_OK : OB_ERR_CORRUPT;
}

typedef struct {
    ob_gemm_args a;
    const __m256i *pre;
    int status[256];
} rp_job;

static void rp_task(void *ctx, int t, int nt) {
    rp_job *J = (rp_job *)ctx;
    int64_t n = J->a.n, per = ((n + nt - 1) / nt + NT - 1) / NT * NT; /* as dispatch.c splits */
    int64_t j0 = t * per, j1 = j0 + per < n ? j0 + per : n;
    J->status[t] = j0 < j1 ? lut_gemv(&J->a, j0, j1, J->pre) : OB_OK;
}

/* acc [m, n] = x [m, k] (int8, row stride ldx, m < 8) . W^T from repacked weights; threads as
 * ob_gemm_i2 uses them. Includes padding x and building the tables, as ob_gemm_i2 does. */
int ob_avx2lut_gemv_repacked(const uint8_t *wr, int64_t n, int64_t k, const int8_t *x, int64_t m,
                             int64_t ldx, int32_t *acc) {
    if (!wr || !x || !acc) return OB_ERR_NULL;
    if (n < 1 || k < 1 || m < 1 || m >= LUT_MIN_M || k > OB_MAX_K) return OB_ERR_SIZE;
    if ((uintptr_t)wr % 64) return OB_ERR_VALUE;
    int64_t rb = ob_packed_row_bytes(k, OB_LAYOUT_I2), kp = rb / OB_BLOCK_BYTES * OB_I2_BLOCK;
    int64_t ldxp = (kp + 63) / 64 * 64;
    int8_t *xp = (int8_t *)aligned_alloc(64, (size_t)(m * ldxp));
    if (!xp) return OB_ERR_NOMEM;
    for (int64_t r = 0; r < m; r++) {
        memcpy(xp + r * ldxp, x + r * ldx, (size_t)k);
        memset(xp + r * ldxp + k, 0, (size_t)(ldxp - k));
    }
    rp_job J = {{NULL, n, k, kp, rb, xp, m, ldxp, NULL, NULL, acc, n}, (const __m256i *)wr, {0}};
    int64_t want = n * k * m / ((int64_t)1 << 17); /* as dispatch.c */
    int nt = ob_parallel(rp_task, &J, want < 1 ? 1 : (want > 256 ? 256 : (int)want));
    int st = OB_OK;
    for (int t = 0; t < nt; t++)
        if (J.status[t] != OB_OK) st = J.status[t];
    free(xp);
    return st;
}
#endif
