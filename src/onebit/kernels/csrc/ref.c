/* Scalar reference kernels: obviously correct, one element at a time with the spec's formulas
 * (docs/formats.md §2-3). Every other variant must give bit-identical integers. */
#include <math.h>
#include <string.h>
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

/* The reference reads the activations as given (xp, unpadded k) and ignores xsum. */
int ob_ref_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1) {
    for (int64_t i = j0 * a->rb; i < j1 * a->rb; i++)  /* every byte, padding too: no code 3 */
        if (a->w[i] & (a->w[i] >> 1) & 0x55) return OB_ERR_CORRUPT;
    for (int64_t r = 0; r < a->m; r++)
        for (int64_t j = j0; j < j1; j++) {
            int32_t sum = 0;
            for (int64_t e = 0; e < a->k; e++)
                sum += (i2_code(a->w + j * a->rb, e) - 1) * a->xp[r * a->ldxp + e];
            a->acc[r * a->ldc + j] = sum;
        }
    return OB_OK;
}

int ob_ref_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1) {
    for (int64_t i = j0 * a->rb; i < j1 * a->rb; i++)
        if (!ob_t1_6_byte_valid(a->w[i])) return OB_ERR_CORRUPT;
    for (int64_t r = 0; r < a->m; r++)
        for (int64_t j = j0; j < j1; j++) {
            int32_t sum = 0;
            for (int64_t e = 0; e < a->k; e++)
                sum += (t1_6_code(a->w + j * a->rb, e) - 1) * a->xp[r * a->ldxp + e];
            a->acc[r * a->ldc + j] = sum;
        }
    return OB_OK;
}

/* Sum of squares in a fixed order that 8-lane SIMD reproduces exactly: lane l sums the
 * elements e = l (mod 8) in order, then the lanes combine as ((0+4) + (2+6)) + ((1+5) + (3+7)). */
/* sum |x| in double, lanes e mod 4 combined as ((p0 + p2) + (p1 + p3)): ~ torch's cascaded float
 * sum (the float nearest the exact sum), in the order the AVX2 INT4 quantizer adds too */
double ob_abssum4_ref(const float *x, int64_t k) {
    double p[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t e = 0; e < k; e++) p[e % 4] += fabsf(x[e]);
    return (p[0] + p[2]) + (p[1] + p[3]);
}

float ob_sumsq_ref(const float *x, int64_t k) {
    float p[8] = {0};
    for (int64_t e = 0; e < k; e++) p[e % 8] += x[e] * x[e];
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

/* y = x / sqrt(mean(x^2) + eps) * w (RMSNorm, float32) or y = x; then onebit.quant.int8_absmax. */
int ob_ref_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                           const float *norm_weight, float norm_eps, int8_t *out, float *out_scale) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float inv_rms = 1.0f;
        if (norm_weight) inv_rms = 1.0f / sqrtf(ob_sumsq_ref(xr, k) / (float)k + norm_eps);
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

void ob_ref_linear_i8(const ob_i8_args *a, int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < a->m; r++)
        for (int64_t j = j0; j < j1; j++) {
            int32_t sum = 0;
            for (int64_t e = 0; e < a->k; e++) sum += a->w[j * a->k + e] * a->x[r * a->ldx + e];
            a->out[r * a->n + j] = (float)sum * a->w_scale[j] * a->x_scale[r];
        }
}

/* IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN). */
float ob_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void ob_ref_linear_f16(const ob_f16_args *a, int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < a->m; r++)
        for (int64_t j = j0; j < j1; j++) {
            float s = 0.0f;
            for (int64_t e = 0; e < a->k; e++) s += ob_half_to_float(a->w[j * a->k + e]) * a->x[r * a->ldx + e];
            a->out[r * a->n + j] = s;
        }
}

void ob_ref_linear_i4(const ob_i8_args *a, int64_t j0, int64_t j1) {
    const uint8_t *w = (const uint8_t *)a->w;
    int64_t rb = ob_i4_row_bytes(a->k);
    for (int64_t r = 0; r < a->m; r++)
        for (int64_t j = j0; j < j1; j++) {
            int32_t sum = 0;
            for (int64_t e = 0; e < a->k; e++) {
                uint8_t b = w[j * rb + e / 64 * 32 + e % 32];
                int q = (e % 64 < 32 ? (b & 15) : (b >> 4)) - 8;
                sum += q * a->x[r * a->ldx + e];
            }
            a->out[r * a->n + j] = (float)sum * a->w_scale[j] * a->x_scale[r];
        }
}
