/* Internal: the variant table that dispatch.c fills by CPU detection (not part of the ABI). */
#ifndef ONEBIT_KERNELS_INTERNAL_H
#define ONEBIT_KERNELS_INTERNAL_H

#include <stddef.h>
#include "onebit_kernels.h"

#define OB_I2_BLOCK 128    /* values per 32-byte block, 2.0 bpw */
#define OB_T1_6_BLOCK 160  /* values per 32-byte block, 1.6 bpw */
#define OB_BLOCK_BYTES 32

/* acc[m, n] = x[m, k] @ W[n, k]^T; arguments already checked by dispatch.c. */
typedef int (*ob_gemm_fn)(const uint8_t *w, int64_t n, int64_t k,
                          const int8_t *x, int64_t m, int64_t ldx, int32_t *acc);

typedef struct {
    const char *name;
    ob_gemm_fn gemm[2];  /* indexed by OB_LAYOUT_I2 / OB_LAYOUT_T1_6 */
    int auto_select;     /* 0: only when forced (not yet verified on real hardware) */
} ob_variant;

/* 1 if byte b can be written by the t1_6 packer (243 of 256 values). */
int ob_t1_6_byte_valid(uint8_t b);

int ob_ref_gemm_i2(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx,
                   int32_t *acc);
int ob_ref_gemm_t1_6(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx,
                     int32_t *acc);
int ob_ref_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx,
                           const float *norm_weight, float norm_eps, int8_t *out, float *out_scale);

#if defined(__x86_64__) || defined(__i386__)
#define OB_HAVE_X86 1
int ob_avx2_gemm_i2(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m, int64_t ldx,
                    int32_t *acc);
int ob_avx2_gemm_t1_6(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                      int64_t ldx, int32_t *acc);
int ob_avx512vnni_gemm_i2(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                          int64_t ldx, int32_t *acc);
int ob_avx512vnni_gemm_t1_6(const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                            int64_t ldx, int32_t *acc);
#endif
/* TODO(arm): a NEON variant (vdotq_s32 / vmull) in arm.c, selected on __aarch64__. */

#endif
