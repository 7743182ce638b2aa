/* AArch64 NEON variant ("neon"), two code paths picked at run time inside this file:
 *  - sdot  (ARMv8.2 dotprod, vdotq_s32: 16 int8 products summed into 4 int32 lanes per
 *    instruction), when the CPU has it (Linux: getauxval(AT_HWCAP) & HWCAP_ASIMDDP);
 *  - smlal (baseline Advanced SIMD: vmull_s8 / vmlal_high_s8 into int16, widened into int32
 *    with vpadalq_s16 before the int16 sums can overflow), everywhere else.
 * The dotprod functions carry a target attribute; the file is built like every other one, with
 * no -march flag. ONEBIT_NEON_DOTPROD=0 in the environment (read once, at the first GEMM) forces
 * the baseline path on a dotprod CPU, so both paths can be tested on one machine.
 *
 * Same arithmetic as x86.c: sum_e (c_e - 1) * x_e = sum_e c_e * x_e - xsum, with the stored
 * code c in {0,1,2} and the int8 activation both fed to the signed multiply (c is never 3 in a
 * valid row; t1_6 multiplies by -c, see T16_DECODE). The activations arrive zero-padded to whole
 * blocks, so padding codes meet x = 0 and no loop has a tail. Integer sums wrap mod 2^32 like the
 * hardware's, and the final value fits int32 (OB_MAX_K), so results equal ref.c bit for bit.
 *
 * Two shapes of kernel, as in x86.c:
 *  - row kernel (m < OB_GEMM_MIN_M): one 32-byte block load is decoded into LANES x 2 vectors of
 *    16 consecutive codes (docs/formats.md §1) and multiplied with up to TILE activation rows;
 *    for m = 1 two weight rows share each activation load.
 *  - panel GEMM (m >= OB_GEMM_MIN_M): NC weight rows x KC_BLOCKS blocks are decoded once into an
 *    int8 panel (codes in element order, one row of the panel per output column) and reused by
 *    every activation row; an MR x NR register tile takes 16 inputs per step. */
#include "internal.h"

#ifdef OB_HAVE_ARM
#include <arm_neon.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

/* The sdot path needs a compiler whose arm_neon.h offers vdotq_s32 to a function with a target
 * attribute (GCC >= 8, clang >= 16); otherwise only the baseline path is built. */
#if defined(__clang__)
#if __clang_major__ >= 16
#define OB_NEON_DOT 1
#define DOTP __attribute__((target("dotprod")))
#endif
#elif defined(__GNUC__) && __GNUC__ >= 8
#define OB_NEON_DOT 1
/* the arch= form: GCC's arm_neon.h declares vdotq_s32 for armv8.2-a+dotprod, and "+dotprod"
 * alone (armv8-a+dotprod) is not a superset of that, so it could not inline it */
#define DOTP __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

#define BASE /* baseline functions: no target attribute */
#define INLINE static inline __attribute__((always_inline))

#define OB_GEMM_MIN_M 8 /* from this many activation rows on, the panel GEMM */
#define TILE 4          /* activation rows sharing one decode in the row kernel */
#define FLUSH 8         /* blocks summed in int16 before widening (row kernel, baseline) */
#define NC 16           /* panel width (output columns decoded together) */
#define NR 4            /* output columns of the GEMM register tile */
#define MR 4            /* activation rows of the GEMM register tile */
#define KSTEPS 32       /* 16-input steps summed in int16 before widening (GEMM, baseline) */
#define KC_BLOCKS 8     /* blocks per panel: i2 1024 inputs (16 KiB), t1_6 1280 (20 KiB) */

/* ---- run-time selection ------------------------------------------------------------------- */

static int g_dot = -1; /* -1: not decided; read and written with relaxed atomics */

static int cpu_has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    int v = 0;
    size_t len = sizeof v;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, NULL, 0) == 0 && v;
#else
    return 0;
#endif
}

/* 1 if the GEMMs take the sdot path. Not in the ABI (hidden); tests/c/parity.c reports it. */
__attribute__((visibility("hidden"))) int ob_neon_uses_dotprod(void) {
    int d = __atomic_load_n(&g_dot, __ATOMIC_RELAXED);
    if (d < 0) {
#ifdef OB_NEON_DOT
        const char *env = getenv("ONEBIT_NEON_DOTPROD");
        d = cpu_has_dotprod() && !(env && strcmp(env, "0") == 0);
#else
        d = 0;
#endif
        __atomic_store_n(&g_dot, d, __ATOMIC_RELAXED);
    }
    return d;
}

/* ---- decoding: 32 packed bytes (v0 = bytes 0..15, v1 = 16..31) -> c[lane][half] ---------- */

/* i2: lane j of byte m is (byte >> 2j) & 3 (NEON shifts are per byte: nothing crosses).
 * bad |= v & (v >> 1): a lane holds code 3 iff an even bit is set there (I2_BAD masks 0x55). */
#define I2_LANES 4
#define I2_SIGN 1
#define I2_DECODE(v0, v1, c, bad)                                                    \
    do {                                                                             \
        const uint8x16_t m3_ = vdupq_n_u8(3);                                        \
        const uint8x16_t v_[2] = {v0, v1};                                           \
        for (int h_ = 0; h_ < 2; h_++) {                                             \
            c[0][h_] = vreinterpretq_s8_u8(vandq_u8(v_[h_], m3_));                   \
            c[1][h_] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v_[h_], 2), m3_));    \
            c[2][h_] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v_[h_], 4), m3_));    \
            c[3][h_] = vreinterpretq_s8_u8(vshrq_n_u8(v_[h_], 6));                   \
            bad = vorrq_u8(bad, vandq_u8(v_[h_], vshrq_n_u8(v_[h_], 1)));            \
        }                                                                            \
    } while (0)
#define I2_BAD(bad) vandq_u8(bad, vdupq_n_u8(0x55))

/* t1_6: digit j = (b_j * 3) >> 8 with b_j = byte * 3^j mod 256 (a uint8 multiply), and
 * (b * 3) >> 8 = (b > 85) + (b > 170). The unsigned compares give 0xFF = -1 per true, so their
 * sum is -digit: t1_6 multiplies by the negated code and negates the sum (T16_SIGN).
 * bad |= byte among the 13 unused values: bit (byte & 7) of T16_INVALID[byte >> 3]. */
#define T16_LANES 5
#define T16_SIGN (-1)
static const uint8_t T16_INVALID[32] = { /* bitmap of the bytes ob_t1_6_byte_valid rejects */
    0x02, 0x00, 0x10, 0x00, 0x00, 0x01, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0x08, 0x00, 0x80, 0x00,
    0x00, 0x04, 0x00, 0x40, 0x00, 0x00, 0x04, 0x00, 0x20, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00};
static const uint8_t T16_BITS[16] = {1, 2, 4, 8, 16, 32, 64, 128, 0, 0, 0, 0, 0, 0, 0, 0};
#define T16_DECODE(v0, v1, c, bad)                                                              \
    do {                                                                                        \
        const uint8x16x2_t inv_ = {{vld1q_u8(T16_INVALID), vld1q_u8(T16_INVALID + 16)}};       \
        const uint8x16_t bits_ = vld1q_u8(T16_BITS);                                            \
        const uint8x16_t t85_ = vdupq_n_u8(85), t170_ = vdupq_n_u8(170), m7_ = vdupq_n_u8(7);  \
        static const uint8_t pow3_[5] = {1, 3, 9, 27, 81};                                      \
        const uint8x16_t v_[2] = {v0, v1};                                                      \
        for (int h_ = 0; h_ < 2; h_++) {                                                        \
            for (int j_ = 0; j_ < 5; j_++) {                                                    \
                uint8x16_t b_ = j_ ? vmulq_u8(v_[h_], vdupq_n_u8(pow3_[j_])) : v_[h_];          \
                c[j_][h_] = vaddq_s8(vreinterpretq_s8_u8(vcgtq_u8(b_, t85_)),                   \
                                     vreinterpretq_s8_u8(vcgtq_u8(b_, t170_)));                 \
            }                                                                                   \
            uint8x16_t row_ = vqtbl2q_u8(inv_, vshrq_n_u8(v_[h_], 3));                          \
            uint8x16_t bit_ = vqtbl1q_u8(bits_, vandq_u8(v_[h_], m7_));                         \
            bad = vorrq_u8(bad, vandq_u8(row_, bit_));                                          \
        }                                                                                       \
    } while (0)
#define T16_BAD(bad) (bad)

/* ---- products ------------------------------------------------------------------------------
 * base: int16 partial sums, |c * x| <= 2 * 128 = 256 per product; widened into int32 (FLUSHW).
 * dot : int32 from the start (vdotq_s32); "widening" is an add. */
#define ACC_base int16x8_t
#define ZERO_base() vdupq_n_s16(0)
#define MAC_base(acc, c, x) \
    (acc = vmlal_high_s8(vmlal_s8(acc, vget_low_s8(c), vget_low_s8(x)), c, x))
#define FLUSHW_base(acc32, acc) (acc32 = vpadalq_s16(acc32, acc))
#define ACC_dot int32x4_t
#define ZERO_dot() vdupq_n_s32(0)
#define MAC_dot(acc, c, x) (acc = vdotq_s32(acc, c, x))
#define FLUSHW_dot(acc32, acc) (acc32 = vaddq_s32(acc32, acc))

/* sign * h - xs, wrapping like the hardware (h may have wrapped; the true result fits int32) */
INLINE int32_t finish(int32_t h, int sign, int32_t xs) {
    uint32_t u = sign > 0 ? (uint32_t)h : 0u - (uint32_t)h;
    return (int32_t)(u - (uint32_t)xs);
}

/* ---- row kernel: WR weight rows x R activation rows, whole k ------------------------------
 * int16 bound (base): per block each accumulator takes LANES * 2 products (one half-vector per
 * lane, low and high 8 bytes): FLUSH * 5 * 2 * 256 = 20480 < 32768. */
#define DEFINE_ROW_KERNEL(NAME, ATTR, KIND, DECODE, LANES, BLOCK, SIGN)                          \
    INLINE ATTR void NAME(const uint8_t *w, int64_t rb, int WR, const int8_t *xp, int64_t ldxp,   \
                          const int32_t *xsum, int R, int32_t *out, int64_t ldc, uint8x16_t *bad) { \
        int64_t nblk = rb / OB_BLOCK_BYTES;                                                       \
        int32x4_t acc[2][TILE];                                                                   \
        for (int i = 0; i < WR; i++)                                                              \
            for (int r = 0; r < R; r++) acc[i][r] = vdupq_n_s32(0);                               \
        for (int64_t b0 = 0; b0 < nblk; b0 += FLUSH) {                                            \
            int64_t b1 = b0 + FLUSH < nblk ? b0 + FLUSH : nblk;                                   \
            ACC_##KIND s[2][TILE][2]; /* [weight row][activation row][half] */                   \
            for (int i = 0; i < WR; i++)                                                          \
                for (int r = 0; r < R; r++) s[i][r][0] = s[i][r][1] = ZERO_##KIND();              \
            for (int64_t b = b0; b < b1; b++) {                                                   \
                int8x16_t c[2][LANES][2];                                                         \
                for (int i = 0; i < WR; i++) {                                                    \
                    const uint8_t *p = w + i * rb + b * OB_BLOCK_BYTES;                           \
                    DECODE(vld1q_u8(p), vld1q_u8(p + 16), c[i], *bad);                            \
                }                                                                                 \
                for (int r = 0; r < R; r++) {                                                     \
                    const int8_t *xb = xp + r * ldxp + b * BLOCK;                                 \
                    for (int j = 0; j < LANES; j++) {                                             \
                        int8x16_t x0 = vld1q_s8(xb + 32 * j), x1 = vld1q_s8(xb + 32 * j + 16);    \
                        for (int i = 0; i < WR; i++) {                                            \
                            MAC_##KIND(s[i][r][0], c[i][j][0], x0);                               \
                            MAC_##KIND(s[i][r][1], c[i][j][1], x1);                               \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (int i = 0; i < WR; i++)                                                          \
                for (int r = 0; r < R; r++) {                                                     \
                    FLUSHW_##KIND(acc[i][r], s[i][r][0]);                                         \
                    FLUSHW_##KIND(acc[i][r], s[i][r][1]);                                         \
                }                                                                                 \
        }                                                                                         \
        for (int i = 0; i < WR; i++)                                                              \
            for (int r = 0; r < R; r++)                                                           \
                out[r * ldc + i] = finish(vaddvq_s32(acc[i][r]), SIGN, xsum[r]);                  \
    }

/* ---- panel GEMM -----------------------------------------------------------------------------
 * panel[q][e]: sign * code of element b0 * BLOCK + e of output column q, row stride PK. */

/* Decodes packed rows 0..nc-1 of w, blocks [b0, b1), into the panel; columns nc..ceil4(nc)-1
 * (read by the last register tile) get zero codes. */
#define DEFINE_PANEL(NAME, ATTR, DECODE, LANES, BLOCK)                                            \
    INLINE ATTR void NAME(const uint8_t *w, int64_t rb, int nc, int64_t b0, int64_t b1,          \
                          int8_t *panel, uint8x16_t *bad) {                                        \
        const int64_t PK = KC_BLOCKS * BLOCK;                                                     \
        for (int q = 0; q < nc; q++)                                                              \
            for (int64_t b = b0; b < b1; b++) {                                                   \
                const uint8_t *p = w + q * rb + b * OB_BLOCK_BYTES;                               \
                int8_t *d = panel + q * PK + (b - b0) * BLOCK;                                    \
                int8x16_t c[LANES][2];                                                            \
                DECODE(vld1q_u8(p), vld1q_u8(p + 16), c, *bad);                                   \
                for (int j = 0; j < LANES; j++) {                                                 \
                    vst1q_s8(d + 32 * j, c[j][0]);                                                \
                    vst1q_s8(d + 32 * j + 16, c[j][1]);                                           \
                }                                                                                 \
            }                                                                                     \
        for (int q = nc; q < (nc + NR - 1) / NR * NR; q++)                                        \
            memset(panel + q * PK, 0, (size_t)((b1 - b0) * BLOCK));                               \
    }

/* c[r][0..ncq) (row stride ldc) += sign * (x rows [R, steps*16] . panel columns [NR]), R <= MR.
 * int16 bound (base): 2 products per step and lane, KSTEPS * 2 * 256 = 16384 < 32768. */
#define DEFINE_MICRO(NAME, ATTR, KIND)                                                            \
    INLINE ATTR void NAME(const int8_t *panel, int64_t pk, int64_t steps, const int8_t *x,        \
                          int64_t ldx, int R, int sign, int ncq, int32_t *c, int64_t ldc) {        \
        int32x4_t a32[MR][NR];                                                                    \
        for (int r = 0; r < R; r++)                                                               \
            for (int q = 0; q < NR; q++) a32[r][q] = vdupq_n_s32(0);                              \
        for (int64_t s0 = 0; s0 < steps; s0 += KSTEPS) {                                          \
            int64_t s1 = s0 + KSTEPS < steps ? s0 + KSTEPS : steps;                               \
            ACC_##KIND a[MR][NR];                                                                 \
            for (int r = 0; r < R; r++)                                                           \
                for (int q = 0; q < NR; q++) a[r][q] = ZERO_##KIND();                             \
            for (int64_t s = s0; s < s1; s++) {                                                   \
                int8x16_t wv[NR];                                                                 \
                for (int q = 0; q < NR; q++) wv[q] = vld1q_s8(panel + q * pk + 16 * s);           \
                for (int r = 0; r < R; r++) {                                                     \
                    int8x16_t xv = vld1q_s8(x + r * ldx + 16 * s);                                \
                    for (int q = 0; q < NR; q++) MAC_##KIND(a[r][q], wv[q], xv);                  \
                }                                                                                 \
            }                                                                                     \
            for (int r = 0; r < R; r++)                                                           \
                for (int q = 0; q < NR; q++) FLUSHW_##KIND(a32[r][q], a[r][q]);                   \
        }                                                                                         \
        for (int r = 0; r < R; r++) {                                                             \
            /* lane q = sum of a32[r][q] */                                                       \
            int32x4_t v = vpaddq_s32(vpaddq_s32(a32[r][0], a32[r][1]),                            \
                                     vpaddq_s32(a32[r][2], a32[r][3]));                           \
            if (sign < 0) v = vnegq_s32(v);                                                       \
            int32_t *cr = c + r * ldc;                                                            \
            if (ncq == NR)                                                                        \
                vst1q_s32(cr, vaddq_s32(vld1q_s32(cr), v));                                       \
            else {                                                                                \
                int32_t t[NR];                                                                    \
                vst1q_s32(t, v);                                                                  \
                for (int q = 0; q < ncq; q++) cr[q] = (int32_t)((uint32_t)cr[q] + (uint32_t)t[q]); \
            }                                                                                     \
        }                                                                                         \
    }

#define DEFINE_GEMM(NAME, ATTR, ROW, PANEL, MICRO, BLOCK, SIGN, BADF)                            \
    static ATTR int NAME(const ob_gemm_args *a, int64_t j0, int64_t j1) {                         \
        uint8x16_t bad = vdupq_n_u8(0);                                                           \
        int64_t m = a->m, rb = a->rb, nblk = rb / OB_BLOCK_BYTES;                                 \
        if (m < OB_GEMM_MIN_M) {                                                                  \
            for (int64_t r0 = 0; r0 < m; r0 += TILE) {                                            \
                int R = (int)(m - r0 < TILE ? m - r0 : TILE);                                     \
                const int8_t *xt = a->xp + r0 * a->ldxp;                                          \
                int32_t *o = a->acc + r0 * a->ldc;                                                \
                const int32_t *xs = a->xsum + r0;                                                 \
                int64_t j = j0;                                                                   \
                if (R == 1)                                                                       \
                    for (; j + 1 < j1; j += 2)                                                    \
                        ROW(a->w + j * rb, rb, 2, xt, a->ldxp, xs, 1, o + j, a->ldc, &bad);       \
                for (; j < j1; j++) {                                                             \
                    const uint8_t *wr = a->w + j * rb;                                            \
                    if (R == 4) ROW(wr, rb, 1, xt, a->ldxp, xs, 4, o + j, a->ldc, &bad);          \
                    else if (R == 3) ROW(wr, rb, 1, xt, a->ldxp, xs, 3, o + j, a->ldc, &bad);     \
                    else if (R == 2) ROW(wr, rb, 1, xt, a->ldxp, xs, 2, o + j, a->ldc, &bad);     \
                    else ROW(wr, rb, 1, xt, a->ldxp, xs, 1, o + j, a->ldc, &bad);                 \
                }                                                                                 \
            }                                                                                     \
        } else {                                                                                  \
            const int64_t PK = KC_BLOCKS * BLOCK;                                                 \
            _Alignas(64) int8_t panel[NC * KC_BLOCKS * BLOCK];                                    \
            for (int64_t jp = j0; jp < j1; jp += NC) {                                            \
                int nc = (int)(j1 - jp < NC ? j1 - jp : NC);                                      \
                for (int64_t r = 0; r < m; r++)                                                   \
                    for (int q = 0; q < nc; q++)                                                  \
                        a->acc[r * a->ldc + jp + q] = (int32_t)(0u - (uint32_t)a->xsum[r]);       \
                for (int64_t b0 = 0; b0 < nblk; b0 += KC_BLOCKS) {                                \
                    int64_t b1 = b0 + KC_BLOCKS < nblk ? b0 + KC_BLOCKS : nblk;                   \
                    PANEL(a->w + jp * rb, rb, nc, b0, b1, panel, &bad);                           \
                    int64_t steps = (b1 - b0) * BLOCK / 16;                                       \
                    for (int64_t r0 = 0; r0 < m; r0 += MR) {                                      \
                        int R = (int)(m - r0 < MR ? m - r0 : MR);                                 \
                        const int8_t *xt = a->xp + r0 * a->ldxp + b0 * BLOCK;                     \
                        for (int q0 = 0; q0 < nc; q0 += NR) {                                     \
                            int ncq = nc - q0 < NR ? nc - q0 : NR;                                \
                            const int8_t *pq = panel + q0 * PK;                                   \
                            int32_t *c = a->acc + r0 * a->ldc + jp + q0;                          \
                            switch (R) {                                                          \
                            case 4: MICRO(pq, PK, steps, xt, a->ldxp, 4, SIGN, ncq, c, a->ldc); break; \
                            case 3: MICRO(pq, PK, steps, xt, a->ldxp, 3, SIGN, ncq, c, a->ldc); break; \
                            case 2: MICRO(pq, PK, steps, xt, a->ldxp, 2, SIGN, ncq, c, a->ldc); break; \
                            default: MICRO(pq, PK, steps, xt, a->ldxp, 1, SIGN, ncq, c, a->ldc); break; \
                            }                                                                     \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        return vmaxvq_u8(BADF(bad)) ? OB_ERR_CORRUPT : OB_OK;                                     \
    }

DEFINE_ROW_KERNEL(row_i2_base, BASE, base, I2_DECODE, I2_LANES, OB_I2_BLOCK, I2_SIGN)
DEFINE_ROW_KERNEL(row_t16_base, BASE, base, T16_DECODE, T16_LANES, OB_T1_6_BLOCK, T16_SIGN)
DEFINE_PANEL(panel_i2_base, BASE, I2_DECODE, I2_LANES, OB_I2_BLOCK)
DEFINE_PANEL(panel_t16_base, BASE, T16_DECODE, T16_LANES, OB_T1_6_BLOCK)
DEFINE_MICRO(micro_base, BASE, base)
DEFINE_GEMM(gemm_i2_base, BASE, row_i2_base, panel_i2_base, micro_base, OB_I2_BLOCK, I2_SIGN, I2_BAD)
DEFINE_GEMM(gemm_t16_base, BASE, row_t16_base, panel_t16_base, micro_base, OB_T1_6_BLOCK, T16_SIGN, T16_BAD)

#ifdef OB_NEON_DOT
DEFINE_ROW_KERNEL(row_i2_dot, DOTP, dot, I2_DECODE, I2_LANES, OB_I2_BLOCK, I2_SIGN)
DEFINE_ROW_KERNEL(row_t16_dot, DOTP, dot, T16_DECODE, T16_LANES, OB_T1_6_BLOCK, T16_SIGN)
DEFINE_PANEL(panel_i2_dot, DOTP, I2_DECODE, I2_LANES, OB_I2_BLOCK)
DEFINE_PANEL(panel_t16_dot, DOTP, T16_DECODE, T16_LANES, OB_T1_6_BLOCK)
DEFINE_MICRO(micro_dot, DOTP, dot)
DEFINE_GEMM(gemm_i2_dot, DOTP, row_i2_dot, panel_i2_dot, micro_dot, OB_I2_BLOCK, I2_SIGN, I2_BAD)
DEFINE_GEMM(gemm_t16_dot, DOTP, row_t16_dot, panel_t16_dot, micro_dot, OB_T1_6_BLOCK, T16_SIGN, T16_BAD)
#endif

int ob_neon_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1) {
#ifdef OB_NEON_DOT
    if (ob_neon_uses_dotprod()) return gemm_i2_dot(a, j0, j1);
#endif
    return gemm_i2_base(a, j0, j1);
}

int ob_neon_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1) {
#ifdef OB_NEON_DOT
    if (ob_neon_uses_dotprod()) return gemm_t16_dot(a, j0, j1);
#endif
    return gemm_t16_base(a, j0, j1);
}

#endif /* OB_HAVE_ARM */
