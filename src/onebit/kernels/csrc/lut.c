/* Lookup-table (T-MAC / bitnet.cpp TL-style) variant: placeholder, delegates to the AVX2
 * multiply-add kernels until the table kernels land. */
#include "internal.h"
#ifdef OB_HAVE_X86
int ob_avx2lut_gemm_i2(const ob_gemm_args *a, int64_t j0, int64_t j1) { return ob_avx2_gemm_i2(a, j0, j1); }
int ob_avx2lut_gemm_t1_6(const ob_gemm_args *a, int64_t j0, int64_t j1) { return ob_avx2_gemm_t1_6(a, j0, j1); }
#endif
