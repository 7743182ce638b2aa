/* onebit CPU kernels: the public C ABI (no Python, no torch: raw pointers, int64 sizes, status codes).
 *
 * Packed weights are the on-disk layouts of docs/formats.md, used as they are:
 *   i2   : rows of packed_row_bytes(k) = ceil(k/128)*32 bytes, byte m of a block = 4 lanes of 2 bits
 *   t1_6 : rows of ceil(k/160)*32 bytes, byte m of a block = 5 base-3 digits (ceil(q*256/243))
 * The weight matrix is [n, k] (nn.Linear [out, in]); activations are int8 [m, k] with row stride ldx.
 * Padding columns (>= k) never contribute: the kernels multiply them by zero activations.
 *
 * Every function returns OB_OK (0) or a negative status below; on error the outputs are unspecified.
 * Every weight pointer comes with the byte length of the buffer behind it (w_bytes: a mapped file's
 * tensor is only that long); the sizes n, k (and the layout) must make exactly that many bytes, else
 * OB_ERR_BUFFER before any weight byte is read, so a file whose header disagrees with its sizes
 * cannot make a kernel read past the buffer.
 * Variants ("reference", "avx2", "avx512vnni", "avx512vnni_zmm") give bit-identical integer
 * results; the variant is chosen once, at first use, by CPU detection (the last of VARIANTS in
 * dispatch.c the CPU runs), per shape class by ob_set_isa_class, or forced with the environment variable
 * ONEBIT_KERNELS=<name> (read in C at that first use; a name this build or CPU cannot run selects
 * "reference") or ob_set_isa().
 * Not thread-safe to call ob_set_isa while kernels run; the kernels themselves are reentrant.
 */
#ifndef ONEBIT_KERNELS_H
#define ONEBIT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define OB_API __declspec(dllexport)
#else
#define OB_API __attribute__((visibility("default")))
#endif

#define OB_ABI_VERSION 15

enum {
    OB_OK = 0,
    OB_ERR_NULL = -1,     /* a required pointer is NULL */
    OB_ERR_SIZE = -2,     /* m, n or k < 1, or k > OB_MAX_K */
    OB_ERR_STRIDE = -3,   /* ldx < k */
    OB_ERR_CORRUPT = -4,  /* packed weights hold an invalid code/byte (i2 code 3, t1_6 unused byte) */
    OB_ERR_ISA = -5,      /* unknown variant name, or the CPU lacks it */
    OB_ERR_NOMEM = -6,    /* scratch allocation failed */
    OB_ERR_VALUE = -7,    /* non-finite activation (after the norm), or eps < 0 / non-finite */
    OB_ERR_BUFFER = -8    /* a weight buffer's byte length (w_bytes) is not what n, k and the layout
                           * make it: the buffer does not hold this matrix (e.g. a t1_6 tensor
                           * read as i2); nothing was read */
};

enum { OB_LAYOUT_I2 = 0, OB_LAYOUT_T1_6 = 1 };

/* Largest k whose int32 accumulator cannot overflow: |sum| <= 128 * 2^24 = 2^31 (and -2^31 fits). */
#define OB_MAX_K ((int64_t)1 << 24)

/* Bytes of one packed row of k weights (0 for k < 1 or an unknown layout). */
OB_API int64_t ob_packed_row_bytes(int64_t k, int layout);

/* x [m, k] float32 (row stride ldx) -> out int8 [m, k] (row stride k), out_scale [m] float32.
 * If norm_weight [k] is not NULL, first y = x / sqrt(mean(x^2) + norm_eps) * norm_weight (RMSNorm,
 * float32). Then per row: s = (1.0f / fmaxf(max|y|, 1e-5f)) * 127.0f (torch's `127.0 / t` is
 * t.reciprocal() * 127); code = clamp(rint_even(y*s), -128, 127); out_scale = 1.0f / s.
 * Without norm codes and scales equal onebit.quant.int8_absmax bit for bit. */
OB_API int ob_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                              const float *norm_weight, float norm_eps,
                              int8_t *out, float *out_scale);

/* BitNet a4.8 activation quantizers (BITNET.md §2), same arguments and fused RMSNorm as
 * ob_quantize_act_i8; codes are int8 values, so every ternary x int8 kernel runs them unchanged
 * (W1.58A4: an int4 code is an int8 in [-8, 7]).
 *   i4:      beta = (float)(sum |y| in double) / k, s = (1.0f / (beta + 1e-5f)) * sqrt(7)
 *            (torch's `sqrt7 / t`), code = clamp(rint_even(y*s), -8, 7), out_scale = beta / sqrt(7)
 *            (onebit.quant.int4_absmean; the sum order may differ from torch's by an ulp).
 *   topk_i8: keep the kk = max(1, ceil(keep * k)) entries of largest |y| (ties: lowest index first),
 *            zero the rest (all kept if kk >= k), then ob_quantize_act_i8's INT8 absmax
 *            (onebit.quant.topk_sparsify then int8_absmax). keep in (0, 1], else OB_ERR_VALUE. */
OB_API int ob_quantize_act_i4(const float *x, int64_t m, int64_t k, int64_t ldx,
                              const float *norm_weight, float norm_eps,
                              int8_t *out, float *out_scale);
OB_API int ob_quantize_act_topk_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                                   const float *norm_weight, float norm_eps, double keep,
                                   int8_t *out, float *out_scale);

/* acc[m, n] (row stride n) = x[m, k] (int8, row stride ldx) @ W[n, k]^T, exact int32. M = 1 is GEMV.
 * w_bytes = n * ob_packed_row_bytes(k, layout) (else OB_ERR_BUFFER).
 * Returns OB_ERR_CORRUPT if a packed byte is invalid. */
OB_API int ob_gemm_i2(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                      const int8_t *x, int64_t m, int64_t ldx, int32_t *acc);
OB_API int ob_gemm_t1_6(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                        const int8_t *x, int64_t m, int64_t ldx, int32_t *acc);

/* out[m, n] = (float)acc * w_scale * x_scale[row]  (float32, in that order), acc as ob_gemm_*. */
OB_API int ob_linear_i2(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x,
                        int64_t m, int64_t ldx, float w_scale, const float *x_scale, float *out);
OB_API int ob_linear_t1_6(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x,
                          int64_t m, int64_t ldx, float w_scale, const float *x_scale, float *out);

/* For weights that passed ob_validate_packed (the engine validates once at load): the same as
 * ob_linear_*, minus the per-call code check. Invalid codes give wrong sums, never a memory error. */
OB_API int ob_validate_packed(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, int layout);
OB_API int ob_linear_i2_unchecked(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                                  const int8_t *x, int64_t m, int64_t ldx, float w_scale,
                                  const float *x_scale, float *out);
OB_API int ob_linear_t1_6_unchecked(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                                    const int8_t *x, int64_t m, int64_t ldx, float w_scale,
                                    const float *x_scale, float *out);

/* int8 x int8 (the 8-bit LM head / embeddings): out[m, n] = (sum_e w[j,e] * x[r,e]) * w_scale[j]
 * * x_scale[r] (float32, in that order). w int8 [n, k] (row stride k), per-row scales w_scale[n];
 * x int8 [m, k] (row stride ldx) with x in [-127, 127] (what ob_quantize_act_i8 writes);
 * OB_ERR_VALUE if an activation is -128. Exact int32 accumulation. w_bytes = n * k. */
OB_API int ob_linear_i8(const int8_t *w, int64_t w_bytes, const float *w_scale, int64_t n, int64_t k,
                        const int8_t *x, int64_t m, int64_t ldx, const float *x_scale, float *out);

/* One attention step of a decoder layer, float32, T new tokens at positions pos..pos+T-1:
 * rotates q [T, H, hd] and k [T, Hkv, hd] in place (RoPE, rotate-half layout, tables
 * rope_cos/rope_sin [rope_len, hd/2]), writes k and v [T, Hkv, hd] into the caches
 * [Hkv, cache_len, hd] at pos.., then y [T, H*hd] = causal softmax(q k^T / sqrt(hd)) v over
 * keys 0..pos+t, query head h reading kv head h / (H/Hkv). Threaded over (token, head). */
OB_API int ob_attention(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H,
                        int64_t Hkv, int64_t hd, const float *rope_cos, const float *rope_sin,
                        int64_t rope_len, float *cache_k, float *cache_v, int64_t cache_len, float *y);

/* Compact KV rows (docs/formats.md §10; kv_bits 16, 8, 4, 3): a row is hd float32 values, stored as
 * ob_kv_row_bytes(hd, bits) = ceil(hd*bits/8) bytes plus one IEEE float16 step (uint16 bits).
 * 8/4/3: LSB-first packed unsigned codes, byte-identical to onebit.quant.quantize_kv. 16: the
 * values as IEEE float16 (round to nearest even, saturating at +-65504, as numpy's
 * np.clip(x, -65504, 65504).astype(np.float16)), step 1.0. The quantizer returns OB_ERR_VALUE for
 * a NaN/inf value, OB_ERR_SIZE for bits not in {16, 8, 4, 3}. */
OB_API int64_t ob_kv_row_bytes(int64_t hd, int bits);
OB_API int ob_kv_quantize_rows(const float *x, int64_t n, int64_t hd, int bits, uint8_t *out,
                               uint16_t *step);
OB_API int ob_kv_dequantize_rows(const uint8_t *in, const uint16_t *step, int64_t n, int64_t hd,
                                 int bits, float *out);

/* ob_attention over a cache of kv_bits (0 or 32: float32 [Hkv, cache_len, hd] as ob_attention;
 * 16: float16, 8, 4, 3: quantized). A compact cache (one sequence, K or V, one layer) is one block of
 * ob_kv_cache_bytes(Hkv, cache_len, hd, kv_bits) bytes (2-byte aligned):
 *   steps uint16 [Hkv][cache_len] | codes uint8 [Hkv][cache_len][row_bytes(kv_bits)]
 *   | kv_bits 3 only: uint8 [Hkv][row_bytes(4)], the position-0 rows at 4 bits (BOS rule);
 * kv_bits 16: float16 [Hkv][cache_len][hd] only (no steps), 2 bytes per value.
 * New rows are quantized when written; attention reads them dequantized. OB_ERR_VALUE: NaN/inf
 * in k or v (compact caches only). */
OB_API int64_t ob_kv_cache_bytes(int64_t Hkv, int64_t cache_len, int64_t hd, int kv_bits);
OB_API int ob_attention_kv(float *q, float *k, const float *v, int64_t T, int64_t pos, int64_t H,
                           int64_t Hkv, int64_t hd, const float *rope_cos, const float *rope_sin,
                           int64_t rope_len, int kv_bits, void *cache_k, void *cache_v,
                           int64_t cache_len, float *y);

/* One decoder layer's weights for ob_decoder_layer. w/w_scale: packed q, k, v, o, gate, up, down
 * (validated once with ob_validate_packed: the layer calls the unchecked linears). norm: for
 * inner (b1.58) placement the per-projection norm weights in the same order; for subln (2B4T)
 * [input_layernorm, post_attention_layernorm, attn_sub_norm, ffn_sub_norm, 3 unused]; a NULL
 * sub-norm means none (the Llama "pre" placement: o_proj/down_proj quantize their raw input). */
typedef struct {
    int64_t hidden, ffn, heads, kv_heads, head_dim;
    int32_t layout;  /* OB_LAYOUT_I2 / OB_LAYOUT_T1_6 */
    int32_t relu2;   /* 1: ReLU^2-GLU, 0: SwiGLU */
    int32_t inner;   /* 1: b1.58 norms inside every projection, 0: SubLN */
    float eps;       /* RMSNorm epsilon */
    int32_t kv_bits; /* KV cache: 0 (or 32) float32, 16 float16, 8/4/3 quantized (ob_attention_kv) */
    const uint8_t *w[7];
    float w_scale[7];
    const float *norm[7];
    int32_t act_scheme; /* OB_ACT_A8 (INT8 everywhere) or OB_ACT_A4_8 (a4.8: INT4 q/k/v/gate/up,
                         * top-K then INT8 o_proj, INT8 down_proj) */
    double topk_keep;   /* a4.8: fraction of o_proj inputs kept per token, (0, 1] */
    /* Sparse decode (all optional, NULL/0 = dense). For rows of few tokens (T <= OB_SPARSE_MAX_T):
     * wt[i] = ob_transpose_packed_i2 of w[i] (i2 only) runs projection i with
     * ob_linear_colsparse_i2, which reads only the weight columns of nonzero inputs (o_proj
     * after top-K, down_proj after ReLU^2); skip_up = 1 (ReLU^2 only) computes up_proj rows only
     * where the gate output is > 0 (the GLU product is exactly 0 elsewhere). Results are
     * bit-identical to the dense path. */
    const uint8_t *wt[7];
    int32_t skip_up;
    int32_t sparse_min_zeros; /* percent of zero inputs (or of up_proj rows off) from which
                               * wt[i] (or the row list) is used, dense below (65: measured
                               * break-even); 0: always (tests) */
    /* Full-precision biases added after the q/k/v projections (a fine-tuned Qwen2), float32
     * [out_features] or NULL; bias[3..6] must be NULL (OB_ERR_VALUE otherwise). */
    const float *bias[7];
    /* 1: every row's result is a function of its own token, position and cache only, whatever
     * rows run beside it, however its prompt was chunked and on any thread count (attention then
     * never splits a decode step's keys over threads: split-K's combined floats depend on them).
     * The batched server engine sets it; 0 keeps split-K for single-stream long-context decode. */
    int32_t batch_invariant;
    /* Byte lengths of the buffers behind w[i] (= n_i * ob_packed_row_bytes(k_i, layout), n_i x k_i
     * the projection's shape from the sizes above) and behind wt[i] when set (= k_i *
     * ob_packed_row_bytes(n_i, OB_LAYOUT_I2)); any other value: OB_ERR_BUFFER, nothing read. */
    int64_t w_bytes[7];
    int64_t wt_bytes[7];
} ob_layer;
enum { OB_ACT_A8 = 0, OB_ACT_A4_8 = 1 };
#define OB_SPARSE_MAX_T 4

/* x [T, hidden] float32 += the layer's attention and MLP for T tokens at positions pos..pos+T-1
 * (caches of layer->kv_bits and RoPE tables as ob_attention_kv). */
OB_API int ob_decoder_layer(const ob_layer *layer, float *x, int64_t T, int64_t pos,
                            const float *rope_cos, const float *rope_sin, int64_t rope_len,
                            void *cache_k, void *cache_v, int64_t cache_len);
/* The same for nseq sequences at once (batched decoding): x holds their rows one after another,
 * sequence b has seq_len[b] rows at positions seq_pos[b].. and its own caches cache_k[b] /
 * cache_v[b]. The projections run as one GEMM over all rows; attention runs per sequence. Each
 * row's result is bit-identical to running its sequence alone (per-row quantization, exact
 * integer GEMM). */
OB_API int ob_decoder_layer_batch(const ob_layer *layer, float *x, int64_t nseq,
                                  const int64_t *seq_len, const int64_t *seq_pos,
                                  const float *rope_cos, const float *rope_sin, int64_t rope_len,
                                  void *const *cache_k, void *const *cache_v, int64_t cache_len);

/* ---- sparse decode (activation sparsity made into skipped weight reads) ------------------
 * ob_transpose_packed_i2: w [n, k] in i2 (validated) -> wt [k, ob_packed_row_bytes(n, I2)], the
 * i2 packing of w's transpose (row e of wt = column e of w; padding codes 1 = weight 0).
 * OB_ERR_CORRUPT for a code 3 in w.
 * ob_linear_colsparse_i2: out [m, n] = (sum over the nonzero x[r, e] of x[r, e] * w[:, e]) *
 * w_scale * x_scale[r], reading only the wt rows e where x[r, e] != 0; exact int32 sums, so
 * bit-identical to ob_linear_i2 on w. Rows of x run one after another (meant for decoding).
 * (w_bytes of w [n, k]; wt_bytes = k * ob_packed_row_bytes(n, OB_LAYOUT_I2) for wt.)
 * ob_linear_rows: ob_linear_i2/t1_6 for ONE activation row, computing only the output rows
 * listed in rows[0..nrows) (each in [0, n), any order; out[j] of unlisted j untouched).
 * Like the *_unchecked linears, these two trust their weights (ob_validate_packed once, or wt from
 * ob_transpose_packed_i2): an invalid code gives a wrong sum, never an out-of-bounds access. */
OB_API int ob_transpose_packed_i2(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                                  uint8_t *wt);
OB_API int ob_linear_colsparse_i2(const uint8_t *wt, int64_t wt_bytes, int64_t n, int64_t k,
                                  const int8_t *x, int64_t m, int64_t ldx, float w_scale,
                                  const float *x_scale, float *out);
OB_API int ob_linear_rows(int layout, const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                          const int8_t *x, const int64_t *rows, int64_t nrows, float w_scale,
                          float x_scale, float *out);

/* 4-bit weights x int8 (a 4-bit LM head): rows of ceil(k/64)*32 bytes; in each 32-byte block the
 * low nibbles hold elements 0..31 and the high nibbles 32..63 of the block, as u = q + 8 with q in
 * [-8, 7] (padding: u = 8). out[m, n] = (sum q*x) * w_scale[j] * x_scale[r]; x in [-127, 127].
 * w_bytes = n * ceil(k/64) * 32. */
OB_API int ob_linear_i4(const uint8_t *w, int64_t w_bytes, const float *w_scale, int64_t n, int64_t k,
                        const int8_t *x, int64_t m, int64_t ldx, const float *x_scale, float *out);

/* float16 weights x float32 activations (an fp16 LM head): out[m, n] = x[m, k] . w[n, k] (w as
 * IEEE binary16 bits, row stride k; x row stride ldx), float32 accumulation. Threaded over n.
 * w_bytes = n * k * 2. */
OB_API int ob_linear_f16(const uint16_t *w, int64_t w_bytes, int64_t n, int64_t k, const float *x,
                         int64_t m, int64_t ldx, float *out);

/* codes int8 [n, k] in {-1,0,1} (row stride ldc) -> out uint8 [n, ob_packed_row_bytes(k)],
 * byte-identical to onebit.formats.packing.pack. OB_ERR_VALUE for a code outside {-1,0,1}. */
OB_API int ob_pack(const int8_t *codes, int64_t n, int64_t k, int64_t ldc, int layout, uint8_t *out);
/* The inverse: out int8 [n, k]. OB_ERR_CORRUPT for an invalid byte/code or nonzero padding;
 * w_bytes as ob_gemm_*. */
OB_API int ob_unpack(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, int layout, int8_t *out);

/* Threads used by the GEMM kernels: ob_set_num_threads(n >= 1), else the environment variable
 * ONEBIT_NUM_THREADS, else the physical cores this process may run on. Pool workers spin
 * ONEBIT_SPIN_US microseconds (default 50) after a call, then sleep. */
OB_API int ob_set_num_threads(int nthreads);
OB_API int ob_get_num_threads(void);

/* Reads `bytes` of buf on up to nthreads threads (the bench's bandwidth probe); returns a checksum. */
OB_API uint64_t ob_read_probe(const uint8_t *buf, int64_t bytes, int nthreads);

/* The gated activation of ob_decoder_layer, in place: g[i] = silu(g[i]) * u[i] (relu2 = 0,
 * SwiGLU) or relu(g[i])^2 * u[i] (relu2 = 1, ReLU^2-GLU). silu(g) = g * sigmoid(g), the sigmoid
 * 1 / (1 + e) for g >= 0 and e / (1 + e) below, e = exp(-|g|) by the softmax's polynomial (max rel.
 * error ~2 ulp); float32, no FMA, so every variant (AVX2 8 lanes, threads for long rows, scalar)
 * gives the same floats. OB_ERR_NULL / OB_ERR_SIZE (n < 0). */
OB_API int ob_glu(float *g, const float *u, int64_t n, int relu2);

/* The variant in use ("reference", "avx2", "avx512vnni", "avx512vnni_zmm", ...); static string. */
OB_API const char *ob_isa(void);
/* Kernel choice per shape class of the ternary GEMM (ob_gemm_*, ob_linear_*, the layers): the
 * number of activation rows m picks the class (ob_isa_class_for_m: m < 8 GEMV/row kernels, 8-31,
 * 32-255, >= 256), and ob_set_isa_class(cls, name) makes that class run variant `name` (NULL or
 * "": follow ob_isa again; OB_ERR_ISA if unknown or unsupported, OB_ERR_SIZE for a bad class).
 * Every variant gives the same integers, so this only moves speed; the Python side sets it from
 * a per-machine measurement (onebit.kernels.tune). ob_set_isa clears every class.
 * ob_isa_class(cls): the variant that class runs now (NULL for a bad class). */
enum { OB_ISA_GEMV = 0, OB_ISA_GEMM_S = 1, OB_ISA_GEMM_M = 2, OB_ISA_GEMM_L = 3, OB_ISA_CLASSES = 4 };
OB_API int ob_isa_class_for_m(int64_t m);
OB_API int ob_set_isa_class(int cls, const char *name);
OB_API const char *ob_isa_class(int cls);
/* 1 if this build has variant `name` and the CPU runs it, else 0. */
OB_API int ob_isa_supported(const char *name);
/* Force a variant (NULL or "" = auto-detect again). OB_ERR_ISA if unknown or unsupported. */
OB_API int ob_set_isa(const char *name);
OB_API int ob_abi_version(void);

#ifdef __cplusplus
}
#endif
#endif /* ONEBIT_KERNELS_H */
