/* GEMV timing straight from C (bench/c/run.sh): cold = 40 rotated weight copies, hot = one copy;
 * -DUNCHECKED times ob_linear_i2_unchecked (what the engine calls), else ob_gemm_i2; HUGE=1 puts
 * the weights on madvise(MADV_HUGEPAGE) memory. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include "onebit_kernels.h"
#include <sys/mman.h>
static void *halloc(size_t n){ if(!getenv("HUGE")) return malloc(n); size_t N=(n+(2<<20)-1)/(2<<20)*(2<<20); void*p=mmap(0,N,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); madvise(p,N,MADV_HUGEPAGE); return p;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float xs1[1]={1.0f}; float *outf;
#ifdef UNCHECKED
#define GEMV(W) ob_linear_i2_unchecked(W,(int64_t)n*rb,n,k,x,1,k,1.0f,xs1,outf)
#else
#define GEMV(W) ob_gemm_i2(W,(int64_t)n*rb,n,k,x,1,k,acc)
#endif
int main(int argc, char**argv){ outf = malloc(4*8192);
  int shapes[][2] = {{1536,1536},{4096,1536},{1536,4096},{2560,2560},{6912,2560},{2560,6912}};
  int ncopy = 40;
  for (int si=0; si<6; si++){
    int n=shapes[si][0], k=shapes[si][1];
    int64_t rb = ob_packed_row_bytes(k, 0);
    int8_t *codes = malloc((size_t)n*k); for (long i=0;i<(long)n*k;i++) codes[i]=(rand()%3)-1;
    uint8_t **w = malloc(sizeof(void*)*ncopy);
    for (int c=0;c<ncopy;c++){ w[c]=halloc(n*rb); ob_pack(codes,n,k,k,0,w[c]); }
    int8_t *x = malloc(k); for(int i=0;i<k;i++) x[i]=rand()%255-127;
    int32_t *acc = malloc(4*n);
    for (int nt=1; nt<=2; nt++){
      ob_set_num_threads(nt);
      double best=1e9, tot=0; int reps=200;
      for (int r=0;r<reps;r++){ double t=now(); GEMV(w[r%ncopy]); t=now()-t; tot+=t; if(t<best)best=t; }
      double hot=1e9; for (int r=0;r<100;r++){ double t=now(); GEMV(w[0]); t=now()-t; if(t<hot)hot=t;}
      printf("%dx%d %dt: cold avg %.1fus (%.1f GB/s) best %.1fus | hot best %.1fus (%.1f GB/s)\n", n,k,nt, tot/reps*1e6, n*rb/(tot/reps)/1e9, best*1e6, hot*1e6, n*rb/hot/1e9);
    }
  }
  // bandwidth probe
  size_t B = 1<<28; uint8_t *buf = malloc(B); memset(buf,1,B);
  for (int nt=1;nt<=2;nt++){ double best=1e9; for(int r=0;r<5;r++){double t=now(); ob_read_probe(buf,B,nt); t=now()-t; if(t<best)best=t;} printf("probe %dt %.1f GB/s\n", nt, B/best/1e9);}
}
