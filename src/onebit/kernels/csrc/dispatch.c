/* Public entry points: argument checks, then the variant chosen once by CPU detection
 * (or ONEBIT_KERNELS=<name> / ob_set_isa). The ABI is in onebit_kernels.h. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

static const ob_variant VARIANTS[] = {
    {"reference", {ob_ref_gemm_i2, ob_ref_gemm_t1_6}, 1},
#ifdef OB_HAVE_ARM
    {"neon", {ob_neon_gemm_i2, ob_neon_gemm_t1_6}, 1},
#endif
#ifdef OB_HAVE_X86
    {"avx2", {ob_avx2_gemm_i2, ob_avx2_gemm_t1_6}, 1},
    /* lookup tables instead of multiply-add: measured slower (bench kernels), so by name only */
    {"avx2_lut", {ob_avx2lut_gemm_i2, ob_avx2lut_gemm_t1_6}, 0},
    /* vpdpbusd on 256-bit vectors. Verified against the reference only under emulation (Bochs,
     * Tiger Lake model: scripts/check_avx512.sh), never on real hardware, and its speed is
     * unmeasured; chosen by CPU detection wherever AVX-512 F/BW/VL/VNNI are present. */
    {"avx512vnni", {ob_avx512vnni_gemm_i2, ob_avx512vnni_gemm_t1_6}, 1},
    /* vpdpbusd on 512-bit vectors (x86.c): 12x32 GEMM register tile, broadcast i2 row kernel */
    {"avx512vnni_zmm", {ob_avx512vnni_zmm_gemm_i2, ob_avx512vnni_zmm_gemm_t1_6}, 1},
#endif
};
#define N_VARIANTS ((int)(sizeof(VARIANTS) / sizeof(VARIANTS[0])))

static const ob_variant *g_active = NULL; /* set at first use; not synchronised (see header) */
/* Per shape class (ob_isa_class_for_m) the variant a measurement chose (ob_set_isa_class), or
 * NULL: the class follows g_active. ob_set_isa clears them all. */
static const ob_variant *g_class[OB_ISA_CLASSES];

static int cpu_runs(const char *name) {
    if (strcmp(name, "reference") == 0) return 1;
#ifdef OB_HAVE_ARM
    if (strcmp(name, "neon") == 0) return 1; /* Advanced SIMD is baseline on AArch64 */
#endif
#ifdef OB_HAVE_X86
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0 || strcmp(name, "avx2_lut") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(name, "avx512vnni") == 0 || strcmp(name, "avx512vnni_zmm") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

static const ob_variant *find(const char *name) {
    for (int i = 0; i < N_VARIANTS; i++)
        if (strcmp(VARIANTS[i].name, name) == 0) return &VARIANTS[i];
    return NULL;
}

static const ob_variant *best(void) {
    for (int i = N_VARIANTS - 1; i > 0; i--) /* listed slowest to fastest */
        if (VARIANTS[i].auto_select && cpu_runs(VARIANTS[i].name)) return &VARIANTS[i];
    return &VARIANTS[0];
}

static const ob_variant *active(void) {
    if (!g_active) {
        /* ONEBIT_KERNELS=<name> forces a variant; an unknown or unsupported name gets the
         * reference (always correct; the Python binding warns about it). */
        const char *env = getenv("ONEBIT_KERNELS");
        if (env && *env)
            g_active = ob_isa_supported(env) ? find(env) : &VARIANTS[0];
        else
            g_active = best();
    }
    return g_active;
}

int ob_isa_supported(const char *name) { return name && find(name) && cpu_runs(name); }

int ob_set_isa(const char *name) {
    if (name && *name && !ob_isa_supported(name)) return OB_ERR_ISA;
    g_active = name && *name ? find(name) : best();
    for (int c = 0; c < OB_ISA_CLASSES; c++) g_class[c] = NULL;
    return OB_OK;
}

const char *ob_isa(void) { return active()->name; }

/* gemv: decode; gemm8: a batched decode step's rows (8-23: x86 row kernels below 24 rows, so the
 * class timed at 8 rows runs the same kernel at all of them); gemm128 / gemm512: prefill */
int ob_isa_class_for_m(int64_t m) {
    return m < OB_XT_MIN_M ? OB_ISA_GEMV : m < 24 ? OB_ISA_GEMM_S : m < 256 ? OB_ISA_GEMM_M : OB_ISA_GEMM_L;
}

int ob_set_isa_class(int cls, const char *name) {
    if (cls < 0 || cls >= OB_ISA_CLASSES) return OB_ERR_SIZE;
    if (name && *name && !ob_isa_supported(name)) return OB_ERR_ISA;
    g_class[cls] = name && *name ? find(name) : NULL;
    return OB_OK;
}

const char *ob_isa_class(int cls) {
    if (cls < 0 || cls >= OB_ISA_CLASSES) return NULL;
    return g_class[cls] ? g_class[cls]->name : active()->name;
}

/* the variant of an m-row ternary GEMM: its class's choice, else the process-wide one */
static const ob_variant *variant_for(int64_t m) {
    const ob_variant *v = g_class[ob_isa_class_for_m(m)];
    return v ? v : active();
}

#ifdef OB_HAVE_X86
/* the x86 SIMD helpers (quantizer, int8/4-bit/fp16 heads) run under every x86 variant but the
 * reference */
static int x86_simd(void) { return strcmp(active()->name, "reference") != 0; }
#endif
int ob_abi_version(void) { return OB_ABI_VERSION; }

int64_t ob_packed_row_bytes(int64_t k, int layout) {
    int64_t block = layout == OB_LAYOUT_I2 ? OB_I2_BLOCK : layout == OB_LAYOUT_T1_6 ? OB_T1_6_BLOCK : 0;
    if (k < 1 || !block) return 0;
    return (k + block - 1) / block * OB_BLOCK_BYTES;
}

int ob_quantize_act_i8(const float *x, int64_t m, int64_t k, int64_t ldx, const float *norm_weight,
                       float norm_eps, int8_t *out, float *out_scale) {
    if (!x || !out || !out_scale) return OB_ERR_NULL;
    if (m < 1 || k < 1) return OB_ERR_SIZE;
    if (ldx < k) return OB_ERR_STRIDE;
    if (norm_weight && !(isfinite(norm_eps) && norm_eps >= 0.0f)) return OB_ERR_VALUE;
#ifdef OB_HAVE_X86
    if (x86_simd())
        return ob_avx2_quantize_act_i8(x, m, k, ldx, norm_weight, norm_eps, out, out_scale);
#endif
    return ob_ref_quantize_act_i8(x, m, k, ldx, norm_weight, norm_eps, out, out_scale);
}

/* ---- GEMM: pad the activations once, then split the output columns over the threads ------ */

#define OB_MIN_WORK_PER_THREAD ((int64_t)1 << 17) /* MACs; below this a thread costs more than it saves */

#define OB_MAX_SEG 3 /* weight matrices sharing one input in one job (q/k/v, gate/up) */

typedef struct {
    const ob_variant *v;
    int layout, nseg;
    ob_gemm_args a[OB_MAX_SEG];
    int64_t start[OB_MAX_SEG + 1]; /* segment s owns virtual columns start[s] .. + a[s].n */
    float w_scale[OB_MAX_SEG];     /* linear only: */
    const float *x_scale;
    float *out[OB_MAX_SEG];
    int64_t next, chunk; /* virtual columns handed out chunk by chunk (atomic counter) */
    int status[256];
} job_t;

/* Output columns in chunks of a multiple of 16, claimed by whichever thread is free: on a busy
 * or shared machine one core often runs slower for a while, and a static half-and-half split
 * then waits for it (measured on the 2B4T decode: within this VM's noise, 0-5% faster). */
static int64_t column_chunk(int64_t n, int64_t m, int nt) {
    if (nt <= 1) return n;
    int64_t pieces = m < 8 ? 8 : 4; /* chunks per thread */
    int64_t c = (n / (nt * pieces) + 15) / 16 * 16;
    return c < 64 ? 64 : c;
}

static void gemm_task(void *ctx, int t, int nt) {
    (void)nt;
    job_t *J = (job_t *)ctx;
    int st = OB_OK;
    for (;;) {
        int64_t j0 = __atomic_fetch_add(&J->next, J->chunk, __ATOMIC_RELAXED);
        if (j0 >= J->start[J->nseg]) break;
        for (int g = 0; g < J->nseg; g++) { /* the chunk's part in each segment */
            const ob_gemm_args *a = &J->a[g];
            int64_t lo = j0 - J->start[g], hi = lo + J->chunk;
            lo = lo < 0 ? 0 : lo;
            hi = hi > a->n ? a->n : hi;
            if (lo >= hi) continue;
            int s = J->v->gemm[J->layout](a, lo, hi);
            if (s != OB_OK) st = s;
            else if (J->out[g]) /* acc may be out itself (linear): converted in place */
                for (int64_t r = 0; r < a->m; r++) {
                    const int32_t *acc = a->acc + r * a->ldc;
                    float *o = J->out[g] + r * a->n, xs = J->x_scale[r];
                    for (int64_t j = lo; j < hi; j++) {
                        int32_t v; /* memcpy: the same bytes read as int32, written as float */
                        memcpy(&v, acc + j, sizeof v);
                        float f = (float)v * J->w_scale[g] * xs;
                        memcpy(o + j, &f, sizeof f);
                    }
                }
        }
    }
    J->status[t] = st;
}

/* nseg weight matrices w[g] [n[g], k] times the same activations x [m, k] (padded once), output
 * columns of all of them split over the threads in one job: acc[g] [m, n[g]] and, for a linear
 * (out non-NULL), out[g] = acc[g] * w_scale[g] * x_scale[r]. */
static int run_gemm_multi(int layout, int nseg, const uint8_t *const *w, const int64_t *n, int64_t k,
                          const int8_t *x, int64_t m, int64_t ldx, int32_t *const *acc,
                          const float *w_scale, const float *x_scale, float *const *out, int check) {
    if (!x || !w || !n || !acc) return OB_ERR_NULL;
    if (nseg < 1 || nseg > OB_MAX_SEG || k < 1 || m < 1 || k > OB_MAX_K) return OB_ERR_SIZE;
    if (ldx < k) return OB_ERR_STRIDE;
    for (int g = 0; g < nseg; g++) {
        if (!w[g] || !acc[g]) return OB_ERR_NULL;
        if (n[g] < 1) return OB_ERR_SIZE;
    }
    int64_t rb = ob_packed_row_bytes(k, layout);
    int64_t block = layout == OB_LAYOUT_I2 ? OB_I2_BLOCK : OB_T1_6_BLOCK;
    int64_t kp = rb / OB_BLOCK_BYTES * block, ldxp = (kp + 63) / 64 * 64;
    int32_t *xsum = (int32_t *)malloc((size_t)m * sizeof(int32_t));
    int8_t *xbuf = (int8_t *)malloc((size_t)(m * ldxp) + 64);
    if (!xsum || !xbuf) {
        free(xsum);
        free(xbuf);
        return OB_ERR_NOMEM;
    }
    int8_t *xp = xbuf + (64 - (uintptr_t)xbuf % 64) % 64; /* 64-byte aligned rows */
    for (int64_t r = 0; r < m; r++) {
        int32_t s = 0;
        const int8_t *xr = x + r * ldx;
        for (int64_t e = 0; e < k; e++) s += xr[e];
        memcpy(xp + r * ldxp, xr, (size_t)k);
        memset(xp + r * ldxp + k, 0, (size_t)(ldxp - k));
        xsum[r] = s;
    }
    int8_t *xt = NULL; /* the row tiles of ob_gemm_args.xt */
    if (m >= OB_XT_MIN_M) {
        int64_t tiles = (m + OB_XT_ROWS - 1) / OB_XT_ROWS, tb = kp * OB_XT_ROWS;
        xt = (int8_t *)aligned_alloc(64, (size_t)(tiles * tb + 63) / 64 * 64);
        if (!xt) {
            free(xsum);
            free(xbuf);
            return OB_ERR_NOMEM;
        }
        memset(xt + (tiles - 1) * tb, 0, (size_t)tb); /* the last tile's rows past m stay zero */
        for (int64_t r = 0; r < m; r++) {
            int8_t *dst = xt + r / OB_XT_ROWS * tb + r % OB_XT_ROWS * 4;
            for (int64_t s = 0; s < kp / 4; s++) memcpy(dst + s * 4 * OB_XT_ROWS, xp + r * ldxp + 4 * s, 4);
        }
    }
    job_t J;
    memset(&J, 0, offsetof(job_t, status));
    J.v = variant_for(m);
    J.layout = layout;
    J.nseg = nseg;
    J.x_scale = x_scale;
    int64_t total = 0;
    for (int g = 0; g < nseg; g++) {
        J.a[g] = (ob_gemm_args){w[g], n[g], k, kp, rb, xp, m, ldxp, xt, xsum, acc[g], n[g], check};
        J.w_scale[g] = w_scale ? w_scale[g] : 0.0f;
        J.out[g] = out ? out[g] : NULL;
        J.start[g] = total;
        total += (n[g] + 15) / 16 * 16; /* segments start on multiples of 16 */
    }
    J.start[nseg] = total;
    int64_t work = total * k * m, want = work / OB_MIN_WORK_PER_THREAD;
    want = want < 1 ? 1 : (want > 256 ? 256 : want);
    int64_t pool = ob_get_num_threads() < want ? ob_get_num_threads() : want;
    J.chunk = column_chunk(total, m, (int)pool);
    int nt = ob_parallel(gemm_task, &J, (int)want);
    int st = OB_OK;
    for (int t = 0; t < nt; t++)
        if (J.status[t] != OB_OK) st = J.status[t];
    free(xt);
    free(xbuf);
    free(xsum);
    return st;
}

static int run_gemm(int layout, const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                    int64_t ldx, int32_t *acc, float w_scale, const float *x_scale, float *out,
                    int check) {
    if (!w || !acc) return OB_ERR_NULL;
    return run_gemm_multi(layout, 1, &w, &n, k, x, m, ldx, &acc, out ? &w_scale : NULL, x_scale,
                          out ? &out : NULL, check);
}

static int gemm(int layout, const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                int64_t ldx, int32_t *acc) {
    return run_gemm(layout, w, n, k, x, m, ldx, acc, 0.0f, NULL, NULL, 1);
}

/* The int32 accumulators of a linear live in its float output (same size, same row stride): each
 * thread converts its own columns in place once they are summed, so a prefill's projections need
 * no m x n scratch besides their outputs (2B4T gate+up at 512 tokens: 28 MB). */
static int linear(int layout, const uint8_t *w, int64_t n, int64_t k, const int8_t *x, int64_t m,
                  int64_t ldx, float w_scale, const float *x_scale, float *out, int check) {
    if (!x_scale || !out) return OB_ERR_NULL;
    if (n < 1 || m < 1) return OB_ERR_SIZE;
    return run_gemm(layout, w, n, k, x, m, ldx, (int32_t *)(void *)out, w_scale, x_scale, out, check);
}

/* the public packed-weight entry points check the buffer's length first (ob_check_packed) */
#define CHECK_W(layout)                                                                         \
    do {                                                                                        \
        int st_ = ob_check_packed(w, w_bytes, n, k, layout);                                    \
        if (st_) return st_;                                                                    \
    } while (0)

int ob_gemm_i2(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x, int64_t m,
               int64_t ldx, int32_t *acc) {
    CHECK_W(OB_LAYOUT_I2);
    return gemm(OB_LAYOUT_I2, w, n, k, x, m, ldx, acc);
}
int ob_gemm_t1_6(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x,
                 int64_t m, int64_t ldx, int32_t *acc) {
    CHECK_W(OB_LAYOUT_T1_6);
    return gemm(OB_LAYOUT_T1_6, w, n, k, x, m, ldx, acc);
}
int ob_linear_i2(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x, int64_t m,
                 int64_t ldx, float w_scale, const float *x_scale, float *out) {
    CHECK_W(OB_LAYOUT_I2);
    return linear(OB_LAYOUT_I2, w, n, k, x, m, ldx, w_scale, x_scale, out, 1);
}
int ob_linear_t1_6(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x,
                   int64_t m, int64_t ldx, float w_scale, const float *x_scale, float *out) {
    CHECK_W(OB_LAYOUT_T1_6);
    return linear(OB_LAYOUT_T1_6, w, n, k, x, m, ldx, w_scale, x_scale, out, 1);
}
int ob_linear_multi_unchecked(int layout, int nseg, const uint8_t *const *w, const int64_t *n,
                              int64_t k, const int8_t *x, int64_t m, int64_t ldx,
                              const float *w_scale, const float *x_scale, float *const *out) {
    if (layout != OB_LAYOUT_I2 && layout != OB_LAYOUT_T1_6) return OB_ERR_SIZE;
    if (!x_scale || !out || !w_scale || !n) return OB_ERR_NULL;
    if (nseg < 1 || nseg > OB_MAX_SEG || m < 1) return OB_ERR_SIZE;
    for (int g = 0; g < nseg; g++) {
        if (!out[g]) return OB_ERR_NULL;
        if (n[g] < 1) return OB_ERR_SIZE;
    }
    int32_t *acc[OB_MAX_SEG]; /* in the outputs, as linear() */
    for (int g = 0; g < nseg; g++) acc[g] = (int32_t *)(void *)out[g];
    return run_gemm_multi(layout, nseg, w, n, k, x, m, ldx, acc, w_scale, x_scale, out, 0);
}

int ob_linear_unchecked(int layout, const uint8_t *w, int64_t n, int64_t k, const int8_t *x,
                        int64_t m, int64_t ldx, float w_scale, const float *x_scale, float *out) {
    if (layout != OB_LAYOUT_I2 && layout != OB_LAYOUT_T1_6) return OB_ERR_SIZE;
    return linear(layout, w, n, k, x, m, ldx, w_scale, x_scale, out, 0);
}
int ob_linear_i2_unchecked(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, const int8_t *x,
                           int64_t m, int64_t ldx, float w_scale, const float *x_scale, float *out) {
    CHECK_W(OB_LAYOUT_I2);
    return linear(OB_LAYOUT_I2, w, n, k, x, m, ldx, w_scale, x_scale, out, 0);
}
int ob_linear_t1_6_unchecked(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k,
                             const int8_t *x, int64_t m, int64_t ldx, float w_scale,
                             const float *x_scale, float *out) {
    CHECK_W(OB_LAYOUT_T1_6);
    return linear(OB_LAYOUT_T1_6, w, n, k, x, m, ldx, w_scale, x_scale, out, 0);
}

/* Every byte of n packed rows is a valid code byte (padding included), threaded. */
typedef struct {
    const uint8_t *w;
    int64_t bytes;
    int layout;
    int bad[256];
} validate_job_t;

static void validate_task(void *ctx, int t, int nt) {
    validate_job_t *J = (validate_job_t *)ctx;
    int64_t per = (J->bytes + nt - 1) / nt, i0 = t * per, i1 = i0 + per < J->bytes ? i0 + per : J->bytes;
    int bad = 0;
    if (J->layout == OB_LAYOUT_I2) {
        uint8_t acc = 0;
        for (int64_t i = i0; i < i1; i++) acc |= J->w[i] & (J->w[i] >> 1);
        bad = (acc & 0x55) != 0;
    } else {
        for (int64_t i = i0; i < i1 && !bad; i++) bad = !ob_t1_6_byte_valid(J->w[i]);
    }
    J->bad[t] = bad;
}

int ob_validate_packed(const uint8_t *w, int64_t w_bytes, int64_t n, int64_t k, int layout) {
    if (!w) return OB_ERR_NULL;
    if (n < 1 || k < 1 || k > OB_MAX_K || (layout != OB_LAYOUT_I2 && layout != OB_LAYOUT_T1_6))
        return OB_ERR_SIZE;
    CHECK_W(layout);
    validate_job_t J = {w, n * ob_packed_row_bytes(k, layout), layout, {0}};
    int64_t want = J.bytes / (1 << 20);
    int nt = ob_parallel(validate_task, &J, want < 1 ? 1 : (want > 256 ? 256 : (int)want));
    for (int t = 0; t < nt; t++)
        if (J.bad[t]) return OB_ERR_CORRUPT;
    return OB_OK;
}

/* ---- int8 x int8 linear ------------------------------------------------------------------- */

typedef struct {
    ob_i8_args a;
    int simd;
} i8_job_t;

static void i8_task(void *ctx, int t, int nt) {
    i8_job_t *J = (i8_job_t *)ctx;
    int64_t n = J->a.n, per = ((n + nt - 1) / nt + 1) / 2 * 2;
    int64_t j0 = t * per, j1 = j0 + per < n ? j0 + per : n;
    if (j0 >= j1) return;
#ifdef OB_HAVE_X86
    if (J->simd == 2) {
        ob_zmm_linear_i8(&J->a, j0, j1);
        return;
    }
    if (J->simd) {
        ob_avx2_linear_i8(&J->a, j0, j1);
        return;
    }
#endif
    ob_ref_linear_i8(&J->a, j0, j1);
}

int ob_linear_i8(const int8_t *w, int64_t w_bytes, const float *w_scale, int64_t n, int64_t k,
                 const int8_t *x, int64_t m, int64_t ldx, const float *x_scale, float *out) {
    if (!w || !w_scale || !x || !x_scale || !out) return OB_ERR_NULL;
    if (n < 1 || k < 1 || m < 1 || k > OB_MAX_K) return OB_ERR_SIZE;
    int bst = ob_check_bytes(w_bytes, n, k);
    if (bst) return bst;
    if (ldx < k) return OB_ERR_STRIDE;
    for (int64_t r = 0; r < m; r++)
        for (int64_t e = 0; e < k; e++)
            if (x[r * ldx + e] == -128) return OB_ERR_VALUE;
    i8_job_t J = {{w, w_scale, n, k, x, m, ldx, x_scale, out}, 0};
#ifdef OB_HAVE_X86
    /* exact integers either way: an AVX-512 VNNI variant for the m-row class (both need the same
     * CPU features: F/BW/VL/VNNI) runs the zmm kernel (m = 8 on Zen 4: 50 vs 64 ms with AVX2) */
    J.simd = strncmp(variant_for(m)->name, "avx512vnni", 10) == 0 ? 2 : x86_simd();
#endif
    int64_t work = n * k * m, want = work / OB_MIN_WORK_PER_THREAD;
    ob_parallel(i8_task, &J, want < 1 ? 1 : (want > 256 ? 256 : (int)want));
    return OB_OK;
}

/* ---- 4-bit x int8 linear ------------------------------------------------------------------ */

static void i4_task(void *ctx, int t, int nt) {
    i8_job_t *J = (i8_job_t *)ctx;
    int64_t n = J->a.n, per = (n + nt - 1) / nt;
    int64_t j0 = t * per, j1 = j0 + per < n ? j0 + per : n;
    if (j0 >= j1) return;
#ifdef OB_HAVE_X86
    if (J->simd) {
        ob_avx2_linear_i4(&J->a, j0, j1);
        return;
    }
#endif
    ob_ref_linear_i4(&J->a, j0, j1);
}

int ob_linear_i4(const uint8_t *w, int64_t w_bytes, const float *w_scale, int64_t n, int64_t k,
                 const int8_t *x, int64_t m, int64_t ldx, const float *x_scale, float *out) {
    if (!w || !w_scale || !x || !x_scale || !out) return OB_ERR_NULL;
    if (n < 1 || k < 1 || m < 1 || k > OB_MAX_K) return OB_ERR_SIZE;
    int bst = ob_check_bytes(w_bytes, n, ob_i4_row_bytes(k));
    if (bst) return bst;
    if (ldx < k) return OB_ERR_STRIDE;
    int64_t kp = (k + 63) / 64 * 64;
    int8_t *xp = (int8_t *)calloc((size_t)(m * kp), 1); /* zero-padded rows: padding meets x = 0 */
    if (!xp) return OB_ERR_NOMEM;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t e = 0; e < k; e++)
            if (x[r * ldx + e] == -128) {
                free(xp);
                return OB_ERR_VALUE;
            }
        memcpy(xp + r * kp, x + r * ldx, (size_t)k);
    }
    i8_job_t J = {{(const int8_t *)w, w_scale, n, k, xp, m, kp, x_scale, out}, 0};
#ifdef OB_HAVE_X86
    J.simd = x86_simd();
#endif
    int64_t work = n * k * m, want = work / OB_MIN_WORK_PER_THREAD;
    ob_parallel(i4_task, &J, want < 1 ? 1 : (want > 256 ? 256 : (int)want));
    free(xp);
    return OB_OK;
}

/* ---- float16 x float32 linear --------------------------------------------------------------- */

typedef struct {
    ob_f16_args a;
    int simd;
} f16_job_t;

static void f16_task(void *ctx, int t, int nt) {
    f16_job_t *J = (f16_job_t *)ctx;
    int64_t n = J->a.n, per = (n + nt - 1) / nt;
    int64_t j0 = t * per, j1 = j0 + per < n ? j0 + per : n;
    if (j0 >= j1) return;
#ifdef OB_HAVE_X86
    if (J->simd) {
        ob_avx2_linear_f16(&J->a, j0, j1);
        return;
    }
#endif
    ob_ref_linear_f16(&J->a, j0, j1);
}

int ob_linear_f16(const uint16_t *w, int64_t w_bytes, int64_t n, int64_t k, const float *x,
                  int64_t m, int64_t ldx, float *out) {
    if (!w || !x || !out) return OB_ERR_NULL;
    if (n < 1 || k < 1 || m < 1 || k > INT64_MAX / 2) return OB_ERR_SIZE;
    int bst = ob_check_bytes(w_bytes, n, 2 * k);
    if (bst) return bst;
    if (ldx < k) return OB_ERR_STRIDE;
    int simd = 0;
#ifdef OB_HAVE_X86
    const char *isa = active()->name;
    simd = strcmp(isa, "reference") != 0 && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#endif
    f16_job_t J = {{w, n, k, x, m, ldx, out}, simd};
    int64_t work = n * k * m, want = work / OB_MIN_WORK_PER_THREAD;
    ob_parallel(f16_task, &J, want < 1 ? 1 : (want > 256 ? 256 : (int)want));
    return OB_OK;
}

#ifdef _WIN32
/* setuptools exports PyInit_<name> on Windows; never called (the library is loaded with ctypes). */
__declspec(dllexport) void *PyInit__onebit_kernels(void) { return NULL; }
#endif
