/* AArch64 NEON variant: placeholder until the NEON kernels land (compiles to nothing elsewhere). */
#include "internal.h"
#ifdef OB_HAVE_ARM
int ob_neon_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1) { return ob_ref_gemm_i2(a, j0, j1); }
int ob_neon_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1) { return ob_ref_gemm_t1_6(a, j0, j1); }
#endif
