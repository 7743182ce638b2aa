/* Internal: the variant table that dispatch.c fills by CPU detection, and the thread pool
 * (threads.c). Not part of the ABI. */
#ifndef ONEBIT_KERNELS_INTERNAL_H
#define ONEBIT_KERNELS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "onebit_kernels.h"

#define OB_I2_BLOCK 128    /* values per 32-byte block, 2.0 bpw */
#define OB_T1_6_BLOCK 160  /* values per 32-byte block, 1.6 bpw */
#define OB_BLOCK_BYTES 32

/* A weight buffer of `bytes` must hold exactly n rows of rb bytes: OB_OK, OB_ERR_SIZE when n or rb
 * is < 1 or n * rb overflows, else OB_ERR_BUFFER (checked before any weight byte is read). */
static inline int ob_check_bytes(int64_t bytes, int64_t n, int64_t rb) {
    if (n < 1 || rb < 1 || n > INT64_MAX / rb) return OB_ERR_SIZE;
    return bytes == n * rb ? OB_OK : OB_ERR_BUFFER;
}
/* a packed matrix [n, k] of `layout` in a buffer of w_bytes: NULL, then sizes, then the length */
static inline int ob_check_packed(const void *w, int64_t w_bytes, int64_t n, int64_t k, int layout) {
    if (!w) return OB_ERR_NULL;
    if (n < 1 || k < 1 || k > OB_MAX_K) return OB_ERR_SIZE;
    return ob_check_bytes(w_bytes, n, ob_packed_row_bytes(k, layout));
}

/* One GEMM call as every variant sees it, arguments already checked by dispatch.c.
 * xp holds the activations zero-padded to kp = padded k (a multiple of the layout's block), row
 * stride ldxp >= kp (a multiple of 64), rows 64-byte aligned; xsum[r] = sum of row r (variants that multiply the stored
 * codes c = w + 1 subtract it). acc row stride ldc. */
#define OB_XT_ROWS 6   /* activation rows of the x86 GEMM register tile */
#define OB_XT_MIN_M 8  /* from this many rows on, the x86 variants run the panel GEMM */

typedef struct {
    const uint8_t *w;     /* [n, rb] packed rows */
    int64_t n, k, kp, rb; /* rb = packed row bytes */
    const int8_t *xp;     /* [m, ldxp] */
    int64_t m, ldxp;
    const int8_t *xt;     /* m >= OB_XT_MIN_M: the same activations in row tiles of OB_XT_ROWS,
                           * [ceil(m / OB_XT_ROWS)][kp / 4][OB_XT_ROWS][4] (rows past m are
                           * zero), else NULL: a GEMM register tile's broadcasts read one stream */
    const int32_t *xsum;  /* [m] */
    int32_t *acc;         /* [m, ldc] */
    int64_t ldc;
    int check;            /* 0: the caller validated the weights (ob_validate_packed); variants
                           * may then skip the per-block code check (invalid codes still never
                           * touch memory out of bounds, they just give wrong sums) */
} ob_gemm_args;

/* Computes acc[:, j0:j1] from weight rows j0..j1-1 (a thread's share). Returns OB_OK or
 * OB_ERR_CORRUPT if any byte of those rows (padding included) is invalid. */
typedef int (*ob_gemm_fn)(const ob_gemm_args *a, int64_t j0, int64_t j1);

typedef struct {
    const char *name;
    ob_gemm_fn gemm[2];  /* indexed by OB_LAYOUT_I2 / OB_LAYOUT_T1_6 */
    int auto_select;     /* 0: only when forced (not verified on real hardware, or slower) */
} ob_variant;

/* int8 x int8 rows j0..j1-1 of out[m, n] (ob_linear_i8, arguments checked) */
typedef struct {
    const int8_t *w;
    const float *w_scale;
    int64_t n, k;
    const int8_t *x;
    int64_t m, ldx;
    const float *x_scale;
    float *out;
} ob_i8_args;
void ob_ref_linear_i8(const ob_i8_args *a, int64_t j0, int64_t j1);
/* the same args for 4-bit rows: w points at uint8 rows of ob_i4_row_bytes(k) and x is zero-padded
 * to whole 64-blocks (ldx a multiple of 64) */
#define ob_i4_row_bytes(k) (((k) + 63) / 64 * 32)
void ob_ref_linear_i4(const ob_i8_args *a, int64_t j0, int64_t j1);

typedef struct {
    const uint16_t *w;
    int64_t n, k;
    const float *x;
    int64_t m, ldx;
    float *out;
} ob_f16_args;
float ob_half_to_float(uint16_t h);
uint16_t ob_float_to_half(float f); /* round to nearest even (kv.c) */
void ob_ref_linear_f16(const ob_f16_args *a, int64_t j0, int64_t j1);

/* 1 if byte b can be written by the t1_6 packer (243 of 256 values). */
int ob_t1_6_byte_valid(uint8_t b);

int ob_ref_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_ref_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1);
float ob_sumsq_ref(const float *x, int64_t k); /* the summation order every variant uses */
double ob_abssum4_ref(const float *x, int64_t k); /* likewise, for the INT4 absmean */
int ob_ref_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                           const float *norm_weight, float norm_eps, int8_t *out, float *out_scale);

#if defined(__x86_64__) || defined(__i386__)
#define OB_HAVE_X86 1
int ob_avx2_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_avx2_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_avx512vnni_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_avx512vnni_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1);
/* the same on 512-bit vectors (x86.c; AVX-512 F/BW/VL/VNNI) */
int ob_avx512vnni_zmm_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_avx512vnni_zmm_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1);
/* lookup-table family (lut.c): T-MAC / bitnet.cpp TL-style, selected by name "avx2_lut" */
int ob_avx2lut_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_avx2lut_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1);
uint64_t ob_avx2_read_sum(const uint8_t *p, int64_t bytes); /* sum of the 64-bit words */
void ob_avx2_linear_i4(const ob_i8_args *a, int64_t j0, int64_t j1);
void ob_avx2_linear_f16(const ob_f16_args *a, int64_t j0, int64_t j1);
void ob_avx2_linear_i8(const ob_i8_args *a, int64_t j0, int64_t j1);
void ob_zmm_linear_i8(const ob_i8_args *a, int64_t j0, int64_t j1); /* avx512vnni_zmm */
int ob_avx2_quantize_act_i4(const float *x, int64_t m, int64_t k, int64_t ldx,
                            const float *norm_weight, float norm_eps, int8_t *out, float *out_scale);
int ob_avx2_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                            const float *norm_weight, float norm_eps, int8_t *out, float *out_scale);
#endif
#if defined(__aarch64__)
#define OB_HAVE_ARM 1
int ob_neon_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1);
int ob_neon_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1);
#endif

/* Sparse decode (sparse.c drivers, x86.c SIMD). colsparse: acc[b*128 + o] = sum over i < nnz of
 * val[i] * code(wt row idx[i], output b*128 + o) for blocks [b0, b1) (raw codes c = w + 1: the
 * driver subtracts sum(val)); nnz is a multiple of OB_CS_PAD (padded with zero values). rows: acc[rows[i]] = dot(w row rows[i], x) for list
 * positions [i0, i1), x zero-padded to kp, xsum its sum. Weights validated by the caller. */
#define OB_CS_PAD 8
typedef struct {
    const uint8_t *wt;
    int64_t rbt;         /* bytes per wt row */
    const int32_t *idx;  /* [nnz] inputs (wt rows) */
    const int8_t *val;   /* [nnz] their activation codes */
    int64_t nnz;
    int32_t *acc;        /* [blocks * 128] */
} ob_colsparse_args;
typedef struct {
    const uint8_t *w;
    int layout;
    int64_t k, kp, rb;
    const int8_t *xp;    /* [kp], 64-byte aligned */
    int32_t xsum;
    const int64_t *rows;
    int32_t *acc;        /* [n], indexed by row */
} ob_rows_args;
void ob_ref_colsparse_i2(const ob_colsparse_args *a, int64_t b0, int64_t b1);
void ob_ref_rows(const ob_rows_args *a, int64_t i0, int64_t i1);
#ifdef OB_HAVE_X86
void ob_avx2_colsparse_i2(const ob_colsparse_args *a, int64_t b0, int64_t b1);
void ob_avx2_rows(const ob_rows_args *a, int64_t i0, int64_t i1);
#endif

/* ob_linear_* without the per-call code check (dispatch.c), for layer.c */
/* ob_linear_unchecked of nseg (<= 3) weight matrices [n[g], k] on the same activations, as one
 * job (q/k/v or gate/up of a decode step): out[g] [m, n[g]]; bit-identical to nseg calls. */
int ob_linear_multi_unchecked(int layout, int nseg, const uint8_t *const *w, const int64_t *n,
                              int64_t k, const int8_t *x, int64_t m, int64_t ldx,
                              const float *w_scale, const float *x_scale, float *const *out);
int ob_linear_unchecked(int layout, const uint8_t *w, int64_t n, int64_t k, const int8_t *x,
                        int64_t m, int64_t ldx, float w_scale, const float *x_scale, float *out);

/* ---- thread pool (threads.c) ------------------------------------------------------------- */
/* fn(ctx, t, nt) for t = 0..nt-1, t = 0 on the calling thread, the rest on pool workers that
 * spin briefly and then sleep (so an idle pool never competes with torch's threads). nt is
 * min(nthreads, ob_get_num_threads()); if the pool is busy (a concurrent call from another
 * thread) the tasks run one after another on the caller. Returns nt. */
typedef void (*ob_task_fn)(void *ctx, int t, int nt);
int ob_parallel(ob_task_fn fn, void *ctx, int nthreads);
/* scratch memory that may be a kept block (threads.c): pass *kept back to ob_scratch_put */
void *ob_scratch_get(size_t bytes, int *kept);
void ob_scratch_put(void *p, int kept);

/* ---- the compact KV cache (kv.c; rows: docs/formats.md §10) -------------------------------- */
/* One sequence's K (or V) cache of one layer at kv_bits 8/4/3, one block:
 *   steps uint16 [Hkv][cache_len] | codes uint8 [Hkv][cache_len][rb(bits)] | bits 3 only:
 *   bos uint8 [Hkv][rb(4)], the 4-bit position-0 rows (their 3-bit slots in codes stay unused).
 * kv_bits 16: codes only, float16 [Hkv][cache_len][hd] (steps NULL: 1.0). */
typedef struct {
    uint16_t *steps;
    uint8_t *codes, *bos;
    int64_t rb, rb_bos, cache_len;
    int bits;
} ob_kv_view;

ob_kv_view ob_kv_view_of(void *block, int64_t Hkv, int64_t cache_len, int64_t hd, int bits);
/* row (h, p) := x quantized (m = its max |x|, from ob_kv_row_absmax); read back dequantized */
void ob_kv_put(const ob_kv_view *c, int64_t h, int64_t p, const float *x, float m, int64_t hd);
void ob_kv_get(const ob_kv_view *c, int64_t h, int64_t p, int64_t hd, float *out, int simd);
float ob_kv_row_absmax(const float *x, int64_t hd); /* max |x|, or -1 on NaN/inf */
/* ob_attention_kv; allow_split = 0 never splits a token's keys over threads (split-K), whose
 * combined floats depend on T, pos and the thread count: each (token, head) result is then a
 * function of its own query and keys only (ob_layer.batch_invariant) */
int ob_attention_kv_split(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H,
                          int64_t Hkv, int64_t hd, const float *rope_cos, const float *rope_sin,
                          int64_t rope_len, int kv_bits, void *cache_k, void *cache_v,
                          int64_t cache_len, float *y, int allow_split);
int ob_kv_simd(void); /* the AVX2/FMA/F16C loops apply (CPU has them, variant not "reference") */

#include <math.h>
/* expf for x <= 0 (softmax after max subtraction, sigmoid of -|g|); exp(-inf) = 0; max rel. error
 * ~2 ulp. Range reduction by ln 2, Cephes-style polynomial. */
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
    /* 2^n: n (in [-126, 0]) added to the exponent field; in uint32, as a left shift of a negative
     * int is undefined behaviour (UBSan: scripts/check_sanitizers.sh); same bits mod 2^32 */
    union { float f; uint32_t u; } u = {p};
    u.u += (uint32_t)(int32_t)n << 23;
    return u.f;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define OB_ATTN_AVX2 1 /* kv.c / attention.c / layer.c: explicit AVX2 loops under this target attribute */
#define OB_ATTN_TARGET __attribute__((target("avx2,fma,f16c")))
#include <immintrin.h>
/* ob_expf_nonpos on 8 lanes: the same operations in the same order (mul, then add: no FMA), so
 * every value equals the scalar one; lanes below -87 give 0. */
OB_ATTN_TARGET static inline __m256 ob_expf_nonpos_avx2(__m256 x) {
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
/* hd % 8 == 0, keys/values at cache positions p0..p0+n-1 of kv head kvh (not a 3-bit row 0),
 * query heads h < gs: sc[h * S + j] = (q_h . k_j) * scale, and y[h * hd:] += sum_j p[h * S + j]
 * v_j (p is overwritten) */
void ob_kv_scores_avx2(const ob_kv_view *c, int64_t kvh, int64_t p0, int64_t n, const float *q,
                       int64_t gs, int64_t hd, float scale, float *sc, int64_t S);
void ob_kv_weighted_sum_avx2(const ob_kv_view *c, int64_t kvh, int64_t p0, int64_t n, float *p,
                             int64_t gs, int64_t S, int64_t hd, float *y);
#endif

#endif
