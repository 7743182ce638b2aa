/* BitNet a4.8 activation quantizers and the sparse decode kernels' drivers (onebit_kernels.h,
 * "a4.8" and "sparse decode"). The SIMD inner loops are in x86.c; the scalar references here are
 * the spec they are tested against (tests/test_sparse_kernels.py).
 *
 * Why sparse decode pays: decoding is bound by reading the weights. After ReLU^2 most down_proj
 * inputs are exactly 0 (and, with a4.8's top-K, half of the o_proj inputs), and every up_proj row
 * whose gate output is <= 0 is multiplied by 0 in the GLU. Reading only the weight columns of
 * nonzero inputs needs them contiguous, so those projections get a transposed copy (i2 packing of
 * w^T, built once at load); skipping up_proj rows needs nothing new (rows are contiguous). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

static int use_avx2(void) {
#ifdef OB_HAVE_X86
    return strcmp(ob_isa(), "reference") != 0; /* every x86 variant has AVX2 */
#else
    return 0;
#endif
}

/* ---- a4.8 quantizers ------------------------------------------------------------------------ */

/* y = RMSNorm(x) * w exactly as ob_quantize_act_i8 computes it (or y = x), into buf [k]. */
static int normed_row(const float *xr, int64_t k, const float *norm_weight, float norm_eps, float *y) {
    float inv_rms = 1.0f;
    if (norm_weight) inv_rms = 1.0f / sqrtf(ob_sumsq_ref(xr, k) / (float)k + norm_eps);
    for (int64_t e = 0; e < k; e++) {
        y[e] = norm_weight ? (xr[e] * inv_rms) * norm_weight[e] : xr[e];
        if (!isfinite(y[e])) return OB_ERR_VALUE;
    }
    return OB_OK;
}

static int quant_args_ok(const float *x, int64_t m, int64_t k, int64_t ldx, const float *norm_weight,
                         float norm_eps, const int8_t *out, const float *out_scale) {
    if (!x || !out || !out_scale) return OB_ERR_NULL;
    if (m < 1 || k < 1) return OB_ERR_SIZE;
    if (ldx < k) return OB_ERR_STRIDE;
    if (norm_weight && !(isfinite(norm_eps) && norm_eps >= 0.0f)) return OB_ERR_VALUE;
    return OB_OK;
}

int ob_quantize_act_i4(const float *x, int64_t m, int64_t k, int64_t ldx, const float *norm_weight,
                       float norm_eps, int8_t *out, float *out_scale) {
    int st = quant_args_ok(x, m, k, ldx, norm_weight, norm_eps, out, out_scale);
    if (st) return st;
#ifdef OB_HAVE_X86
    if (use_avx2()) return ob_avx2_quantize_act_i4(x, m, k, ldx, norm_weight, norm_eps, out, out_scale);
#endif
    float *y = (float *)malloc((size_t)k * sizeof(float));
    if (!y) return OB_ERR_NOMEM;
    const float sqrt7 = (float)2.6457513110645907; /* (float)math.sqrt(7), as torch casts it */
    for (int64_t r = 0; r < m && st == OB_OK; r++) {
        if ((st = normed_row(x + r * ldx, k, norm_weight, norm_eps, y))) break;
        float beta = (float)ob_abssum4_ref(y, k) / (float)k;
        float s = (1.0f / (beta + 1e-5f)) * sqrt7;
        for (int64_t e = 0; e < k; e++) {
            float q = nearbyintf(y[e] * s);
            out[r * k + e] = (int8_t)(q < -8.0f ? -8.0f : (q > 7.0f ? 7.0f : q));
        }
        out_scale[r] = beta / sqrt7;
    }
    free(y);
    return st;
}

/* k-th largest of a[0..n) (1 <= kth <= n), reordering a: quickselect, median of three. */
static float kth_largest(float *a, int64_t n, int64_t kth) {
    int64_t lo = 0, hi = n - 1, want = kth - 1; /* index in descending order */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        float p0 = a[lo], p1 = a[mid], p2 = a[hi]; /* median of three as the pivot */
        float piv = p0 > p1 ? (p1 > p2 ? p1 : (p0 > p2 ? p2 : p0)) : (p0 > p2 ? p0 : (p1 > p2 ? p2 : p1));
        int64_t i = lo, j = hi;
        while (i <= j) { /* descending: > piv left, < piv right */
            while (a[i] > piv) i++;
            while (a[j] < piv) j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

int ob_quantize_act_topk_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                            const float *norm_weight, float norm_eps, double keep, int8_t *out,
                            float *out_scale) {
    int st = quant_args_ok(x, m, k, ldx, norm_weight, norm_eps, out, out_scale);
    if (st) return st;
    if (!(keep > 0.0 && keep <= 1.0)) return OB_ERR_VALUE;
    int64_t kk = (int64_t)ceil(keep * (double)k);
    if (kk < 1) kk = 1;
    float *y = (float *)malloc((size_t)k * 2 * sizeof(float));
    if (!y) return OB_ERR_NOMEM;
    float *mag = y + k;
    for (int64_t r = 0; r < m && st == OB_OK; r++) {
        if ((st = normed_row(x + r * ldx, k, norm_weight, norm_eps, y))) break;
        if (kk < k) {
            for (int64_t e = 0; e < k; e++) mag[e] = fabsf(y[e]);
            float thr = kth_largest(mag, k, kk);
            int64_t above = 0;
            for (int64_t e = 0; e < k; e++) above += fabsf(y[e]) > thr;
            int64_t ties = kk - above; /* entries equal to the threshold still kept, lowest first */
            for (int64_t e = 0; e < k; e++) {
                float a = fabsf(y[e]);
                if (a > thr) continue;
                if (a == thr && ties > 0) {
                    ties--;
                    continue;
                }
                y[e] = 0.0f;
            }
        }
        if ((st = ob_quantize_act_i8(y, 1, k, k, NULL, 0.0f, out + r * k, out_scale + r))) break;
    }
    free(y);
    return st;
}

/* ---- transposed i2 copy ------------------------------------------------------------------- */

int ob_transpose_packed_i2(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, uint8_t *wt) {
    if (!w || !wt) return OB_ERR_NULL;
    if (n < 1 || k < 1 || k > OB_MAX_K || n > OB_MAX_K) return OB_ERR_SIZE;
    int bst = ob_check_packed(w, w_bytes, n, k, OB_LAYOUT_I2);
    if (bst) return bst;
    int64_t rb = ob_packed_row_bytes(k, OB_LAYOUT_I2), rbt = ob_packed_row_bytes(n, OB_LAYOUT_I2);
    for (int64_t i = 0; i < n * rb; i++)
        if (w[i] & (w[i] >> 1) & 0x55) return OB_ERR_CORRUPT;
    memset(wt, 0x55, (size_t)(k * rbt)); /* code 1 (weight 0) everywhere, padding included */
    /* 128 x 128 tiles: decode the tile's codes, then write them transposed */
    static const int TB = OB_I2_BLOCK;
    int8_t *tile = (int8_t *)malloc((size_t)TB * TB);
    if (!tile) return OB_ERR_NOMEM;
    for (int64_t j0 = 0; j0 < n; j0 += TB)
        for (int64_t e0 = 0; e0 < k; e0 += TB) {
            int64_t nj = n - j0 < TB ? n - j0 : TB, ne = k - e0 < TB ? k - e0 : TB;
            const uint8_t *blk = w + j0 * rb + e0 / TB * OB_BLOCK_BYTES;
            for (int64_t j = 0; j < nj; j++)  /* tile[e][j] = code of w[j0 + j, e0 + e] */
                for (int64_t e = 0; e < TB; e++)
                    tile[e * TB + j] = (int8_t)((blk[j * rb + e % 32] >> (2 * (e / 32))) & 3);
            uint8_t *dst = wt + e0 * rbt + j0 / TB * OB_BLOCK_BYTES;
            for (int64_t e = 0; e < ne; e++) {
                uint8_t *row = dst + e * rbt;
                const int8_t *c = tile + e * TB;
                for (int64_t b = 0; b < 32; b++) {
                    uint8_t byte = 0;
                    for (int l = 0; l < 4; l++)
                        byte |= (uint8_t)((32 * l + b < nj ? c[32 * l + b] : 1) << (2 * l));
                    row[b] = byte;
                }
            }
        }
    free(tile);
    return OB_OK;
}

/* ---- column-sparse GEMV ------------------------------------------------------------------- */

void ob_ref_colsparse_i2(const ob_colsparse_args *a, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)
        for (int64_t o = 0; o < OB_I2_BLOCK; o++) {
            int32_t s = 0;
            for (int64_t i = 0; i < a->nnz; i++) {
                uint8_t byte = a->wt[(int64_t)a->idx[i] * a->rbt + b * OB_BLOCK_BYTES + o % 32];
                s += a->val[i] * ((byte >> (2 * (o / 32))) & 3);
            }
            a->acc[b * OB_I2_BLOCK + o] = s;
        }
}

typedef struct {
    const ob_colsparse_args *a;
    int64_t nb;
    int simd;
    int32_t *part;       /* [nt - 1][nb * 128]: the sums of threads 1.. (thread 0 writes a->acc) */
} cs_job_t;

/* Task t of nt gets [*i0, *i1) of n items; returns 0 when its share is empty. */
static int share(int64_t n, int t, int nt, int64_t *i0, int64_t *i1) {
    int64_t per = (n + nt - 1) / nt;
    *i0 = t * per;
    *i1 = *i0 + per < n ? *i0 + per : n;
    return *i0 < *i1;
}

/* Threads split the nonzero inputs (whole groups of OB_CS_PAD), each summing all outputs over its
 * share into its own buffer: every thread then reads whole transposed rows (one contiguous run
 * each), which keeps more of them in flight than splitting the outputs (half-rows per thread,
 * measured: no faster on 2 threads than on 1). The driver adds the buffers. */
static void cs_task(void *ctx, int t, int nt) {
    cs_job_t *J = (cs_job_t *)ctx;
    int64_t g0, g1, nout = J->nb * OB_I2_BLOCK;
    int32_t *acc = t == 0 ? J->a->acc : J->part + (t - 1) * nout;
    if (!share(J->a->nnz / OB_CS_PAD, t, nt, &g0, &g1)) {
        memset(acc, 0, (size_t)nout * sizeof(int32_t));
        return;
    }
    ob_colsparse_args A = *J->a;
    A.idx += g0 * OB_CS_PAD;
    A.val += g0 * OB_CS_PAD;
    A.nnz = (g1 - g0) * OB_CS_PAD;
    A.acc = acc;
#ifdef OB_HAVE_X86
    if (J->simd) {
        ob_avx2_colsparse_i2(&A, 0, J->nb);
        return;
    }
#endif
    ob_ref_colsparse_i2(&A, 0, J->nb);
}

int ob_linear_colsparse_i2(const uint8_t *wt, int64_t wt_bytes, int64_t n, int64_t k,
                           const int8_t *x, int64_t m, int64_t ldx, float w_scale,
                           const float *x_scale, float *out) {
    if (!wt || !x || !x_scale || !out) return OB_ERR_NULL;
    if (n < 1 || k < 1 || m < 1 || k > OB_MAX_K || n > OB_MAX_K) return OB_ERR_SIZE;
    int bst = ob_check_packed(wt, wt_bytes, k, n, OB_LAYOUT_I2); /* wt: k rows of n weights */
    if (bst) return bst;
    if (ldx < k) return OB_ERR_STRIDE;
    int64_t rbt = ob_packed_row_bytes(n, OB_LAYOUT_I2), nb = rbt / OB_BLOCK_BYTES;
    int32_t *idx = (int32_t *)malloc((size_t)(k + OB_CS_PAD) * sizeof(int32_t));
    int8_t *val = (int8_t *)malloc((size_t)(k + OB_CS_PAD));
    int simd = use_avx2(), nthreads = ob_get_num_threads();
    int32_t *acc = (int32_t *)malloc((size_t)(nb * OB_I2_BLOCK) * sizeof(int32_t));
    int32_t *part = (int32_t *)malloc((size_t)(nb * OB_I2_BLOCK) * sizeof(int32_t) * (size_t)(nthreads > 1 ? nthreads - 1 : 1));
    if (!idx || !val || !acc || !part) {
        free(idx);
        free(val);
        free(acc);
        free(part);
        return OB_ERR_NOMEM;
    }
    for (int64_t r = 0; r < m; r++) {
        const int8_t *xr = x + r * ldx;
        int64_t nnz = 0;
        int32_t xsum = 0;
        for (int64_t e = 0; e < k; e++) { /* branch-free: zeros sit at random places */
            idx[nnz] = (int32_t)e;
            val[nnz] = xr[e];
            nnz += xr[e] != 0;
            xsum += xr[e];
        }
        while (nnz % OB_CS_PAD) { /* whole groups for the SIMD kernel: zero values read row 0 */
            idx[nnz] = 0;
            val[nnz++] = 0;
        }
        ob_colsparse_args A = {wt, rbt, idx, val, nnz, acc};
        int64_t work = nnz * nb * OB_I2_BLOCK, want = work / ((int64_t)1 << 17), groups = nnz / OB_CS_PAD;
        want = want < 1 ? 1 : (want > nthreads ? nthreads : want);
        want = want > groups ? (groups < 1 ? 1 : groups) : want;
        cs_job_t J = {&A, nb, simd, part};
        int nt = ob_parallel(cs_task, &J, (int)want);
        for (int t = 1; t < nt; t++) { /* wraps like the int32 accumulators of the dense kernel */
            const int32_t *pt = part + (t - 1) * nb * OB_I2_BLOCK;
            for (int64_t j = 0; j < n; j++) acc[j] = (int32_t)((uint32_t)acc[j] + (uint32_t)pt[j]);
        }
        float *o = out + r * n, xs = x_scale[r];
        for (int64_t j = 0; j < n; j++) o[j] = (float)(int32_t)((uint32_t)acc[j] - (uint32_t)xsum) * w_scale * xs;
    }
    free(idx);
    free(val);
    free(acc);
    free(part);
    return OB_OK;
}

/* ---- row-list GEMV ------------------------------------------------------------------------ */

void ob_ref_rows(const ob_rows_args *a, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
        int64_t j = a->rows[i];
        ob_gemm_args g = {a->w + j * a->rb, 1, a->k, a->kp, a->rb, a->xp, 1, a->kp, NULL, &a->xsum, a->acc + j, 1, 0};
        if (a->layout == OB_LAYOUT_I2) ob_ref_gemm_i2(&g, 0, 1);
        else ob_ref_gemm_t1_6(&g, 0, 1);
    }
}

typedef struct {
    const ob_rows_args *a;
    int64_t nrows;
    int simd;
} rows_job_t;

static void rows_task(void *ctx, int t, int nt) {
    rows_job_t *J = (rows_job_t *)ctx;
    int64_t i0, i1;
    if (!share(J->nrows, t, nt, &i0, &i1)) return;
#ifdef OB_HAVE_X86
    if (J->simd) {
        ob_avx2_rows(J->a, i0, i1);
        return;
    }
#endif
    ob_ref_rows(J->a, i0, i1);
}

int ob_linear_rows(int layout, const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                   const int8_t *x, const int64_t *rows, int64_t nrows, float w_scale, float x_scale,
                   float *out) {
    if (!w || !x || !out || (!rows && nrows)) return OB_ERR_NULL;
    if (layout != OB_LAYOUT_I2 && layout != OB_LAYOUT_T1_6) return OB_ERR_SIZE;
    if (n < 1 || k < 1 || k > OB_MAX_K || nrows < 0) return OB_ERR_SIZE;
    int bst = ob_check_packed(w, w_bytes, n, k, layout);
    if (bst) return bst;
    for (int64_t i = 0; i < nrows; i++)
        if (rows[i] < 0 || rows[i] >= n) return OB_ERR_SIZE;
    if (nrows == 0) return OB_OK;
    int64_t rb = ob_packed_row_bytes(k, layout);
    int64_t block = layout == OB_LAYOUT_I2 ? OB_I2_BLOCK : OB_T1_6_BLOCK, kp = rb / OB_BLOCK_BYTES * block;
    int8_t *xbuf = (int8_t *)malloc((size_t)kp + 64);
    int32_t *acc = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    if (!xbuf || !acc) {
        free(xbuf);
        free(acc);
        return OB_ERR_NOMEM;
    }
    int8_t *xp = xbuf + (64 - (uintptr_t)xbuf % 64) % 64;
    int32_t xsum = 0;
    for (int64_t e = 0; e < k; e++) xsum += x[e];
    memcpy(xp, x, (size_t)k);
    memset(xp + k, 0, (size_t)(kp - k));
    ob_rows_args A = {w, layout, k, kp, rb, xp, xsum, rows, acc};
    rows_job_t J = {&A, nrows, use_avx2()};
    int64_t want = nrows * k / ((int64_t)1 << 17), nthreads = ob_get_num_threads();
    ob_parallel(rows_task, &J, want < 1 ? 1 : (want > nthreads ? (int)nthreads : (int)want));
    for (int64_t i = 0; i < nrows; i++) out[rows[i]] = (float)acc[rows[i]] * w_scale * x_scale;
    free(xbuf);
    free(acc);
    return OB_OK;
}
