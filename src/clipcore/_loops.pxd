# The platform shims of cc_platform.h (OpenMP, the team, the clock, the SIMD
# path, the tuning table), for clipcore's own extensions: one declaration,
# cimported where they are used. Not installed: the public clipcore/kernels.pxd
# needs no header.
cdef extern from "cc_platform.h" nogil:
    int cc_openmp_enabled()
    int cc_max_threads()
    int cc_num_procs()
    const char *cc_simd_path()
    int cc_team_rank()       # inside a parallel region: this thread's rank
    int cc_team_size()       # and the team's size
    double cc_now()          # seconds on a monotonic clock
    void cc_use_tuning(int *table)
