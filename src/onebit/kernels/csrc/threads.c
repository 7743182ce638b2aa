/* A small fork-safe thread pool for the kernels (POSIX threads; serial elsewhere).
 *
 * Workers wait for a new job generation: they spin for ONEBIT_SPIN_US microseconds (default 50,
 * so back-to-back kernel calls of a decode step do not pay a wake-up), then sleep on a condition
 * variable, so an idle pool never competes with torch's own threads. The caller runs task 0
 * itself. One job at a time: a second concurrent caller runs its tasks serially. Thread count:
 * ob_set_num_threads, else ONEBIT_NUM_THREADS, else the physical cores this process may run on. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include "internal.h"

static int g_nthreads = 0; /* 0 = not decided yet */

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#define OB_MAX_THREADS 256

static int g_core_cpu[OB_MAX_THREADS]; /* one CPU id per physical core we may run on */
static int g_ncore_cpu = 0;

static int physical_cores(void) {
    int logical = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (logical < 1) logical = 1;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return logical;
    /* one thread per (package, core) among the CPUs we may run on (SMT siblings share a core) */
    long seen[OB_MAX_THREADS];
    int nseen = 0, allowed = 0;
    for (int c = 0; c < CPU_SETSIZE && c < 4096; c++) {
        if (!CPU_ISSET(c, &set)) continue;
        allowed++;
        long pkg = 0, core = c;
        char path[96];
        FILE *f;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", c);
        if ((f = fopen(path, "r"))) { if (fscanf(f, "%ld", &core) != 1) core = c; fclose(f); }
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", c);
        if ((f = fopen(path, "r"))) { if (fscanf(f, "%ld", &pkg) != 1) pkg = 0; fclose(f); }
        long key = pkg * 1000000 + core;
        int dup = 0;
        for (int i = 0; i < nseen; i++) dup |= seen[i] == key;
        if (!dup && nseen < OB_MAX_THREADS) {
            g_core_cpu[nseen] = c;
            seen[nseen++] = key;
        }
    }
    g_ncore_cpu = nseen;
    return nseen > 0 ? nseen : (allowed > 0 ? allowed : logical);
#else
    return logical;
#endif
}

typedef struct {
    pthread_mutex_t job_lock;   /* held by the caller that owns the pool for one job */
    pthread_mutex_t sleep_lock; /* with wake: sleeping workers */
    pthread_cond_t wake;
    atomic_int gen;             /* job generation: bumped once per job */
    atomic_int pending;         /* workers still running the current job */
    int sleepers;               /* guarded by sleep_lock */
    int started;                /* workers created (tasks 1..started) */
    ob_task_fn fn;
    void *ctx;
    int nt;
    long spin_ns;
    atomic_int caller_cpu;      /* CPU the caller ran on when it posted the job (-1: unknown) */
} pool_t;

static pool_t g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                        PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL, 0, -1, -1};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Worker t runs on the t-th physical core after the caller's: woken from a futex, an unpinned
 * worker is often placed on the waker's CPU (wake-affine) and the "parallel" job then runs on one
 * core. A fixed pin (worker t on core t) was not enough: the unpinned caller could sit on the
 * worker's core, and the two then shared it (2-thread GEMV slower than 1 thread). So each job
 * records the caller's CPU and a worker re-pins itself (one syscall) only when that changed.
 * ONEBIT_PIN=0 turns pinning off. */
static int pin_enabled(void) {
#if defined(__linux__)
    static int enabled = -1;
    if (enabled < 0) {
        const char *env = getenv("ONEBIT_PIN");
        enabled = !(env && env[0] == '0') && g_ncore_cpu >= 2;
    }
    return enabled;
#else
    return 0;
#endif
}

static int pin_self(int t, int caller_cpu, int current) {
#if defined(__linux__)
    int ci = 0;
    for (int i = 0; i < g_ncore_cpu; i++)
        if (g_core_cpu[i] == caller_cpu) ci = i;
    int cpu = g_core_cpu[(ci + t) % g_ncore_cpu];
    if (cpu == current) return current;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    return cpu;
#else
    (void)t;
    (void)caller_cpu;
    return current;
#endif
}

static void *worker(void *arg) {
    /* arg = (generation before the job that created us) << 16 | task index */
    int t = (int)((intptr_t)arg & 0xFFFF);
    int seen = (int)(unsigned)((uintptr_t)arg >> 16);
    int pinned = -1, pin = pin_enabled();
    for (;;) {
        long t0 = now_ns();
        int spins = 0;
        while (atomic_load_explicit(&g_pool.gen, memory_order_acquire) == seen) {
            cpu_relax();
            if (++spins % 64 == 0 && now_ns() - t0 > g_pool.spin_ns) {
                pthread_mutex_lock(&g_pool.sleep_lock);
                g_pool.sleepers++;
                while (atomic_load(&g_pool.gen) == seen) pthread_cond_wait(&g_pool.wake, &g_pool.sleep_lock);
                g_pool.sleepers--;
                pthread_mutex_unlock(&g_pool.sleep_lock);
            }
        }
        seen = atomic_load_explicit(&g_pool.gen, memory_order_acquire);
        if (pin) pinned = pin_self(t, atomic_load(&g_pool.caller_cpu), pinned);
        if (t < g_pool.nt) g_pool.fn(g_pool.ctx, t, g_pool.nt);
        atomic_fetch_sub_explicit(&g_pool.pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* After fork() only the forking thread exists in the child: forget the workers. */
static void after_fork_child(void) {
    pthread_mutex_init(&g_pool.job_lock, NULL);
    pthread_mutex_init(&g_pool.sleep_lock, NULL);
    pthread_cond_init(&g_pool.wake, NULL);
    g_pool.started = 0;
    g_pool.sleepers = 0;
    atomic_store(&g_pool.pending, 0);
}

static void decide_threads(void) {
    if (g_nthreads > 0) {
        if (!g_ncore_cpu) physical_cores(); /* the core list for pinning */
        return;
    }
    const char *env = getenv("ONEBIT_NUM_THREADS");
    int n = env ? atoi(env) : 0;
    int cores = physical_cores();
    g_nthreads = n >= 1 ? (n > OB_MAX_THREADS ? OB_MAX_THREADS : n) : cores;
}

/* Creates workers 1..want-1 (pool lock held). Returns how many tasks can run in parallel. */
static int ensure_workers(int want) {
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_done = 1;
    }
    if (g_pool.spin_ns < 0) {
        const char *env = getenv("ONEBIT_SPIN_US");
        long us = env ? atol(env) : 50;
        g_pool.spin_ns = (us < 0 ? 0 : us) * 1000L;
    }
    while (g_pool.started + 1 < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker,
                                (void *)(((uintptr_t)(unsigned)atomic_load(&g_pool.gen) << 16) |
                                         (uintptr_t)(g_pool.started + 1)));
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with what we have */
        g_pool.started++;
    }
    return g_pool.started + 1 < want ? g_pool.started + 1 : want;
}

int ob_parallel(ob_task_fn fn, void *ctx, int nthreads) {
    decide_threads();
    int nt = nthreads < g_nthreads ? nthreads : g_nthreads;
    if (nt <= 1 || pthread_mutex_trylock(&g_pool.job_lock) != 0) {
        nt = nt < 1 ? 1 : nt;
        for (int t = 0; t < nt; t++) fn(ctx, t, nt);
        return nt;
    }
    nt = ensure_workers(nt);
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.nt = nt;
#if defined(__linux__)
    atomic_store(&g_pool.caller_cpu, sched_getcpu());
#endif
    atomic_store(&g_pool.pending, g_pool.started); /* every worker checks in, idle ones too */
    atomic_fetch_add_explicit(&g_pool.gen, 1, memory_order_release);
    pthread_mutex_lock(&g_pool.sleep_lock);
    if (g_pool.sleepers) pthread_cond_broadcast(&g_pool.wake);
    pthread_mutex_unlock(&g_pool.sleep_lock);
    fn(ctx, 0, nt);
    while (atomic_load_explicit(&g_pool.pending, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&g_pool.job_lock);
    return nt;
}

/* One kept scratch block (ob_scratch_get): a prefill chunk's layer scratch is tens of MB, above
 * glibc's mmap threshold, so a malloc/free pair per layer call mapped and zeroed fresh pages every
 * time: ~3% of a 512-token prefill in guest perf, but 700M pp512 went 176-205 -> 237-244 tok/s
 * when the block was kept (the VM's page-fault cost is mostly invisible to the guest). The block is kept and grown up to OB_SCRATCH_KEEP; a larger
 * request, or one while the block is in use (a concurrent caller, or a forked child whose parent
 * held it), gets a plain malloc. */
#define OB_SCRATCH_KEEP ((size_t)64 << 20)
static pthread_mutex_t g_scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static void *g_scratch = NULL;
static size_t g_scratch_bytes = 0;

void *ob_scratch_get(size_t bytes, int *kept) {
    *kept = 0;
    if (bytes <= OB_SCRATCH_KEEP && pthread_mutex_trylock(&g_scratch_lock) == 0) {
        if (g_scratch_bytes < bytes) {
            free(g_scratch);
            g_scratch = malloc(bytes);
            g_scratch_bytes = g_scratch ? bytes : 0;
        }
        if (g_scratch) {
            *kept = 1;
            return g_scratch;
        }
        pthread_mutex_unlock(&g_scratch_lock);
    }
    return malloc(bytes);
}

void ob_scratch_put(void *p, int kept) {
    if (kept) pthread_mutex_unlock(&g_scratch_lock);
    else free(p);
}

#else /* no POSIX threads: serial */
static void decide_threads(void) {
    if (g_nthreads <= 0) g_nthreads = 1;
}
int ob_parallel(ob_task_fn fn, void *ctx, int nthreads) {
    (void)nthreads;
    fn(ctx, 0, 1);
    return 1;
}
void *ob_scratch_get(size_t bytes, int *kept) {
    *kept = 0;
    return malloc(bytes);
}
void ob_scratch_put(void *p, int kept) {
    (void)kept;
    free(p);
}
#endif

int ob_set_num_threads(int nthreads) {
    if (nthreads < 1) return OB_ERR_VALUE;
    g_nthreads = nthreads > 256 ? 256 : nthreads;
    return OB_OK;
}

int ob_get_num_threads(void) {
    decide_threads();
    return g_nthreads;
}
