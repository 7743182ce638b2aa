/* Packing in C (byte-identical to onebit.formats.packing, the numpy reference) and the memory
 * read probe the kernel bench uses as its bandwidth ceiling. Portable C, no SIMD intrinsics. */
#include <string.h>
#include "internal.h"

static const int POW3[5] = {81, 27, 9, 3, 1}; /* weight of lane j in q (most significant first) */

static int layout_block(int layout) {
    return layout == OB_LAYOUT_I2 ? OB_I2_BLOCK : layout == OB_LAYOUT_T1_6 ? OB_T1_6_BLOCK : 0;
}

int ob_pack(const int8_t *codes, int64_t n, int64_t k, int64_t ldc, int layout, uint8_t *out) {
    int block = layout_block(layout);
    if (!codes || !out) return OB_ERR_NULL;
    if (!block || n < 1 || k < 1 || k > OB_MAX_K) return OB_ERR_SIZE;
    if (ldc < k) return OB_ERR_STRIDE;
    int64_t rb = ob_packed_row_bytes(k, layout), nblk = rb / OB_BLOCK_BYTES;
    int lanes = block / OB_BLOCK_BYTES;
    for (int64_t r = 0; r < n; r++) {
        const int8_t *cr = codes + r * ldc;
        for (int64_t e = 0; e < k; e++)
            if (cr[e] < -1 || cr[e] > 1) return OB_ERR_VALUE;
        for (int64_t b = 0; b < nblk; b++)
            for (int m = 0; m < OB_BLOCK_BYTES; m++) {
                unsigned acc = 0;
                for (int j = 0; j < lanes; j++) {
                    int64_t e = b * block + 32 * j + m;
                    unsigned c = e < k ? (unsigned)(cr[e] + 1) : 1u; /* padding: value 0 */
                    acc += layout == OB_LAYOUT_I2 ? c << (2 * j) : c * (unsigned)POW3[j];
                }
                /* t1_6: byte = ceil(q * 256 / 243) */
                out[r * rb + b * OB_BLOCK_BYTES + m] =
                    (uint8_t)(layout == OB_LAYOUT_I2 ? acc : (acc * 256 + 242) / 243);
            }
    }
    return OB_OK;
}

int ob_unpack(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, int layout, int8_t *out) {
    int block = layout_block(layout);
    if (!w || !out) return OB_ERR_NULL;
    if (!block || n < 1 || k < 1 || k > OB_MAX_K) return OB_ERR_SIZE;
    int bst = ob_check_packed(w, w_bytes, n, k, layout);
    if (bst) return bst;
    int64_t rb = ob_packed_row_bytes(k, layout), kp = rb / OB_BLOCK_BYTES * block;
    for (int64_t r = 0; r < n; r++)
        for (int64_t e = 0; e < kp; e++) {
            int64_t b = e / block, j = e % block / 32, m = e % 32;
            uint8_t byte = w[r * rb + b * OB_BLOCK_BYTES + m];
            int c;
            if (layout == OB_LAYOUT_I2) {
                c = (byte >> (2 * j)) & 3;
                if (c == 3) return OB_ERR_CORRUPT;
            } else {
                if (!ob_t1_6_byte_valid(byte)) return OB_ERR_CORRUPT;
                c = (((byte * (81 / POW3[j])) & 0xFF) * 3) >> 8; /* byte * 3^j mod 256 */
            }
            if (e < k) out[r * k + e] = (int8_t)(c - 1);
            else if (c != 1) return OB_ERR_CORRUPT; /* padding must decode to 0 */
        }
    return OB_OK;
}

/* ---- read bandwidth probe ------------------------------------------------------------------- */

typedef struct {
    const uint8_t *buf;
    int64_t bytes;
    uint64_t sums[256];
} probe_t;

static void probe_task(void *ctx, int t, int nt) {
    probe_t *P = (probe_t *)ctx;
    int64_t words = P->bytes / 64, per = (words + nt - 1) / nt;
    int64_t w0 = t * per, w1 = w0 + per < words ? w0 + per : words;
#ifdef OB_HAVE_X86
    if (__builtin_cpu_supports("avx2")) { /* wide loads: the scalar loop is compute-bound */
        P->sums[t] = w1 > w0 ? ob_avx2_read_sum(P->buf + w0 * 64, (w1 - w0) * 64) : 0;
        return;
    }
#endif
    uint64_t acc[8] = {0};
    for (int64_t w = w0; w < w1; w++) { /* 64 bytes per step; the compiler vectorizes this */
        uint64_t v[8];
        memcpy(v, P->buf + w * 64, 64);
        for (int i = 0; i < 8; i++) acc[i] += v[i];
    }
    uint64_t s = 0;
    for (int i = 0; i < 8; i++) s += acc[i];
    P->sums[t] = s;
}

/* Reads `bytes` (rounded down to 64) of buf on up to nthreads threads; returns a checksum so the
 * reads cannot be optimised away. */
uint64_t ob_read_probe(const uint8_t *buf, int64_t bytes, int nthreads) {
    if (!buf || bytes < 64) return 0;
    probe_t P = {buf, bytes, {0}};
    int nt = ob_parallel(probe_task, &P, nthreads < 1 ? 1 : (nthreads > 256 ? 256 : nthreads));
    uint64_t s = 0;
    for (int t = 0; t < nt; t++) s += P.sums[t];
    return s;
}
