# The platform shims of cc_loops.h (OpenMP, the team, the clock), for
# clipcore's own extensions: one declaration, cimported where they are used.
# Not installed: the public clipcore/kernels.pxd needs no header.
cdef extern from "cc_loops.h" nogil:
    int CC_SUMSQ, CC_SUMABS, CC_MAXABS, CC_SUMPOW
    int cc_openmp_enabled()
    int cc_max_threads()
    int cc_num_procs()
    const char *cc_simd_path()
    int cc_team_rank()       # inside a parallel region: this thread's rank
    int cc_team_size()       # and the team's size
    double cc_now()          # seconds on a monotonic clock
    void cc_use_tuning(int *table)
