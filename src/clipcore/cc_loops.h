/* Innermost loops of clipcore's kernels, in plain C so the compiler can
 * vectorize them, and the single home of every OpenMP call.
 *
 * Portability: the default build has no -march flag. On x86-64 Linux with GCC
 * the hot loops are compiled three times (AVX-512, AVX2, baseline) with
 * target_clones and the loader picks one per machine (an ifunc). Define
 * CLIPCORE_NATIVE (the CLIPCORE_NATIVE=1 build option adds -march=native) to
 * build one copy for the build machine instead.
 *
 * Determinism: every reduction keeps CC_LANES independent float64 lanes that
 * are combined in a fixed order, so a given buffer piece always gives the same
 * bits whatever thread runs it. (The AVX2/AVX-512 copies fuse x*x+acc into an
 * FMA, the baseline copy does not: results may differ in the last bit between
 * machines, never between thread counts on one machine.) No -ffast-math: NaN
 * and inf must propagate.
 */
#ifndef CLIPCORE_CC_LOOPS_H
#define CLIPCORE_CC_LOOPS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>

/* Every loop is static (one copy per extension module that includes this
 * header); not every module uses every loop or the fork flag. */
#if defined(__GNUC__)
#define CC_UNUSED __attribute__((unused))
#else
#define CC_UNUSED
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
#else
static inline int cc_openmp_enabled(void) { return 0; }
static inline int cc_max_threads(void) { return 1; }
static inline int cc_num_procs(void) { return 1; }
static inline int cc_team_rank(void) { return 0; }
static inline int cc_team_size(void) { return 1; }
static inline void cc_team_barrier(void) { }
static inline int cc_exchange(int *x, int v) { int old = *x; *x = v; return old; }
static inline int cc_load(const int *x) { return *x; }
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
       CC_TUNE_COUNT = 3 };
CC_UNUSED static int cc_tuning_table[CC_TUNE_COUNT] = { 1, 1, 1 };
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

/* Software prefetch for the streaming loops: each block of CC_BLOCK_BYTES
 * first asks for its lines CC_PREFETCH_BYTES ahead into L1 and
 * CC_PREFETCH_L2_BYTES ahead into L2. The hardware prefetcher alone left the
 * sum of squares at 60% of a plain read loop's speed on data in a large L3
 * (ResNet-50's 102 MB of gradients on a server CPU), the near prefetch alone
 * at 60-90% on data in L3 and in memory; with both it runs at a read loop's
 * speed (2 threads: ResNet-50 3.3 -> 1.9 ms, GPT-2's 498 MB 20.6 -> 15.3 ms),
 * for 7% on a list that sits in L2. A prefetch past the end of a buffer
 * never faults. */
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
#define CC_PREFETCH_LINE(p)                                                    \
    { if (cc_tuning[CC_TUNE_PREFETCH]) CC_PREFETCH_LINE_ALWAYS(p) }
#define CC_PREFETCH_AHEAD(p, bytes)                                            \
    { if (cc_tuning[CC_TUNE_PREFETCH])                                         \
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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(CLIPCORE_NATIVE)
#define CC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
/* A few loops also have hand-written AVX-512 forms, compiled for x86-64-v4
 * and taken when the CPU has it (cc_avx512_usable). */
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
static inline const char *cc_simd_path(void) {
#if defined(CLIPCORE_NATIVE)
    return "native (-march=native build)";
#else
    return "compiler default (no runtime dispatch on this platform)";
#endif
}
#endif


/* 16-bit floats: float16 (IEEE binary16) and bfloat16 (the top half of a
 * float32), held as uint16_t bits. Both widen to float32 exactly; a float32
 * narrows to them rounded to nearest, ties to even (RNE), as F16C's
 * vcvtps2ph and torch's conversions do: overflow gives inf, results below the
 * smallest normal become subnormal or zero, and a NaN stays a quiet NaN
 * keeping its sign and the top of its payload. Plain C on the bits, written
 * without branches so that the generic loops still vectorize; the
 * hand-written AVX-512 loops use F16C and integer shifts for the same bits. */
static inline float cc_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t cc_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float cc_bf16_to_f32(uint16_t h) { return cc_bits_f32((uint32_t)h << 16); }

static inline uint16_t cc_f32_to_bf16(float f) {
    const uint32_t u = cc_f32_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* the bias trick */
    const uint32_t quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* float16 -> float32: exponent rebiased; a subnormal (exponent 0) scaled
 * exactly by a float32 subtraction of the magic 2^-14; inf/NaN get the
 * float32 all-ones exponent. */
static inline float cc_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = (uint32_t)(h & 0x7fffu) << 13;     /* exponent and mantissa */
    const uint32_t exp = em & 0x0f800000u;
    const uint32_t normal = em + ((127u - 15u) << 23);
    const uint32_t special = normal + ((128u - 16u) << 23);
    const float sub = cc_bits_f32(em + (113u << 23)) - cc_bits_f32(113u << 23);
    const uint32_t mag = exp == 0x0f800000u ? special : exp == 0 ? cc_f32_bits(sub) : normal;
    return cc_bits_f32(mag | sign);
}

/* float32 -> float16, RNE. Small values: adding 0.5 (as float32) leaves the
 * float16 subnormal's bits, rounded by the float32 adder, in the low bits;
 * normal ones: rebias and round the 13 dropped bits to even. */
static inline uint16_t cc_f32_to_f16(float f) {
    const uint32_t u = cc_f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    const uint32_t big = a > 0x7f800000u ? nan : 0x7c00u;
    const uint32_t sub = cc_f32_bits(cc_bits_f32(a) + cc_bits_f32(126u << 23)) - (126u << 23);
    const uint32_t norm = (a + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    const uint32_t mag = a >= ((127u + 16u) << 23) ? big : a < (113u << 23) ? sub : norm;
    return (uint16_t)(mag | sign);
}

#define CC_LANES 64

/* Reduction kinds; the chunk driver combines sums by addition, maxima by max. */
enum { CC_SUMSQ = 0, CC_SUMABS = 1, CC_MAXABS = 2, CC_SUMPOW = 3 };

/* NaN-propagating max of two non-negative values. */
static inline double cc_max_nan(double a, double b) {
    if (a != a || b != b) return NAN;
    return a > b ? a : b;
}

/* Combine a chunk's lanes, in a fixed (pairwise) order. */
static inline double cc_combine_lanes(double *acc, int is_max) {
    for (int width = CC_LANES / 2; width > 0; width /= 2)
        for (int k = 0; k < width; k++)
            acc[k] = is_max ? cc_max_nan(acc[k], acc[k + width]) : acc[k] + acc[k + width];
    return acc[0];
}

/* One loop body per (dtype, reduction), accumulating into the caller's
 * CC_LANES float64 lanes (a chunk's pieces share them, so small buffers pay
 * no per-buffer setup); stride is in elements. The contiguous case gets the
 * lane-parallel loop the compiler vectorizes; enough lanes to hide the add
 * latency. For the general power p, |x| is divided by scale (the max |x|
 * over all buffers, found in a first pass) so sum |x|^p cannot overflow;
 * divided, not multiplied by 1 / scale, which is inf for a subnormal scale.
 * NaN is sticky in a max lane: v > NaN is false. Elements of storage type T
 * are read as LOAD(element), of type V (float for float32 and the 16-bit
 * types, whose float32 values are exact: a 16-bit element adds exactly what
 * its float32 upcast adds, to the same lane). */
#define CC_DEFINE_REDUCE(NAME, T, V, LOAD)                                     \
CC_CLONES CC_UNUSED static void NAME(const T *x, ptrdiff_t n, ptrdiff_t stride,\
                                     int kind, double p, double scale,         \
                                     double *restrict acc) {                   \
    ptrdiff_t i = 0;                                                           \
    if (stride == 1) {                                                         \
        const ptrdiff_t nv = n - n % CC_LANES;                                 \
        switch (kind) {                                                        \
        case CC_SUMSQ:                                                         \
            for (; i < nv; i += CC_LANES) {                                    \
                CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)                 \
                for (int k = 0; k < CC_LANES; k++) {                           \
                    double v = (double)LOAD(x[i + k]); acc[k] += v * v; } }    \
            break;                                                             \
        case CC_SUMABS:                                                        \
            for (; i < nv; i += CC_LANES)                                      \
                for (int k = 0; k < CC_LANES; k++)                             \
                    acc[k] += fabs((double)LOAD(x[i + k]));                    \
            break;                                                             \
        case CC_MAXABS: {                                                      \
            /* In V: max is exact in any type, and float32 gets twice the      \
             * lanes per instruction. A NaN is kept apart (nan[k]) so that    \
             * each lane is one packed max and one compare-and-blend.        */\
            V m[CC_LANES] = {0}, nan[CC_LANES] = {0};                          \
            for (; i < nv; i += CC_LANES)                                      \
                for (int k = 0; k < CC_LANES; k++) {                           \
                    V a = LOAD(x[i + k]);                                      \
                    V v = a < 0 ? -a : a;                                      \
                    m[k] = v > m[k] ? v : m[k];                                \
                    nan[k] = v != v ? v : nan[k]; }                            \
            for (int k = 0; k < CC_LANES; k++)                                 \
                acc[k] = nan[k] != nan[k] ? (double)NAN                        \
                                          : cc_max_nan(acc[k], (double)m[k]);  \
            break; }                                                           \
        default:                                                               \
            for (; i < nv; i += CC_LANES)                                      \
                for (int k = 0; k < CC_LANES; k++)                             \
                    acc[k] += pow(fabs((double)LOAD(x[i + k])) / scale, p);    \
        }                                                                      \
    }                                                                          \
    /* Tail (and strided buffers), lane by lane. */                            \
    for (; i < n; i++) {                                                       \
        double v = fabs((double)LOAD(x[i * stride]));                          \
        double *a = &acc[i % CC_LANES];                                        \
        switch (kind) {                                                        \
        case CC_SUMSQ: *a += v * v; break;                                     \
        case CC_SUMABS: *a += v; break;                                        \
        case CC_MAXABS: *a = cc_max_nan(*a, v); break;                         \
        default: *a += pow(v / scale, p);                                      \
        }                                                                      \
    }                                                                          \
}

#ifdef CC_AVX512_PATHS

/* Hand-written AVX-512 form of the contiguous float32 sum-of-squares, sum-abs
 * and max-abs reductions. GCC's vectorized generic loop runs about 15% slower
 * (its converts don't take memory operands) and its scalar tail makes each
 * small buffer cost more; here the tail is a masked load. In the sums every
 * element goes to the same lane (its index modulo CC_LANES) with the same
 * operations as in the generic loop, so the result does not depend on which
 * path ran; a maximum is exact in any order. Max-abs works on the bits: for
 * |x| (sign cleared) unsigned integer order is float order, and a NaN's bits
 * are above inf's, so a plain integer max keeps NaN. */

/* Masks selecting the first `left` of the next 8 (16) elements. */
CC_AVX512 static inline __mmask8 cc_mask8(ptrdiff_t left) {
    return left >= 8 ? 0xff : left > 0 ? (__mmask8)((1u << left) - 1) : 0;
}
CC_AVX512 static inline __mmask16 cc_mask16(ptrdiff_t left) {
    return left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
}

/* The 8 float64 accumulators are named variables, not an array: GCC keeps
 * them in registers only then. STEP(j) handles elements i + 8j .. i + 8j + 7,
 * over whole blocks of CC_LANES, then once more over the last partial block
 * with masked loads (masked-off elements read as 0). */
#define CC_EACH8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define CC_AVX512_BLOCKS(STEP)                                                 \
    for (; i + CC_LANES <= n; i += CC_LANES) {                                 \
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)                         \
        const ptrdiff_t left = CC_LANES; CC_EACH8(STEP) }                      \
    if (i < n) { const ptrdiff_t left = n - i; CC_EACH8(STEP) }
#define CC_LOAD8(j) cc_mask8(left - 8 * j), x + i + 8 * j
/* Eight elements (the arguments: mask, address) as float32: loaded, or widened from the
 * 16-bit types (F16C's vcvtph2ps; bfloat16 shifted into the top half). */
#define CC_PS8_F32(...) _mm256_maskz_loadu_ps(__VA_ARGS__)
#define CC_PS8_F16(...) _mm256_cvtph_ps(_mm_maskz_loadu_epi16(__VA_ARGS__))
#define CC_PS8_BF16(...) _mm256_castsi256_ps(_mm256_slli_epi32(                \
        _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(__VA_ARGS__)), 16))
#define CC_SUMSQ_STEP(PS8, j) { const __m512d v = _mm512_cvtps_pd(PS8(CC_LOAD8(j))); \
                                a##j = _mm512_fmadd_pd(v, v, a##j); }
#define CC_SUMABS_STEP(PS8, j) { const __m512d v = _mm512_cvtps_pd(PS8(CC_LOAD8(j))); \
                                 a##j = _mm512_add_pd(a##j, _mm512_abs_pd(v)); }
#define CC_SUMSQ_F32(j) CC_SUMSQ_STEP(CC_PS8_F32, j)
#define CC_SUMABS_F32(j) CC_SUMABS_STEP(CC_PS8_F32, j)
#define CC_SUMSQ_F16(j) CC_SUMSQ_STEP(CC_PS8_F16, j)
#define CC_SUMABS_F16(j) CC_SUMABS_STEP(CC_PS8_F16, j)
#define CC_SUMSQ_BF16(j) CC_SUMSQ_STEP(CC_PS8_BF16, j)
#define CC_SUMABS_BF16(j) CC_SUMABS_STEP(CC_PS8_BF16, j)
/* Max-abs keeps 64 float lanes as 4 registers of 16 (m0 holds lanes 0-15);
 * the 16-bit types as 2 registers of 32 16-bit lanes (the same bit order). */
#define CC_MAXABS_STEP(q) m##q = _mm512_max_epu32(m##q, _mm512_and_si512(abs_bits, \
        _mm512_maskz_loadu_epi32(cc_mask16(left - 16 * q), x + i + 16 * q)));
#define CC_MAXABS16_STEP(q) m##q = _mm512_max_epu16(m##q, _mm512_and_si512(abs_bits, \
        _mm512_maskz_loadu_epi16(cc_mask32(left - 32 * q), x + i + 32 * q)));
#define CC_EACH4(M) M(0) M(1) M(2) M(3)
#define CC_EACH2(M) M(0) M(1)

CC_AVX512 static inline __mmask32 cc_mask32(ptrdiff_t left) {
    return left >= 32 ? 0xffffffffu : left > 0 ? (__mmask32)((1u << left) - 1) : 0;
}

/* A max does not depend on the order or lanes it is taken in: the piece's
 * maximum goes to lane 0. */
CC_AVX512 CC_UNUSED static void cc_maxabs_f32_avx512(const float *x, ptrdiff_t n,
                                                     double *restrict acc) {
    ptrdiff_t i = 0;
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
    for (; i + CC_LANES <= n; i += CC_LANES) {
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)
        const ptrdiff_t left = CC_LANES; CC_EACH4(CC_MAXABS_STEP) }
    if (i < n) { const ptrdiff_t left = n - i; CC_EACH4(CC_MAXABS_STEP) }
    acc[0] = cc_max_nan(acc[0], (double)cc_bits_f32((uint32_t)_mm512_reduce_max_epu32(
        _mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3)))));
}

/* The same over 16-bit bits; TO_F32 widens the largest. */
#define CC_DEFINE_MAXABS16_AVX512(NAME, TO_F32)                                \
CC_AVX512 CC_UNUSED static void NAME(const uint16_t *x, ptrdiff_t n,           \
                                     double *restrict acc) {                   \
    ptrdiff_t i = 0;                                                           \
    const __m512i abs_bits = _mm512_set1_epi16(0x7fff);                        \
    __m512i m0 = _mm512_setzero_si512(), m1 = m0;                              \
    for (; i + CC_LANES <= n; i += CC_LANES) {                                 \
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)                         \
        const ptrdiff_t left = CC_LANES; CC_EACH2(CC_MAXABS16_STEP) }          \
    if (i < n) { const ptrdiff_t left = n - i; CC_EACH2(CC_MAXABS16_STEP) }    \
    m0 = _mm512_max_epu16(m0, m1);                                             \
    const uint32_t top = (uint32_t)_mm512_reduce_max_epu32(_mm512_max_epu32(   \
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(m0)),                     \
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m0, 1))));             \
    acc[0] = cc_max_nan(acc[0], (double)TO_F32((uint16_t)top));                \
}
CC_DEFINE_MAXABS16_AVX512(cc_maxabs_f16_avx512, cc_f16_to_f32)
CC_DEFINE_MAXABS16_AVX512(cc_maxabs_bf16_avx512, cc_bf16_to_f32)

/* The sums for elements of type T, read by SUMSQ(j) and SUMABS(j) steps. */
#define CC_DEFINE_REDUCE_AVX512(NAME, T, MAXABS, SUMSQ, SUMABS)                \
CC_AVX512 CC_UNUSED static void NAME(const T *x, ptrdiff_t n, int kind,        \
                                     double *restrict acc) {                   \
    ptrdiff_t i = 0;                                                           \
    if (kind == CC_MAXABS) { MAXABS(x, n, acc); return; }                      \
    CC_EACH8(CC_LOAD_ACC)                                                      \
    if (kind == CC_SUMSQ) {                                                    \
        CC_AVX512_BLOCKS(SUMSQ)                                                \
    } else {                                                                   \
        CC_AVX512_BLOCKS(SUMABS)                                               \
    }                                                                          \
    CC_EACH8(CC_STORE_ACC)                                                     \
}
#define CC_LOAD_ACC(j) __m512d a##j = _mm512_loadu_pd(acc + 8 * j);
#define CC_STORE_ACC(j) _mm512_storeu_pd(acc + 8 * j, a##j);
CC_DEFINE_REDUCE_AVX512(cc_reduce_f32_avx512, float, cc_maxabs_f32_avx512,
                        CC_SUMSQ_F32, CC_SUMABS_F32)
CC_DEFINE_REDUCE_AVX512(cc_reduce_f16_avx512, uint16_t, cc_maxabs_f16_avx512,
                        CC_SUMSQ_F16, CC_SUMABS_F16)
CC_DEFINE_REDUCE_AVX512(cc_reduce_bf16_avx512, uint16_t, cc_maxabs_bf16_avx512,
                        CC_SUMSQ_BF16, CC_SUMABS_BF16)
#undef CC_EACH8
#undef CC_EACH4
#undef CC_EACH2
#undef CC_AVX512_BLOCKS
#undef CC_LOAD8
#undef CC_SUMSQ_STEP
#undef CC_SUMABS_STEP
#undef CC_MAXABS_STEP
#undef CC_MAXABS16_STEP
#undef CC_LOAD_ACC
#undef CC_STORE_ACC
#endif

/* Under the AVX-512 paths: `if (COND && the CPU has them) { CALL; return; }`. */
#ifdef CC_AVX512_PATHS
#define CC_TWIN(COND, CALL) if ((COND) && cc_avx512_usable()) { CALL; return; }
#else
#define CC_TWIN(COND, CALL)
#endif

#define CC_AS_IS(v) (v)
CC_DEFINE_REDUCE(cc_reduce_f32_generic, float, float, CC_AS_IS)
CC_DEFINE_REDUCE(cc_reduce_f64, double, double, CC_AS_IS)
CC_DEFINE_REDUCE(cc_reduce_f16_generic, uint16_t, float, cc_f16_to_f32)
CC_DEFINE_REDUCE(cc_reduce_bf16_generic, uint16_t, float, cc_bf16_to_f32)

/* The reductions the engine calls: the AVX-512 form where it applies, else
 * the generic loop (the same lanes, the same bits). */
#define CC_DEFINE_REDUCE_DISPATCH(NAME, T, TWIN, GENERIC)                      \
CC_UNUSED static void NAME(const T *x, ptrdiff_t n, ptrdiff_t stride, int kind, \
                           double p, double scale, double *restrict acc) {     \
    CC_TWIN(stride == 1 && kind != CC_SUMPOW, TWIN(x, n, kind, acc))           \
    GENERIC(x, n, stride, kind, p, scale, acc);                                \
}
CC_DEFINE_REDUCE_DISPATCH(cc_reduce_f32, float, cc_reduce_f32_avx512, cc_reduce_f32_generic)
CC_DEFINE_REDUCE_DISPATCH(cc_reduce_f16, uint16_t, cc_reduce_f16_avx512, cc_reduce_f16_generic)
CC_DEFINE_REDUCE_DISPATCH(cc_reduce_bf16, uint16_t, cc_reduce_bf16_avx512,
                          cc_reduce_bf16_generic)

/* The reduction of one buffer on its own (fresh lanes, combined). */
#define CC_DEFINE_REDUCE_ONE(NAME, REDUCE, T)                                  \
CC_UNUSED static double NAME(const T *x, ptrdiff_t n, ptrdiff_t stride,       \
                             int kind, double p, double scale) {               \
    double acc[CC_LANES] = {0};                                                \
    REDUCE(x, n, stride, kind, p, scale, acc);                                 \
    return cc_combine_lanes(acc, kind == CC_MAXABS);                           \
}

CC_DEFINE_REDUCE_ONE(cc_reduce_one_f32, cc_reduce_f32, float)
CC_DEFINE_REDUCE_ONE(cc_reduce_one_f64, cc_reduce_f64, double)

#ifdef CC_AVX512_PATHS
/* x[i] = OPV(x[i]) in place over a contiguous run, four AVX-512 vectors per
 * block after a prefetch; OPS is the same for one element (the tail). The
 * operation sees the scalars a and b (va, vb as vectors). Hand-written:
 * the compiler's vectorized form of the same loop ran at memory speed or
 * 15-20% below it depending on where the linker placed it (Xeon, GCC 12). */
#define CC_DEFINE_PACKED_IN_PLACE(NAME, T, VT, W, SET1, LOADU, STOREU, OPS, OPV) \
CC_AVX512 CC_UNUSED static void NAME(T *x, T a, T b, ptrdiff_t n) {            \
    const VT va = SET1(a), vb = SET1(b);                                        \
    ptrdiff_t i = 0;                                                            \
    (void)va; (void)vb;                                                         \
    for (; i + 4 * W <= n; i += 4 * W) {                                        \
        CC_PREFETCH_AHEAD(x + i, 4 * W * sizeof(T))                             \
        STOREU(x + i, OPV(LOADU(x + i)));                                       \
        STOREU(x + i + W, OPV(LOADU(x + i + W)));                               \
        STOREU(x + i + 2 * W, OPV(LOADU(x + i + 2 * W)));                       \
        STOREU(x + i + 3 * W, OPV(LOADU(x + i + 3 * W)));                       \
    }                                                                           \
    for (; i < n; i++) x[i] = OPS(x[i]);                                        \
}
#define CC_MUL_S(v) ((v) * b)
#define CC_MUL_V32(v) _mm512_mul_ps(v, vb)
#define CC_MUL_V64(v) _mm512_mul_pd(v, vb)
CC_DEFINE_PACKED_IN_PLACE(cc_mul_f32_in, float, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps,
                          _mm512_storeu_ps, CC_MUL_S, CC_MUL_V32)
CC_DEFINE_PACKED_IN_PLACE(cc_mul_f64_in, double, __m512d, 8, _mm512_set1_pd, _mm512_loadu_pd,
                          _mm512_storeu_pd, CC_MUL_S, CC_MUL_V64)
#endif

/* float32 buffers are multiplied by the float32 scale (as TensorFlow does),
 * except when that scale would be subnormal and lose digits (clipping a huge
 * norm to a small one): then in float64, rounded once. */
CC_CLONES CC_UNUSED static void cc_scale_f32(float *x, ptrdiff_t n, ptrdiff_t stride, double s) {
    const float sf = (float)s;
    if (!(fabs(s) < FLT_MIN) || s == 0.0) {
#ifdef CC_AVX512_PATHS
        if (stride == 1 && cc_avx512_usable()) { cc_mul_f32_in(x, 0, sf, n); return; }
#endif
        if (stride == 1) CC_FOR_PREFETCHED(float, x, n, x[i] *= sf)
        else { for (ptrdiff_t i = 0; i < n; i++) x[i * stride] *= sf; }
    } else {
        for (ptrdiff_t i = 0; i < n; i++) x[i * stride] = (float)((double)x[i * stride] * s);
    }
}

CC_CLONES CC_UNUSED static void cc_scale_f64(double *x, ptrdiff_t n, ptrdiff_t stride, double s) {
#ifdef CC_AVX512_PATHS
    if (stride == 1 && cc_avx512_usable()) { cc_mul_f64_in(x, 0, s, n); return; }
#endif
    if (stride == 1) CC_FOR_PREFETCHED(double, x, n, x[i] *= s)
    else { for (ptrdiff_t i = 0; i < n; i++) x[i * stride] *= s; }
}

/* The 16-bit types are multiplied as torch multiplies them (and NumPy, a
 * float16 array by a float32 scalar): widened to float32, times the float32
 * scale, rounded once to the type (RNE). */
#ifdef CC_AVX512_PATHS
#define CC_WIDEN16_F16(v) _mm512_cvtph_ps(v)
#define CC_NARROW16_F16(v) _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define CC_WIDEN16_BF16(v) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
/* cc_f32_to_bf16 on 16 lanes. (Not AVX512-BF16's vcvtneps2bf16: it flushes
 * subnormals to zero.) */
CC_AVX512 static inline __m256i cc_narrow16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                          _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                                         rounded, quiet));
}
#define CC_NARROW16_BF16(v) cc_narrow16_bf16(v)
/* Four vectors of 16 per block after a prefetch; the tail with masked loads
 * and stores (the same conversions, so the same bits). */
#define CC_DEFINE_SCALE16_AVX512(NAME, WIDEN, NARROW)                          \
CC_AVX512 CC_UNUSED static void NAME(uint16_t *x, ptrdiff_t n, float s) {      \
    const __m512 vs = _mm512_set1_ps(s);                                       \
    ptrdiff_t i = 0;                                                           \
    for (; i + 64 <= n; i += 64) {                                             \
        CC_PREFETCH_AHEAD(x + i, 128)                                          \
        for (int q = 0; q < 64; q += 16) {                                     \
            __m256i *p = (__m256i *)(x + i + q);                               \
            _mm256_storeu_si256(p, NARROW(_mm512_mul_ps(WIDEN(_mm256_loadu_si256(p)), vs))); } } \
    for (; i < n; i += 16) {                                                   \
        const __mmask16 m = cc_mask16(n - i);                                  \
        _mm256_mask_storeu_epi16(x + i, m, NARROW(_mm512_mul_ps(               \
            WIDEN(_mm256_maskz_loadu_epi16(m, x + i)), vs))); }                \
}
CC_DEFINE_SCALE16_AVX512(cc_scale_f16_avx512, CC_WIDEN16_F16, CC_NARROW16_F16)
/* bfloat16, 32 at a time without moving any across lanes: the even elements
 * are the low halves of the 32-bit lanes (shifted up: their float32 values),
 * the odd ones the high halves (masked: theirs); each product is rounded in
 * its lane by the bias trick (NaN: quieted), and the two results are merged
 * back by 16-bit blend. The tail is the 16-wide loop's. */
CC_AVX512 static inline __m512i cc_round16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u,
                                _mm512_set1_epi32(0x00400000));   /* high half: quiet NaN */
}
CC_DEFINE_SCALE16_AVX512(cc_scale_bf16_avx512_16, CC_WIDEN16_BF16, CC_NARROW16_BF16)
CC_AVX512 CC_UNUSED static void cc_scale_bf16_avx512(uint16_t *x, ptrdiff_t n, float s) {
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    ptrdiff_t i = 0;
    for (; i + 64 <= n; i += 64) {
        CC_PREFETCH_AHEAD(x + i, 128)
        for (int q = 0; q < 64; q += 32) {
            const __m512i w = _mm512_loadu_si512(x + i + q);
            const __m512i even = cc_round16_bf16(_mm512_mul_ps(
                _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), vs));
            const __m512i odd = cc_round16_bf16(_mm512_mul_ps(
                _mm512_castsi512_ps(_mm512_and_si512(w, high)), vs));
            _mm512_storeu_si512(x + i + q, _mm512_mask_blend_epi16(
                (__mmask32)0xaaaaaaaau, _mm512_srli_epi32(even, 16), odd)); } }
    if (i < n) cc_scale_bf16_avx512_16(x + i, n - i, s);
}
#endif

#define CC_DEFINE_SCALE16(NAME, WIDEN, NARROW, TWIN)                           \
CC_CLONES CC_UNUSED static void NAME(uint16_t *x, ptrdiff_t n, ptrdiff_t stride, double s) { \
    const float sf = (float)s;                                                 \
    CC_TWIN(stride == 1, TWIN(x, n, sf))                                       \
    if (stride == 1) CC_FOR_PREFETCHED(uint16_t, x, n, x[i] = NARROW(WIDEN(x[i]) * sf)) \
    else { for (ptrdiff_t i = 0; i < n; i++)                                   \
               x[i * stride] = NARROW(WIDEN(x[i * stride]) * sf); }             \
}
CC_DEFINE_SCALE16(cc_scale_f16, cc_f16_to_f32, cc_f32_to_f16, cc_scale_f16_avx512)
CC_DEFINE_SCALE16(cc_scale_bf16, cc_bf16_to_f32, cc_f32_to_bf16, cc_scale_bf16_avx512)

/* Bandwidth probes for the benchmarks' ceiling: the simplest streaming loops
 * (one read pass; one read-write pass) over a contiguous float32 buffer,
 * prefetching as the kernels do, so the ceiling stays a ceiling. */
CC_CLONES CC_UNUSED static float cc_probe_read_f32(const float *x, ptrdiff_t n) {
    float acc[CC_LANES] = {0};
    ptrdiff_t i = 0;
    for (; i + CC_LANES <= n; i += CC_LANES) {
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)
        for (int k = 0; k < CC_LANES; k++) acc[k] += x[i + k];
    }
    float s = 0;
    for (int k = 0; k < CC_LANES; k++) s += acc[k];
    for (; i < n; i++) s += x[i];
    return s;
}

#endif
