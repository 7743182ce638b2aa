/* A whole decoder layer in one call (the engine's per-token Python overhead was one call per op):
 *
 *   subln (2B4T):  h = q8(rms(x) * input_ln);  q, k, v = W h;  y = attention(q, k, v)
 *                  x += Wo q8(rms(y) * attn_sub);  h = q8(rms(x) * post_ln)
 *                  x += Wdown q8(rms(act(Wgate h) * (Wup h)) * ffn_sub)
 *   inner (b1.58): every projection quantizes rms(its input) * its own norm weight
 *   pre (Llama):   as subln without the two sub-norms (norm[2], norm[3] NULL: o_proj and
 *                  down_proj quantize their raw input)
 *
 * q8 is ob_quantize_act_i8 (RMSNorm fused), W the packed ternary linears (validated by the
 * caller once, so called unchecked), attention is ob_attention, act is ReLU^2 or SiLU. Every
 * step is the same C function the parity tests check one by one; tests/test_engine.py checks the
 * composition against the PyTorch model. float32 activations throughout. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

enum { Q = 0, K = 1, V = 2, O = 3, GATE = 4, UP = 5, DOWN = 6 };
#define OB_MLP_ROWS 128 /* rows per MLP chunk of a prefill */

/* The sparse kernels pay from ~65% zeros (column-sparse) or skipped up_proj rows on (2B4T
 * shapes, cold weights, 2 threads: they read scattered rows, the dense kernel streams): with
 * fewer than min_pct percent the dense kernel runs (ob_layer.sparse_min_zeros; 0 = always
 * sparse, for tests). */
static int mostly_zero(const int8_t *x, int64_t n, int32_t min_pct) {
    int64_t zeros = 0;
    for (int64_t i = 0; i < n; i++) zeros += x[i] == 0;
    return zeros * 100 >= n * (int64_t)min_pct;
}

static void add_bias(float *o, int64_t T, int64_t n, const float *b) {
    if (b)
        for (int64_t r = 0; r < T; r++)
            for (int64_t j = 0; j < n; j++) o[r * n + j] += b[j];
}

/* silu(g) * u and relu(g)^2 * u in place in g. The sigmoid takes the exp of a non-positive
 * argument only (ob_expf_nonpos, the softmax's exp): 1 / (1 + e) for g >= 0, e / (1 + e) below. */
static void glu_scalar(float *g, const float *u, int64_t n, int relu2) {
    if (relu2)
        for (int64_t i = 0; i < n; i++) {
            float r = g[i] > 0.0f ? g[i] : 0.0f;
            g[i] = r * r * u[i];
        }
    else
        for (int64_t i = 0; i < n; i++) {
            float e = ob_expf_nonpos(-fabsf(g[i]));
            float sg = g[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            g[i] = g[i] * sg * u[i];
        }
}

#ifdef OB_ATTN_AVX2
/* glu_scalar 8 values at a time: the same operations in the same order (no FMA), the same floats */
OB_ATTN_TARGET static void glu_avx2(float *g, const float *u, int64_t n, int relu2) {
    int64_t n8 = n / 8 * 8;
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i), y;
        if (relu2) {
            __m256 r = _mm256_and_ps(gv, _mm256_cmp_ps(gv, zero, _CMP_GT_OQ));
            y = _mm256_mul_ps(_mm256_mul_ps(r, r), uv);
        } else {
            __m256 e = ob_expf_nonpos_avx2(_mm256_or_ps(gv, sign)); /* -|g| */
            __m256 d = _mm256_add_ps(one, e);
            __m256 sg = _mm256_blendv_ps(_mm256_div_ps(e, d), _mm256_div_ps(one, d),
                                         _mm256_cmp_ps(gv, zero, _CMP_GE_OQ));
            y = _mm256_mul_ps(_mm256_mul_ps(gv, sg), uv);
        }
        _mm256_storeu_ps(g + i, y);
    }
    glu_scalar(g + n8, u + n8, n - n8, relu2);
}
#endif

typedef struct {
    float *g;
    const float *u;
    int64_t n;
    int relu2, simd;
} glu_job_t;

static void glu_range(float *g, const float *u, int64_t n, int relu2, int simd) {
#ifdef OB_ATTN_AVX2
    if (simd) {
        glu_avx2(g, u, n, relu2);
        return;
    }
#endif
    (void)simd;
    glu_scalar(g, u, n, relu2);
}

static void glu_task(void *ctx, int t, int nt) {
    glu_job_t *J = (glu_job_t *)ctx;
    int64_t i0 = J->n * t / nt / 8 * 8, i1 = t + 1 == nt ? J->n : J->n * (t + 1) / nt / 8 * 8;
    glu_range(J->g + i0, J->u + i0, i1 - i0, J->relu2, J->simd);
}

int ob_glu(float *g, const float *u, int64_t n, int relu2) {
    if (!g || !u) return OB_ERR_NULL;
    if (n < 0) return OB_ERR_SIZE;
    glu_job_t J = {g, u, n, relu2, ob_kv_simd()};
    int64_t want = n / (1 << 15); /* a prefill's rows; a decode step's row stays on one thread */
    if (want < 2) glu_range(g, u, n, relu2, J.simd);
    else ob_parallel(glu_task, &J, want > 256 ? 256 : (int)want);
    return OB_OK;
}

int ob_decoder_layer(const ob_layer *L, float *x, int64_t T, int64_t pos, const float *rope_cos,
                     const float *rope_sin, int64_t rope_len, void *cache_k, void *cache_v,
                     int64_t cache_len) {
    return ob_decoder_layer_batch(L, x, 1, &T, &pos, rope_cos, rope_sin, rope_len, &cache_k,
                                  &cache_v, cache_len);
}

int ob_decoder_layer_batch(const ob_layer *L, float *x, int64_t nseq, const int64_t *seq_len,
                           const int64_t *seq_pos, const float *rope_cos, const float *rope_sin,
                           int64_t rope_len, void *const *cache_k, void *const *cache_v,
                           int64_t cache_len) {
    if (!L || !x || !seq_len || !seq_pos || !rope_cos || !rope_sin || !cache_k || !cache_v)
        return OB_ERR_NULL;
    if (nseq < 1) return OB_ERR_SIZE;
    int64_t T = 0; /* all rows: the projections, norms and GLU treat them alike */
    for (int64_t b = 0; b < nseq; b++) {
        if (seq_len[b] < 1) return OB_ERR_SIZE;
        if (!cache_k[b] || !cache_v[b]) return OB_ERR_NULL;
        T += seq_len[b];
    }
    int64_t D = L->hidden, F = L->ffn, H = L->heads, Hkv = L->kv_heads, hd = L->head_dim;
    if (T < 1 || D < 1 || F < 1 || H < 1 || Hkv < 1 || hd < 2) return OB_ERR_SIZE;
    for (int i = 0; i < 7; i++) /* subln/pre: slots 2, 3 (sub-norms) may be NULL, 4..6 unused */
        if (!L->w[i] || (!L->norm[i] && (L->inner || i < 2))) return OB_ERR_NULL;
    for (int i = 3; i < 7; i++) /* biases: q/k/v only */
        if (L->bias[i]) return OB_ERR_VALUE;
    int64_t QD = H * hd, KD = Hkv * hd;
    if (L->layout != OB_LAYOUT_I2 && L->layout != OB_LAYOUT_T1_6) return OB_ERR_SIZE;
    { /* every weight buffer holds exactly its projection (n x k at the layer's layout) */
        const int64_t pn[7] = {QD, KD, KD, D, F, F, D}, pk[7] = {D, D, D, QD, D, D, F};
        for (int i = 0; i < 7; i++) {
            int bst = ob_check_packed(L->w[i], L->w_bytes[i], pn[i], pk[i], L->layout);
            if (!bst && L->wt[i])
                bst = L->layout != OB_LAYOUT_I2 ? OB_ERR_BUFFER
                                                : ob_check_packed(L->wt[i], L->wt_bytes[i], pk[i], pn[i], OB_LAYOUT_I2);
            if (bst) return bst;
        }
    }
    /* The MLP runs on chunks of at most OB_MLP_ROWS rows (every row's result is its own: per-row
     * quantization, exact GEMM, elementwise GLU), so gate and up need C x F floats, not T x F:
     * 2B4T at 512 tokens 28 MB -> 7 MB of scratch. The GEMMs lose little (a 128-row GEMM decodes
     * each weight panel once per 128 rows instead of once per 512: ~2% of its time). */
    int64_t C = T < OB_MLP_ROWS ? T : OB_MLP_ROWS;
    int64_t maxk = D > QD ? D : QD;
    maxk = T * maxk > C * F ? T * maxk : C * F; /* codes: any projection's input */
    /* one scratch block: codes, scales, q, k, v, y, o, gate, up */
    size_t bytes = (size_t)maxk + (size_t)4 * (size_t)(T * (1 + QD + 2 * KD + QD + D) + 2 * C * F) + 64 +
                   (size_t)F * sizeof(int64_t);
    int kept;
    char *buf = (char *)ob_scratch_get(bytes, &kept);
    if (!buf) return OB_ERR_NOMEM;
    int64_t *rows = (int64_t *)buf; /* up rows to compute (sparse decode) */
    float *xs = (float *)(rows + F), *q = xs + T, *k = q + T * QD, *v = k + T * KD, *y = v + T * KD;
    float *o = y + T * QD, *g = o + T * D, *u = g + C * F;
    int8_t *xc = (int8_t *)(u + C * F);
    int64_t TT = T; /* rows the QUANT/LIN steps below work on (a chunk of them in the MLP) */
    int st = OB_OK, lay = L->layout;
    float eps = L->eps;
    int a48 = L->act_scheme == OB_ACT_A4_8, sparse = T <= OB_SPARSE_MAX_T;
    if (L->act_scheme != OB_ACT_A8 && !a48) {
        st = OB_ERR_VALUE;
        goto done;
    }
    /* the input quantizer of projection idx: a8 INT8 everywhere; a4.8 INT4 for q/k/v/gate/up,
     * top-K then INT8 for o, INT8 for down */
#define QUANT(idx, src, k_, norm)                                                                   \
    do {                                                                                            \
        if ((st = !a48 || (idx) == DOWN ? ob_quantize_act_i8(src, TT, k_, k_, norm, eps, xc, xs)     \
                  : (idx) == O ? ob_quantize_act_topk_i8(src, TT, k_, k_, norm, eps, L->topk_keep, xc, xs) \
                               : ob_quantize_act_i4(src, TT, k_, k_, norm, eps, xc, xs)))          \
            goto done;                                                                              \
    } while (0)
#define LIN(idx, n_, k_, out)                                                                       \
    do {                                                                                            \
        if ((st = sparse && L->wt[idx] && lay == OB_LAYOUT_I2 &&                                     \
                          mostly_zero(xc, TT * (k_), L->sparse_min_zeros)                           \
                      ? ob_linear_colsparse_i2(L->wt[idx], L->wt_bytes[idx], n_, k_, xc, TT, k_, L->w_scale[idx], xs, out) \
                      : ob_linear_unchecked(lay, L->w[idx], n_, k_, xc, TT, k_, L->w_scale[idx], xs, out))) \
            goto done;                                                                              \
    } while (0)
/* two or three dense projections of the same codes xc in one job (n3 = 0: two); none of them
 * has a transposed copy (only o/down do) */
#define LIN3(i1, n1, o1, i2, n2, o2, i3, n3, o3, k_)                                                \
    do {                                                                                          \
        const uint8_t *w_[3] = {L->w[i1], L->w[i2], L->w[i3]};                                    \
        const int64_t n_[3] = {n1, n2, n3};                                                       \
        const float s_[3] = {L->w_scale[i1], L->w_scale[i2], L->w_scale[i3]};                     \
        float *o_[3] = {o1, o2, o3};                                                              \
        if ((st = ob_linear_multi_unchecked(lay, (n3) > 0 ? 3 : 2, w_, n_, k_, xc, TT, k_, s_, xs, o_))) \
            goto done;                                                                            \
    } while (0)

    if (L->inner) {
        QUANT(Q, x, D, L->norm[Q]);
        LIN(Q, QD, D, q);
        QUANT(K, x, D, L->norm[K]);
        LIN(K, KD, D, k);
        QUANT(V, x, D, L->norm[V]);
        LIN(V, KD, D, v);
    } else { /* one input for q, k and v: one job over the three (small k/v jobs idle a thread) */
        QUANT(Q, x, D, L->norm[0]); /* input_layernorm */
        LIN3(Q, QD, q, K, KD, k, V, KD, v, D);
    }
    add_bias(q, T, QD, L->bias[Q]);
    add_bias(k, T, KD, L->bias[K]);
    add_bias(v, T, KD, L->bias[V]);
    for (int64_t b = 0, r = 0; b < nseq; r += seq_len[b], b++) /* attention: per sequence */
        if ((st = ob_attention_kv_split(q + r * QD, k + r * KD, v + r * KD, seq_len[b], seq_pos[b],
                                        H, Hkv, hd, rope_cos, rope_sin, rope_len, L->kv_bits,
                                        cache_k[b], cache_v[b], cache_len, y + r * QD,
                                        !L->batch_invariant)))
            goto done;
    QUANT(O, y, QD, L->inner ? L->norm[O] : L->norm[2]); /* attn_sub_norm */
    LIN(O, D, QD, o);
    for (int64_t i = 0; i < T * D; i++) x[i] += o[i];
    for (int64_t r0 = 0; r0 < T; r0 += C) { /* the MLP, C rows at a time */
        float *xr = x + r0 * D;
        TT = T - r0 < C ? T - r0 : C;
        if (L->inner) {
            QUANT(GATE, xr, D, L->norm[GATE]);
            LIN(GATE, F, D, g);
            QUANT(UP, xr, D, L->norm[UP]);
        } else {
            QUANT(GATE, xr, D, L->norm[1]); /* post_attention_layernorm */
            if (!(sparse && L->skip_up && L->relu2)) { /* gate and up in one job */
                LIN3(GATE, F, g, UP, F, u, UP, 0, u, D);
            } else {
                LIN(GATE, F, D, g);
            }
        }
        if (!(sparse && L->skip_up && L->relu2)) {
            if (L->inner) LIN(UP, F, D, u); /* (subln/pre: done with the gate) */
        } else { /* up rows only where relu(gate) > 0, per token */
            for (int64_t r = 0; r < TT; r++) {
                const float *gr = g + r * F;
                float *ur = u + r * F;
                int64_t n_on = 0;
                for (int64_t j = 0; j < F; j++) {
                    if (gr[j] > 0.0f) rows[n_on++] = j;
                    ur[j] = 0.0f;
                }
                if ((F - n_on) * 100 < F * (int64_t)L->sparse_min_zeros) { /* too few to skip: dense is faster */
                    if ((st = ob_linear_unchecked(lay, L->w[UP], F, D, xc + r * D, 1, D, L->w_scale[UP],
                                                  xs + r, ur)))
                        goto done;
                } else if ((st = ob_linear_rows(lay, L->w[UP], L->w_bytes[UP], F, D, xc + r * D, rows,
                                                n_on, L->w_scale[UP], xs[r], ur)))
                    goto done;
            }
        }
        ob_glu(g, u, TT * F, L->relu2); /* arguments valid: returns OB_OK */
        QUANT(DOWN, g, F, L->inner ? L->norm[DOWN] : L->norm[3]); /* ffn_sub_norm */
        LIN(DOWN, D, F, o);
        for (int64_t i = 0; i < TT * D; i++) xr[i] += o[i];
    }
#undef QUANT
#undef LIN
#undef LIN3
done:
    ob_scratch_put(buf, kept);
    return st;
}
