# The per-axis loops of cc_axis.h, for the extensions that use them: one
# declaration, cimported where they are used.
cdef extern from "cc_axis.h" nogil:
    double cc_norm_scale(double sumsq, double clip)
    void cc_rows_reduce_f32(const float *x, Py_ssize_t nrows, Py_ssize_t sa,
                            Py_ssize_t n, Py_ssize_t s, int kind, double *res)
    void cc_rows_reduce_f64(const double *x, Py_ssize_t nrows, Py_ssize_t sa,
                            Py_ssize_t n, Py_ssize_t s, int kind, double *res)
    void cc_rows_clip_f32(const float *x, Py_ssize_t nrows, Py_ssize_t sa, Py_ssize_t n,
                          Py_ssize_t s, float *o, Py_ssize_t oa, Py_ssize_t os, double clip)
    void cc_rows_clip_f64(const double *x, Py_ssize_t nrows, Py_ssize_t sa, Py_ssize_t n,
                          Py_ssize_t s, double *o, Py_ssize_t oa, Py_ssize_t os, double clip)
    void cc_cols_reduce_f32(const float *x, Py_ssize_t nr, Py_ssize_t sr, Py_ssize_t nb,
                            Py_ssize_t sb, int kind, double *acc)
    void cc_cols_reduce_f64(const double *x, Py_ssize_t nr, Py_ssize_t sr, Py_ssize_t nb,
                            Py_ssize_t sb, int kind, double *acc)
    void cc_cols_scale_f32(const float *x, Py_ssize_t nr, Py_ssize_t sr, Py_ssize_t sb,
                           const float *f, Py_ssize_t nb, float *o, Py_ssize_t osr,
                           Py_ssize_t osb)
    void cc_cols_scale_f64(const double *x, Py_ssize_t nr, Py_ssize_t sr, Py_ssize_t sb,
                           const double *f, Py_ssize_t nb, double *o, Py_ssize_t osr,
                           Py_ssize_t osb)
