/* What clipcore's C loops need from the platform, in one place: the single
 * home of every OpenMP call (the team, its atomics, the clock), the fork
 * guard, the process's tuning table, the choice of instruction set (run-time
 * dispatch or the build's target) and software prefetch.
 *
 * Instruction sets: the default build has no -march flag. On x86-64 Linux
 * with GCC the hot loops are compiled three times (AVX-512, AVX2, baseline)
 * with target_clones and the loader picks one per machine (an ifunc); the
 * hand-written AVX-512 loops are compiled for x86-64-v4 and taken when the
 * CPU has it. Elsewhere, and in a CLIPCORE_NATIVE build (the CLIPCORE_NATIVE=1
 * build option adds -march=native), each loop is compiled once for the
 * build's target; the hand-written AVX-512 loops are in when that target has
 * AVX-512, with no run-time check.
 */
#ifndef CLIPCORE_CC_PLATFORM_H
#define CLIPCORE_CC_PLATFORM_H

#include <stddef.h>

/* Every loop is static (one copy per extension module that includes its
 * header); not every module uses every loop or the fork flag. */
#if defined(__GNUC__)
#define CC_UNUSED __attribute__((unused))
#else
#define CC_UNUSED
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CC_RESTRICT __restrict__
#else
#define CC_RESTRICT
#endif

/* Inside a parallel region: this thread's rank, the team's size, a barrier
 * for the whole team (an orphaned barrier binds to the region the caller runs
 * in), and the atomics with which the threads claim chunks. */
#ifdef _OPENMP
#include <omp.h>
static inline int cc_openmp_enabled(void) { return 1; }
static inline int cc_max_threads(void) { return omp_get_max_threads(); }
static inline int cc_num_procs(void) { return omp_get_num_procs(); }
static inline int cc_team_rank(void) { return omp_get_thread_num(); }
static inline int cc_team_size(void) { return omp_get_num_threads(); }
static inline void cc_team_barrier(void) { _Pragma("omp barrier") }
static inline int cc_exchange(int *x, int v) {
    int old;
    _Pragma("omp atomic capture")
    { old = *x; *x = v; }
    return old;
}
static inline int cc_load(const int *x) {
    int v;
    _Pragma("omp atomic read")
    v = *x;
    return v;
}
/* seq_cst: the plain writes before them are seen by a thread that reads what
 * they wrote (a step's results by the next step's threads, in run_steps). */
static inline long long cc_fetch_add(long long *x, long long v) {
    long long old;
    _Pragma("omp atomic capture seq_cst")
    { old = *x; *x += v; }
    return old;
}
static inline void cc_store_sync(int *x, int v) {
    _Pragma("omp atomic write seq_cst")
    *x = v;
}
static inline int cc_load_sync(const int *x) {
    int v;
    _Pragma("omp atomic read seq_cst")
    v = *x;
    return v;
}
#else
static inline int cc_openmp_enabled(void) { return 0; }
static inline int cc_max_threads(void) { return 1; }
static inline int cc_num_procs(void) { return 1; }
static inline int cc_team_rank(void) { return 0; }
static inline int cc_team_size(void) { return 1; }
static inline void cc_team_barrier(void) { }
static inline int cc_exchange(int *x, int v) { int old = *x; *x = v; return old; }
static inline int cc_load(const int *x) { return *x; }
static inline long long cc_fetch_add(long long *x, long long v) {
    long long old = *x; *x += v; return old;
}
static inline void cc_store_sync(int *x, int v) { *x = v; }
static inline int cc_load_sync(const int *x) { return *x; }
#endif

/* A thread that waits for another: a pause between polls, and after a while
 * the core for whoever else needs it (the thread waited for, when cores are
 * busy with other processes). */
#if defined(__x86_64__) || defined(__i386__)
static inline void cc_pause(void) { __builtin_ia32_pause(); }
#elif defined(__aarch64__)
static inline void cc_pause(void) { __asm__ __volatile__("yield"); }
#else
static inline void cc_pause(void) { }
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <sched.h>
static inline void cc_yield(void) { sched_yield(); }
#else
static inline void cc_yield(void) { }
#endif

/* Fork guard. GNU OpenMP's thread pool does not survive fork(): a child that
 * starts a parallel region hangs, so a forked child stays serial. A
 * pthread_atfork handler sees every fork() through the C library, also those
 * that bypass Python's os.register_at_fork (ctypes, other extensions). The
 * flag is per module: the module that installs the guard reads it. */
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define CC_HAVE_ATFORK 1
#endif
CC_UNUSED static volatile int cc_forked = 0;
#ifdef CC_HAVE_ATFORK
CC_UNUSED static void cc_on_fork_child(void) { cc_forked = 1; }
#endif
/* 0, or an error number when the guard could not be installed. */
static inline int cc_install_fork_guard(void) {
#ifdef CC_HAVE_ATFORK
    return pthread_atfork(NULL, NULL, cc_on_fork_child);
#else
    return 0;
#endif
}
static inline int cc_in_forked_child(void) { return cc_forked; }

/* Run-time choices of the streaming loops (clipcore._tuning picks them per
 * machine). One table serves the process: the kernels module owns it and
 * every other module points cc_tuning at it when it loads. */
enum { CC_TUNE_PREFETCH = 0,      /* software prefetch in the streaming loops */
       CC_TUNE_SCALE_BACKWARD = 1, /* the scaling pass runs a thread's chunks last first */
       CC_TUNE_TWINS = 2,         /* the hand-written AVX-512 loops, where the CPU has them */
       CC_TUNE_PREFETCH16 = 3,    /* the prefetch in the 16-bit loops, which do twice the
                                     work per byte and may need it where wider types do not */
       CC_TUNE_COUNT = 4 };
CC_UNUSED static int cc_tuning_table[CC_TUNE_COUNT] = { 1, 1, 1, 1 };
CC_UNUSED static int *cc_tuning = cc_tuning_table;
static inline int *cc_own_tuning(void) { return cc_tuning_table; }
static inline void cc_use_tuning(int *table) { cc_tuning = table; }

/* Seconds on a monotonic clock. */
#ifdef _OPENMP
static inline double cc_now(void) { return omp_get_wtime(); }
#else
#include <time.h>
static inline double cc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#endif

/* The floating-point mode (rounding, flush-to-zero and denormals-are-zero,
 * exception masks: not the exception flags). clipcore computes in its
 * caller's mode, as NumPy and PyTorch do: a caller may have set flush-to-zero
 * (torch.set_flush_denormal, TensorFlow's kernels). A team's other threads keep
 * the mode they were started with, so each takes the caller's for its part of
 * a region and gives its own back after: the same bits at any thread count.
 * cc_fp_set returns the mode it replaced and writes only on a change. */
#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
typedef unsigned int cc_fpmode;
#define CC_FP_FLAGS 0x3Fu          /* MXCSR's exception flags */
#define CC_FP_FLUSH 0x8040u        /* MXCSR's FTZ and DAZ */
static inline cc_fpmode cc_fp_get(void) { return _mm_getcsr() & ~CC_FP_FLAGS; }
static inline cc_fpmode cc_fp_set(cc_fpmode mode) {
    unsigned int csr = _mm_getcsr();
    if ((csr & ~CC_FP_FLAGS) != mode) _mm_setcsr((csr & CC_FP_FLAGS) | mode);
    return csr & ~CC_FP_FLAGS;
}
#elif defined(__aarch64__)
typedef unsigned long long cc_fpmode;
#define CC_FP_FLUSH ((1ull << 24) | (1ull << 19))   /* FPCR's FZ and FZ16 */
static inline cc_fpmode cc_fp_get(void) {
    cc_fpmode fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    return fpcr;
}
static inline cc_fpmode cc_fp_set(cc_fpmode mode) {
    cc_fpmode old = cc_fp_get();
    if (old != mode) __asm__ __volatile__("msr fpcr, %0" : : "r"(mode));
    return old;
}
#else
typedef unsigned int cc_fpmode;
#define CC_FP_FLUSH 0u             /* no flush-to-zero mode clipcore can see */
static inline cc_fpmode cc_fp_get(void) { return 0; }
static inline cc_fpmode cc_fp_set(cc_fpmode mode) { (void)mode; return 0; }
#endif

/* Software prefetch for the streaming loops: each block of CC_BLOCK_BYTES
 * first asks for its lines CC_PREFETCH_BYTES ahead into L1 and
 * CC_PREFETCH_L2_BYTES ahead into L2. The hardware prefetcher alone does not
 * keep a reduction at a plain read loop's speed on data in a large L3 or in
 * memory, nor does the near prefetch alone; with both it keeps up. A prefetch
 * past the end of a buffer never faults. */
#if defined(__GNUC__) || defined(__clang__)
#define CC_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define CC_PREFETCH_L2(p) __builtin_prefetch((p), 0, 2)
#else
#define CC_PREFETCH(p) ((void)0)
#define CC_PREFETCH_L2(p) ((void)0)
#endif
#define CC_PREFETCH_BYTES 2048
#define CC_PREFETCH_L2_BYTES 8192
#define CC_BLOCK_BYTES 256
#define CC_PREFETCH_LINE_ALWAYS(p)                                             \
    { CC_PREFETCH((const char *)(p) + CC_PREFETCH_BYTES);                      \
      CC_PREFETCH_L2((const char *)(p) + CC_PREFETCH_L2_BYTES); }
/* The prefetch choice for the elements p points to. */
#define CC_PREFETCHING(p)                                                      \
    cc_tuning[sizeof *(p) == 2 ? CC_TUNE_PREFETCH16 : CC_TUNE_PREFETCH]
#define CC_PREFETCH_LINE(p)                                                    \
    { if (CC_PREFETCHING(p)) CC_PREFETCH_LINE_ALWAYS(p) }
#define CC_PREFETCH_AHEAD(p, bytes)                                            \
    { if (CC_PREFETCHING(p))                                                   \
          for (int line_ = 0; line_ < (int)(bytes); line_ += 64)               \
              CC_PREFETCH_LINE_ALWAYS((const char *)(p) + line_) }
/* for (i = 0; i < n; i++) BODY over a contiguous array of T at base, in
 * blocks that prefetch ahead (the inner loop has a constant trip count, so
 * it still vectorizes). BODY is a statement using i. */
#define CC_BLOCK_OF(T) ((ptrdiff_t)(CC_BLOCK_BYTES / sizeof(T)))
#define CC_FOR_PREFETCHED(T, base, n, ...)                                     \
    { ptrdiff_t i_ = 0;                                                        \
      for (; i_ + CC_BLOCK_OF(T) <= (n); i_ += CC_BLOCK_OF(T)) {               \
          CC_PREFETCH_AHEAD((base) + i_, CC_BLOCK_BYTES)                       \
          for (ptrdiff_t i = i_; i < i_ + CC_BLOCK_OF(T); i++) { __VA_ARGS__; } } \
      for (ptrdiff_t i = i_; i < (n); i++) { __VA_ARGS__; } }

/* The instruction sets. CC_CLONES marks a loop to compile once per level for
 * run-time dispatch (empty: once, for the build's target). CC_AVX512_PATHS
 * means the hand-written AVX-512 loops are compiled (CC_AVX512 marks them),
 * and cc_avx512_usable() says whether to take them now. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(CLIPCORE_NATIVE)
#define CC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CC_AVX512_PATHS 1
#include <immintrin.h>
#define CC_AVX512 __attribute__((target("arch=x86-64-v4")))
static inline int cc_avx512_usable(void) {
    return cc_tuning[CC_TUNE_TWINS] && __builtin_cpu_supports("x86-64-v4");
}
static inline const char *cc_simd_path(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4, runtime dispatch)";
    if (__builtin_cpu_supports("x86-64-v3")) return "avx2 (x86-64-v3, runtime dispatch)";
    return "baseline (x86-64, runtime dispatch)";
}
#else
#define CC_CLONES
/* The build's target has what the hand-written loops use (x86-64-v4's
 * AVX-512 subsets, F16C): every machine this build runs on has them. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__F16C__)
#define CC_AVX512_PATHS 1
#include <immintrin.h>
#define CC_AVX512
static inline int cc_avx512_usable(void) { return cc_tuning[CC_TUNE_TWINS]; }
#define CC_TARGET_SIMD "avx512"
#elif defined(__AVX2__)
#define CC_TARGET_SIMD "avx2"
#endif
static inline const char *cc_simd_path(void) {
#if defined(CLIPCORE_NATIVE) && defined(CC_TARGET_SIMD)
    return CC_TARGET_SIMD " (-march=native build, no runtime dispatch)";
#elif defined(CLIPCORE_NATIVE)
    return "native (-march=native build)";
#elif defined(CC_TARGET_SIMD)
    return CC_TARGET_SIMD " (the compiler's target, no runtime dispatch)";
#else
    return "compiler default (no runtime dispatch on this platform)";
#endif
}
#endif

/* Under the AVX-512 paths: `if (COND && the CPU has them) { CALL; return; }`. */
#ifdef CC_AVX512_PATHS
#define CC_TWIN(COND, CALL) if ((COND) && cc_avx512_usable()) { CALL; return; }
#else
#define CC_TWIN(COND, CALL)
#endif

#ifdef CC_AVX512_PATHS
/* Masks selecting the first `left` of the next 8 (16, 32) elements: the
 * hand-written loops' tails. */
CC_AVX512 static inline __mmask8 cc_mask8(ptrdiff_t left) {
    return left >= 8 ? 0xff : left > 0 ? (__mmask8)((1u << left) - 1) : 0;
}
CC_AVX512 static inline __mmask16 cc_mask16(ptrdiff_t left) {
    return left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
}
CC_AVX512 static inline __mmask32 cc_mask32(ptrdiff_t left) {
    return left >= 32 ? 0xffffffffu : left > 0 ? (__mmask32)((1u << left) - 1) : 0;
}
#endif

#endif
