/* GEMM m=128 timing straight from C (bench/c/run.sh): ob_gemm_i2, best of 8, 1 and 2 threads. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "onebit_kernels.h"
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  int shapes[][2]={{1536,1536},{4096,1536},{2560,2560},{2560,6912}}; int M=128;
  for(int si=0;si<4;si++){ int n=shapes[si][0],k=shapes[si][1]; int64_t rb=ob_packed_row_bytes(k,0);
    int8_t *codes=malloc((size_t)n*k); for(long i=0;i<(long)n*k;i++) codes[i]=rand()%3-1;
    uint8_t *w=malloc(n*rb); ob_pack(codes,n,k,k,0,w);
    int8_t *x=malloc((size_t)M*k); for(long i=0;i<(long)M*k;i++) x[i]=rand()%255-127;
    int32_t *acc=malloc(4L*M*n);
    for(int nt=1;nt<=2;nt++){ ob_set_num_threads(nt); double best=1e9;
      for(int r=0;r<8;r++){double t=now(); ob_gemm_i2(w,(int64_t)n*rb,n,k,x,M,k,acc); t=now()-t; if(t<best)best=t;}
      printf("%dx%d m=%d %dt: %.2f ms  %.0f GOPS\n",n,k,M,nt,best*1e3,2.0*M*n*k/best/1e9);}
  }
}
