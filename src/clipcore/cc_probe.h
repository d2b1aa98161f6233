/* The bandwidth probe's read loop, for the benchmarks' ceiling: the simplest
 * streaming read of a contiguous float32 buffer, in CC_LANES lanes and
 * prefetching as the reductions do, so the ceiling stays a ceiling.
 */
#ifndef CLIPCORE_CC_PROBE_H
#define CLIPCORE_CC_PROBE_H

#include <stddef.h>

#include "cc_platform.h"
#include "cc_reduce.h"

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
