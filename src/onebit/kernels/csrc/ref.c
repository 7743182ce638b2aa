/* Scalar reference kernels: obviously correct, one element at a time with the spec's formulas
 * (docs/formats.md §2-3). Every other variant must give bit-identical integers. */
#include <math.h>
#include "internal.h"

static const int POW3[5] = {1, 3, 9, 27, 81};

int ob_t1_6_byte_valid(uint8_t b) {
    /* valid iff re-encoding the decoded digits gives b back: byte = ceil(q*256/243) */
    int q = 0;
    for (int j = 0; j < 5; j++) {
        int digit = (((b * POW3[j]) & 0xFF) * 3) >> 8;
        q = q * 3 + digit;  /* digit 0 is the most significant */
    }
    return (q * 256 + 242) / 243 == b;
}

/* stored code c = value + 1 of element e (0 <= e < padded k) of a packed row */
static int i2_code(const uint8_t *row, int64_t e) {
    int64_t blk = e / OB_I2_BLOCK, r = e % OB_I2_BLOCK;
    uint8_t byte = row[blk * OB_BLOCK_BYTES + r % 32];
    return (byte >> (2 * (r / 32))) & 3;
}

static int t1_6_code(const uint8_t *row, int64_t e) {
    int64_t blk = e / OB_T1_6_BLOCK, r = e % OB_T1_6_BLOCK;
    uint8_t byte = row[blk * OB_BLOCK_BYTES + r % 32];
    return (((byte * POW3[r / 32]) & 0xFF) * 3) >> 8;
}

int ob_ref_gemm_i2(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx,
                   int32_t *acc) {
    int64_t rb = ob_packed_row_bytes(k, OB_LAYOUT_I2);
    for (int64_t i = 0; i < n * rb; i++)  /* every byte, padding included: no code 3 anywhere */
        if (w[i] & (w[i] >> 1) & 0x55) return OB_ERR_CORRUPT;
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            int32_t sum = 0;
            for (int64_t e = 0; e < k; e++) sum += (i2_code(w + j * rb, e) - 1) * x[r * ldx + e];
            acc[r * n + j] = sum;
        }
    return OB_OK;
}

int ob_ref_gemm_t1_6(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                     int64_t ldx, int32_t *acc) {
    int64_t rb = ob_packed_row_bytes(k, OB_LAYOUT_T1_6);
    for (int64_t i = 0; i < n * rb; i++)
        if (!ob_t1_6_byte_valid(w[i])) return OB_ERR_CORRUPT;
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            int32_t sum = 0;
            for (int64_t e = 0; e < k; e++) sum += (t1_6_code(w + j * rb, e) - 1) * x[r * ldx + e];
            acc[r * n + j] = sum;
        }
    return OB_OK;
}

/* y = x / sqrt(mean(x^2) + eps) * w (RMSNorm, float32) or y = x; then onebit.quant.int8_absmax. */
int ob_ref_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                           const float *norm_weight, float norm_eps, int8_t *out, float *out_scale) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float inv_rms = 1.0f;
        if (norm_weight) {
            float ss = 0.0f;
            for (int64_t e = 0; e < k; e++) ss += xr[e] * xr[e];
            inv_rms = 1.0f / sqrtf(ss / (float)k + norm_eps);
        }
#define OB_Y(e) (norm_weight ? (xr[e] * inv_rms) * norm_weight[e] : xr[e])
        float amax = 0.0f;
        for (int64_t e = 0; e < k; e++) {
            float y = OB_Y(e);
            if (!isfinite(y)) return OB_ERR_VALUE;  /* NaN/inf would make every code undefined */
            amax = fmaxf(amax, fabsf(y));
        }
        /* exactly as torch evaluates `127.0 / tensor`: reciprocal, then multiply (two roundings;
         * 127.0f / amax differs by an ulp for ~25% of inputs and can flip a code at a tie) */
        float s = (1.0f / fmaxf(amax, 1e-5f)) * 127.0f;
        for (int64_t e = 0; e < k; e++) {
            float q = nearbyintf(OB_Y(e) * s);  /* default rounding mode: half to even */
            q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
            out[r * k + e] = (int8_t)q;
        }
#undef OB_Y
        out_scale[r] = 1.0f / s;
    }
    return OB_OK;
}
